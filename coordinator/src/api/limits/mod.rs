//! What one client may ask of the server, besides what `validation` checks per request: open
//! connections (`connections`: a listener that holds a permit per connection) and requests per
//! second (`rate`: a token bucket per API key or client address). The body size limit is
//! axum's (`request::JsonBody` turns it into a 413), the output per request a validation rule
//! (`max_tokens_per_request`).

pub mod connections;
pub mod rate;

pub use connections::{ClientAddr, ConnectionLimit, DEFAULT_MAX_CONNECTIONS};
pub use rate::{RateLimitError, RateLimiter};
