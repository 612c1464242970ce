//! The pure GCRA step: the emission interval and tolerance of a [`RateLimit`],
//! and one step against a stored TAT. No I/O and no clock: the time is an
//! argument, so the arithmetic can be tested exactly.
//!
//! The algorithm is described in the [parent module](super).
//! `memory_backend.rs` calls [`Gcra::step`] directly; `redis_backend.rs` sends
//! [`Gcra`]'s two numbers to `gcra.lua`, which performs the same step inside
//! Redis against Redis's own clock.

use std::time::Duration;

use super::RateLimit;

/// Upper bound on the tolerance `τ` (2^50 µs, about 35.7 years).
///
/// Any burst that would need more is indistinguishable from "unlimited" in
/// practice; the cap keeps `now + τ + T` below 2^53 µs so the Redis script's
/// double-precision arithmetic stays exact.
pub const MAX_TOLERANCE: Duration = Duration::from_micros(1 << 50);

/// Saturating conversion to whole microseconds.
pub(super) fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// GCRA parameters of a valid [`RateLimit`], in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Gcra {
    /// Emission interval `T`, at least 1.
    pub(super) interval: u64,
    /// Tolerance `τ`, at most [`MAX_TOLERANCE`].
    pub(super) tolerance: u64,
}

impl Gcra {
    /// `None` when the limit admits nothing.
    pub(super) fn new(limit: &RateLimit) -> Option<Self> {
        if limit.per_minute == 0 || limit.burst == 0 {
            return None;
        }
        // Rounding down means a client at exactly `per_minute` is never
        // limited; the floor of 1 µs only matters above 60 million per minute.
        let interval = (60_000_000 / u64::from(limit.per_minute)).max(1);
        let tolerance = interval
            .saturating_mul(u64::from(limit.burst) - 1)
            .min(micros(MAX_TOLERANCE));
        Some(Self {
            interval,
            tolerance,
        })
    }

    /// One GCRA step at `now` against the stored TAT (`None`: no state).
    /// `Ok(new_tat)` when allowed, `Err(retry_after)` (> 0) when limited.
    pub(super) fn step(self, stored_tat: Option<u64>, now: u64) -> Result<u64, u64> {
        // A TAT in the past carries no information: the budget is full.
        let tat = stored_tat.map_or(now, |tat| tat.max(now));
        let allow_at = tat.saturating_sub(self.tolerance);
        if now >= allow_at {
            Ok(tat.saturating_add(self.interval))
        } else {
            Err(allow_at - now)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parameters_follow_the_limit() {
        let gcra = Gcra::new(&RateLimit {
            per_minute: 60,
            burst: 5,
        })
        .unwrap();
        assert_eq!(
            gcra,
            Gcra {
                interval: 1_000_000,
                tolerance: 4_000_000
            }
        );
        // 7 per minute does not divide evenly: T rounds down.
        let gcra = Gcra::new(&RateLimit {
            per_minute: 7,
            burst: 1,
        })
        .unwrap();
        assert_eq!(
            gcra,
            Gcra {
                interval: 8_571_428,
                tolerance: 0
            }
        );
        // Extreme values saturate instead of overflowing or reaching zero.
        let gcra = Gcra::new(&RateLimit {
            per_minute: u32::MAX,
            burst: u32::MAX,
        })
        .unwrap();
        assert_eq!(gcra.interval, 1);
        let gcra = Gcra::new(&RateLimit {
            per_minute: 1,
            burst: u32::MAX,
        })
        .unwrap();
        assert_eq!(gcra.tolerance, micros(MAX_TOLERANCE));
        assert!(
            Gcra::new(&RateLimit {
                per_minute: 0,
                burst: 1
            })
            .is_none()
        );
        assert!(
            Gcra::new(&RateLimit {
                per_minute: 1,
                burst: 0
            })
            .is_none()
        );
    }
}
