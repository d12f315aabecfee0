//! The optional per-client rate limit of the /v1 routes: a token bucket per API key (when keys
//! are configured) or per client IP (when the API is open). A bucket holds at most `burst`
//! requests and refills at `per_second`; a request that finds it empty is answered 429 with
//! `Retry-After`, the whole seconds until it holds one again. /health, /ready and /metrics are
//! outside the /v1 routes and never limited.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::connections::ClientAddr;
use crate::api::{ApiError, AppState};

/// Buckets kept before the full ones (the same as none) are swept out.
const SWEEP_ABOVE: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RateLimitError {
    #[error("rate_limit_per_second is {0}; allowed: a finite number greater than 0")]
    PerSecond(f64),
    #[error("rate_limit_burst is set but rate_limit_per_second is not; set both, or neither")]
    BurstWithoutRate,
}

/// Whose bucket a request takes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// The API key it presented (already admitted by `auth`).
    Key(Vec<u8>),
    /// Its address, when the API is open.
    Ip(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets, one per client.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<Client, Bucket>>,
}

impl RateLimiter {
    /// The limiter the settings ask for: None when `per_second` is unset. `burst` defaults to
    /// one second's worth of requests, at least 1.
    pub fn from_settings(
        per_second: Option<f64>,
        burst: Option<NonZeroU32>,
    ) -> Result<Option<Self>, RateLimitError> {
        let Some(per_second) = per_second else {
            return match burst {
                Some(_) => Err(RateLimitError::BurstWithoutRate),
                None => Ok(None),
            };
        };
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(RateLimitError::PerSecond(per_second));
        }
        let burst = burst.map_or(per_second.ceil().max(1.0), |b| f64::from(b.get()));
        Ok(Some(Self {
            per_second,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }))
    }

    /// Takes one request from `client`'s bucket at `now`; when it is empty, how long until it
    /// holds one again.
    pub fn take(&self, client: Client, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > SWEEP_ABOVE {
            // A bucket that has refilled is the same as no bucket: forget it, so the map holds
            // only recently active clients.
            buckets.retain(|_, b| self.refilled(*b, now) < self.burst);
        }
        let bucket = buckets.entry(client).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let tokens = self.refilled(*bucket, now);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                updated: now,
            };
            return Ok(());
        }
        *bucket = Bucket {
            tokens,
            updated: now,
        };
        Err(Duration::from_secs_f64((1.0 - tokens) / self.per_second))
    }

    /// The bucket's tokens at `now`.
    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        (b.tokens + elapsed * self.per_second).min(self.burst)
    }

    /// The refusal of a request that found its bucket empty.
    fn refusal(&self, wait: Duration, keyed_by: &str) -> ApiError {
        // Whole seconds, rounded up: retrying after them finds a request in the bucket.
        let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        ApiError::rate_limited(
            format!(
                "rate limit reached: {} requests per second, bursts of {}, per {keyed_by}; \
                 retry in {retry_after} s",
                self.per_second, self.burst
            ),
            retry_after.max(1),
        )
    }
}

/// Middleware of the /v1 routes (inside `auth`, so the key it reads is an admitted one).
pub async fn limit_rate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(limiter) = state.rate_limiter.as_ref() else {
        return next.run(request).await;
    };
    let (client, keyed_by) = match state.api_keys.is_some() {
        true => (presented_key(&request).map(Client::Key), "API key"),
        false => (client_ip(&request).map(Client::Ip), "client address"),
    };
    // Without a key or an address (never over a real connection) there is nothing to key on.
    let Some(client) = client else {
        return next.run(request).await;
    };
    match limiter.take(client, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(wait) => limiter.refusal(wait, keyed_by).into_response(),
    }
}

fn presented_key(request: &Request) -> Option<Vec<u8>> {
    let value = request.headers().get(header::AUTHORIZATION)?;
    Some(value.as_bytes().strip_prefix(b"Bearer ")?.to_vec())
}

fn client_ip(request: &Request) -> Option<IpAddr> {
    let ConnectInfo(ClientAddr(addr)) = request.extensions().get::<ConnectInfo<ClientAddr>>()?;
    Some(addr.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: f64, burst: u32) -> RateLimiter {
        RateLimiter::from_settings(Some(per_second), NonZeroU32::new(burst))
            .expect("valid")
            .expect("on")
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_the_rate() {
        let l = limiter(2.0, 3);
        let t0 = Instant::now();
        let ip = |n| Client::Ip(IpAddr::from([127, 0, 0, n]));
        for _ in 0..3 {
            assert_eq!(l.take(ip(1), t0), Ok(()));
        }
        assert_eq!(l.take(ip(1), t0), Err(Duration::from_millis(500)));
        // Other clients have their own buckets.
        assert_eq!(l.take(ip(2), t0), Ok(()));
        assert_eq!(l.take(ip(1), t0 + Duration::from_millis(500)), Ok(()));
        assert!(l.take(ip(1), t0 + Duration::from_millis(600)).is_err());
        // A long pause refills to the burst, never past it.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert_eq!(l.take(ip(1), later), Ok(()));
        }
        assert!(l.take(ip(1), later).is_err());
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let l = limiter(0.25, 1);
        let t0 = Instant::now();
        assert_eq!(l.take(Client::Key(b"k".to_vec()), t0), Ok(()));
        let wait = l
            .take(Client::Key(b"k".to_vec()), t0 + Duration::from_millis(100))
            .expect_err("empty");
        assert_eq!(wait, Duration::from_millis(3900));
        let message = l.refusal(wait, "API key").body().error.message;
        assert!(message.contains("retry in 4 s"), "{message}");
    }

    #[test]
    fn settings_are_checked() {
        assert!(matches!(RateLimiter::from_settings(None, None), Ok(None)));
        assert_eq!(
            RateLimiter::from_settings(None, NonZeroU32::new(5)).err(),
            Some(RateLimitError::BurstWithoutRate)
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = RateLimiter::from_settings(Some(bad), None).expect_err("refused");
            assert!(e.to_string().contains("greater than 0"), "{e}");
        }
        let l = RateLimiter::from_settings(Some(2.5), None)
            .expect("valid")
            .expect("on");
        assert_eq!(l.burst, 3.0, "one second's worth, rounded up");
    }
}
