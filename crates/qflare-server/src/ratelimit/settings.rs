//! Configuration types of the rate limiter: [`RateLimit`], one sustained rate
//! and burst as it appears in the server's configuration.
//!
//! It is plain data (serde, validation); `gcra.rs` turns a valid limit into the
//! numbers both backends compute with, and the backends take it as an argument
//! on every check.

use serde::{Deserialize, Serialize};

use super::RateLimitError;
use super::gcra::Gcra;

/// A limit: sustained rate and burst.
///
/// `per_minute` requests per minute on average, with up to `burst` requests
/// back to back after a quiet period. Both must be at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per minute.
    pub per_minute: u32,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
}

impl RateLimit {
    /// Checks that the limit admits anything at all (`per_minute` and `burst` ≥ 1).
    pub fn validate(&self) -> Result<(), RateLimitError> {
        self.gcra().map(|_| ())
    }

    /// The GCRA parameters, or why there are none.
    pub(super) fn gcra(&self) -> Result<Gcra, RateLimitError> {
        Gcra::new(self).ok_or(RateLimitError::InvalidLimit {
            per_minute: self.per_minute,
            burst: self.burst,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_serde_round_trips_and_rejects_unknown_fields() {
        let limit: RateLimit = serde_json::from_str(r#"{"per_minute": 10, "burst": 5}"#).unwrap();
        assert_eq!(
            limit,
            RateLimit {
                per_minute: 10,
                burst: 5
            }
        );
        let text = serde_json::to_string(&limit).unwrap();
        assert_eq!(serde_json::from_str::<RateLimit>(&text).unwrap(), limit);
        assert!(
            serde_json::from_str::<RateLimit>(r#"{"per_minute": 10, "burst": 5, "per_hour": 1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<RateLimit>(r#"{"per_minute": 10}"#).is_err());
    }
}
