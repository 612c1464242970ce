//! Request-rate limiting: a GCRA limiter with an in-process and a Redis backend.
//!
//! # Algorithm
//!
//! Both backends implement the generic cell rate algorithm (GCRA, "leaky bucket
//! as a meter", as in Redis-cell). A [`RateLimit`] of `per_minute` requests with
//! a `burst` becomes two numbers:
//!
//! * the emission interval `T = 60 s / per_minute`, the spacing of requests at
//!   the sustained rate, and
//! * the tolerance `τ = T · (burst − 1)`, how far ahead of that schedule a client
//!   may run.
//!
//! The only state per (class, key) is the *theoretical arrival time* (TAT): when
//! the next request would be due if the client had used its budget at exactly the
//! sustained rate. A request at time `t` is allowed when `TAT − τ ≤ t`, and then
//! moves the TAT to `max(TAT, t) + T`; otherwise it is limited and may retry
//! after `TAT − τ − t`, which is always positive. A missing TAT and a TAT in the
//! past mean the same thing (a full budget), which is what lets both backends
//! forget keys as soon as their TAT has passed.
//!
//! All arithmetic is on integer microseconds and saturates. `T` is rounded down
//! (never below 1 µs), so a client sending at exactly `per_minute` is never
//! limited; `τ` is capped at [`MAX_TOLERANCE`] (about 35 years, far beyond any
//! useful burst), which also keeps the Redis script's Lua numbers (IEEE doubles)
//! exact.
//!
//! # Parts
//!
//! * [`RateLimiter`] is the trait the server holds (as `Arc<dyn RateLimiter>`).
//!   A `class` ("enroll", "device", ...) names an independent budget; a `key`
//!   (client address, device id) names who spends it.
//! * [`MemoryRateLimiter`] keeps TATs in a sharded `HashMap` behind `std` mutexes
//!   (never held across an `.await`). Keys are stored as a keyed 64-bit hash of
//!   (class, key), so each entry has a fixed small size whatever the caller's
//!   key. Expired entries are pruned, and the map has a hard cap: when a
//!   key-spraying client fills it with live entries, requests for *new* keys are
//!   refused (limited) rather than growing memory; keys already tracked keep
//!   their normal budgets. It reads a monotonic clock, or takes the time as an
//!   argument in [`MemoryRateLimiter::check_at`] so tests never sleep.
//! * [`RedisRateLimiter`] runs one atomic Lua script per check, so several
//!   server replicas share one budget per key. The script reads Redis's own
//!   `TIME`, so replicas with skewed clocks still agree, and sets each key to
//!   expire just after its TAT passes. It talks through a
//!   [`redis::aio::ConnectionManager`], which reconnects after a dropped
//!   connection; every check is bounded by [`REDIS_CHECK_TIMEOUT`].
//! * [`connect`] picks the backend from configuration, and [`address_key`]
//!   turns a client address into the key its per-address budgets use.
//!
//! This module does not decide what happens when Redis is down: `check` returns
//! [`RateLimitError::Unavailable`] or [`RateLimitError::Timeout`] and the caller
//! chooses to fail open or closed.

//!
//! # Files
//!
//! * `mod.rs` (this file): the facade the server uses: [`RateLimiter`],
//!   [`Decision`], [`RateLimitError`], [`connect`], and the rules both backends
//!   share (class names, how a refusal is reported).
//! * `settings.rs`: [`RateLimit`], the configured limit.
//! * `gcra.rs`: the GCRA parameters and step, pure arithmetic on a time given
//!   as an argument.
//! * `memory_backend.rs`: [`MemoryRateLimiter`], which runs that step itself.
//! * `redis_backend.rs`: [`RedisRateLimiter`], which runs the same step inside
//!   Redis as the Lua script `gcra.lua`.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

mod gcra;
mod memory_backend;
mod redis_backend;
mod settings;

pub use gcra::MAX_TOLERANCE;
pub use memory_backend::{DEFAULT_MAX_KEYS, MemoryRateLimiter};
pub use redis_backend::{REDIS_CHECK_TIMEOUT, REDIS_CONNECT_TIMEOUT, RedisRateLimiter};
pub use settings::RateLimit;

/// The rate-limit key for a client address.
///
/// An IPv4 address is its own key. An IPv6 client normally holds a whole /64
/// (SLAAC, privacy addresses) and can change the low 64 bits at will, so a
/// per-address budget keyed on the full address would be one budget per
/// request for it: IPv6 is keyed by its /64 prefix. An IPv4-mapped IPv6
/// address (a dual-stack listener) is keyed as the IPv4 address it is.
pub fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let segments = v6.segments();
                let prefix = Ipv6Addr::new(
                    segments[0],
                    segments[1],
                    segments[2],
                    segments[3],
                    0,
                    0,
                    0,
                    0,
                );
                format!("{prefix}/64")
            }
        },
    }
}

/// Key prefix [`connect`] uses for the Redis backend.
pub const DEFAULT_KEY_PREFIX: &str = "qflare:rl:";

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The request is within the limit and has been counted.
    Allowed,
    /// The request is over the limit and was not counted.
    Limited {
        /// How long until a request for the same key would be allowed; never zero.
        retry_after: Duration,
    },
}

/// Why a check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// A [`RateLimit`] with a zero field admits nothing; it is a configuration error.
    #[error(
        "invalid rate limit (per_minute = {per_minute}, burst = {burst}): both must be at least 1"
    )]
    InvalidLimit {
        /// The configured sustained rate.
        per_minute: u32,
        /// The configured burst.
        burst: u32,
    },
    /// A class must be non-empty and free of `:`, which separates it from the
    /// key in Redis key names; otherwise two (class, key) pairs could share a budget.
    #[error("invalid rate-limit class {0:?}: must be non-empty and must not contain ':'")]
    InvalidClass(String),
    /// The Redis URL could not be parsed.
    #[error("invalid Redis URL for the rate limiter")]
    InvalidUrl(#[source] redis::RedisError),
    /// Redis could not be reached, or the connection broke.
    #[error("Redis is unavailable to the rate limiter")]
    Unavailable(#[source] redis::RedisError),
    /// Redis did not answer in time.
    #[error("Redis did not answer the rate limiter within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error while loading or running the script.
    #[error("the rate-limit script failed in Redis")]
    Script(#[source] redis::RedisError),
    /// The script answered something this module did not send it to answer.
    #[error("the rate-limit script returned an unexpected reply: {0}")]
    UnexpectedReply(String),
}

/// A request-rate limiter shared by all handlers.
#[async_trait]
pub trait RateLimiter: Send + Sync + fmt::Debug {
    /// Counts one request for `key` in `class` (e.g. class "enroll", key "203.0.113.9"); classes keep separate budgets.
    ///
    /// A limited request is not counted, so a client that keeps retrying too
    /// early does not push its own recovery further away.
    async fn check(
        &self,
        class: &str,
        key: &str,
        limit: &RateLimit,
    ) -> Result<Decision, RateLimitError>;

    /// "memory" or "redis"
    fn backend(&self) -> &'static str;
}

/// Chooses the backend: `None` gives a [`MemoryRateLimiter`], `Some(url)` a
/// [`RedisRateLimiter`] with the key prefix [`DEFAULT_KEY_PREFIX`].
pub async fn connect(redis_url: Option<&str>) -> Result<Arc<dyn RateLimiter>, RateLimitError> {
    match redis_url {
        None => {
            tracing::info!(backend = "memory", "rate limiter ready");
            Ok(Arc::new(MemoryRateLimiter::new()))
        }
        Some(url) => {
            let limiter = RedisRateLimiter::connect(url, DEFAULT_KEY_PREFIX).await?;
            // The URL may carry a password, so it is not logged.
            tracing::info!(backend = "redis", "rate limiter ready");
            Ok(Arc::new(limiter))
        }
    }
}

fn validate_class(class: &str) -> Result<(), RateLimitError> {
    if class.is_empty() || class.contains(':') {
        return Err(RateLimitError::InvalidClass(class.to_owned()));
    }
    Ok(())
}

/// A `Limited` decision; a retry time of zero is raised to 1 µs so callers
/// never see "limited, retry now".
fn limited(retry_us: u64) -> Decision {
    Decision::Limited {
        retry_after: Duration::from_micros(retry_us.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_share_a_budget_per_64_and_ipv4_is_exact() {
        let key = |s: &str| address_key(s.parse().expect("test address"));
        assert_eq!(key("203.0.113.9"), "203.0.113.9");
        assert_ne!(key("203.0.113.9"), key("203.0.113.10"));
        assert_eq!(key("2001:db8:1:2::1"), "2001:db8:1:2::/64");
        assert_eq!(
            key("2001:db8:1:2:ffff:1234:5678:9abc"),
            key("2001:db8:1:2::1")
        );
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::ffff:203.0.113.9"), "203.0.113.9");
    }
}
