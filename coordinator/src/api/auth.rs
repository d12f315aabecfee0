//! API keys. With keys configured (`--api-key` / `GEMMA_API_KEY`, `--api-key-file`), every
//! /v1 route wants `Authorization: Bearer KEY` and answers 401 in OpenAI's error shape without
//! it; /health, /ready and /metrics stay open for probes and scrapers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// The keys a request may present.
pub struct ApiKeys(Vec<Vec<u8>>);

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error("cannot read the API key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the API key file {path} holds no key; it takes one key per line (blank lines and lines \
         starting with # are skipped)"
    )]
    NoKeyInFile { path: PathBuf },
    #[error("api_key is empty; give a key, or leave the setting out to serve without keys")]
    EmptyKey,
}

impl ApiKeys {
    /// The keys of the settings: the one key and every line of the key file. None when neither
    /// is set: the API is open.
    pub fn load(key: Option<&str>, file: Option<&Path>) -> Result<Option<Self>, ApiKeyError> {
        let mut keys = Vec::new();
        if let Some(key) = key {
            if key.trim().is_empty() {
                return Err(ApiKeyError::EmptyKey);
            }
            keys.push(key.trim().as_bytes().to_vec());
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ApiKeyError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let before = keys.len();
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| l.as_bytes().to_vec()),
            );
            if keys.len() == before {
                return Err(ApiKeyError::NoKeyInFile {
                    path: path.to_path_buf(),
                });
            }
        }
        Ok((!keys.is_empty()).then_some(Self(keys)))
    }

    /// Whether `presented` is one of the keys. Every key is compared, each in time that does not
    /// depend on where the bytes differ, so the answer's timing does not leak a key's prefix.
    pub fn admits(&self, presented: &[u8]) -> bool {
        self.0
            .iter()
            .fold(false, |found, key| found | constant_time_eq(key, presented))
    }
}

/// Equal bytes, compared without an early exit (a length mismatch is not hidden: the lengths
/// of keys are not the secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Middleware of the /v1 routes: a request without a valid `Authorization: Bearer` key is
/// answered 401 before its body is read.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(keys) = state.api_keys.as_ref() else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(key) if keys.admits(key) => next.run(request).await,
        Some(_) => ApiError::unauthorized("Incorrect API key provided.").into_response(),
        None => ApiError::unauthorized(
            "You didn't provide an API key. Send it as an `Authorization: Bearer KEY` header.",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_the_setting_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# ops team\nk-one\n\n  k-two  \n").unwrap();
        let keys = ApiKeys::load(Some("k-main"), Some(&file)).unwrap().unwrap();
        for good in ["k-main", "k-one", "k-two"] {
            assert!(keys.admits(good.as_bytes()), "{good}");
        }
        for bad in ["", "k-on", "k-one ", "# ops team", "K-MAIN"] {
            assert!(!keys.admits(bad.as_bytes()), "{bad:?}");
        }
        assert!(ApiKeys::load(None, None).unwrap().is_none());
    }

    #[test]
    fn unusable_key_settings_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# no keys yet\n\n").unwrap();
        let e = ApiKeys::load(None, Some(&empty)).err().unwrap().to_string();
        assert!(
            e.contains("holds no key") && e.contains("one key per line"),
            "{e}"
        );
        let e = ApiKeys::load(None, Some(&dir.path().join("missing")))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read") && e.contains("missing"), "{e}");
        let e = ApiKeys::load(Some(" "), None).err().unwrap().to_string();
        assert!(e.contains("api_key is empty"), "{e}");
    }
}
