//! Every refusal the API answers, as an HTTP status and OpenAI's error body.

use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::fields::FieldError;
use super::response::ErrorBody;
use super::validation::{ValidationError, ValidationErrors};
use crate::engine::EngineError;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    /// 429 only: whole seconds until a retry can succeed (`Retry-After`).
    retry_after: Option<u64>,
}

impl ApiError {
    /// A failure of the server itself, not of the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            retry_after: None,
        }
    }

    /// A client past its rate limit: 429, retry after `retry_after` seconds.
    pub fn rate_limited(message: String, retry_after: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message,
            kind: "rate_limit_error",
            param: None,
            retry_after: Some(retry_after),
        }
    }

    /// No key, or not one of the configured keys.
    pub fn unauthorized(message: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.to_string(),
            kind: "invalid_request_error",
            param: None,
            retry_after: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.message.clone(), self.kind, self.param.clone())
    }
}

/// A body that could not be read: 413 past the body limit, else 400.
impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        let status = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self {
            status,
            message: format!("request body: {}", e.body_text()),
            kind: "invalid_request_error",
            param: None,
            retry_after: None,
        }
    }
}

/// A body that is not JSON or not the request's shape, with the field the error is in.
impl From<serde_path_to_error::Error<serde_json::Error>> for ApiError {
    fn from(e: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            return Self::json(inner);
        }
        Self::field(&path, &inner)
    }
}

impl ApiError {
    /// A field of the wrong type or shape; `param` is its top-level field
    /// (`messages[0].content` -> `messages`).
    pub fn field(path: &str, e: &serde_json::Error) -> Self {
        let top = path.split(['.', '[']).next().unwrap_or(path);
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!("invalid JSON body: `{path}`: {e}"),
            kind: "invalid_request_error",
            param: (!top.is_empty()).then(|| top.to_string()),
            retry_after: None,
        }
    }

    /// A body that is not JSON (or has something after the JSON value).
    pub fn json(e: serde_json::Error) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!("invalid JSON body: {e}"),
            kind: "invalid_request_error",
            param: None,
            retry_after: None,
        }
    }
}

/// Fields the endpoint refuses: every one in the message, the first as `param`.
impl ApiError {
    pub fn fields(errors: Vec<FieldError>) -> Self {
        let message = errors
            .iter()
            .map(FieldError::to_string)
            .collect::<Vec<_>>()
            .join("; and ");
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param: errors.first().map(|e| e.param().to_string()),
            retry_after: None,
        }
    }
}

/// Every broken rule in the message; the first one's field as `param` and its status.
impl From<ValidationErrors> for ApiError {
    fn from(errors: ValidationErrors) -> Self {
        Self {
            status: errors.first().status(),
            message: errors.to_string(),
            kind: "invalid_request_error",
            param: Some(errors.first().param().to_string()),
            retry_after: None,
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ValidationErrors::from(e).into()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let (status, kind) = match e {
            EngineError::TooLong { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            EngineError::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        };
        Self {
            status,
            message: e.to_string(),
            kind,
            param: None,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        // A full queue, an empty rate bucket or a cluster that is healing is temporary: tell
        // clients when to retry (by default: soon).
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            let seconds = self.retry_after.unwrap_or(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // RFC 6750: say which scheme would be accepted.
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
