//! Wall-clock time as the server reads it: injectable, so tests expire
//! sessions, tokens and rounds without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};

/// Wall-clock time in Unix seconds, injectable so tests can expire things without sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix seconds now.
    fn now(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// Starts at `now`.
    pub fn new(now: u64) -> Self {
        Self(AtomicU64::new(now))
    }

    /// Moves forward by `secs`.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Unix seconds as the store counts them (`i64`), saturating.
pub fn store_time(unix: u64) -> i64 {
    i64::try_from(unix).unwrap_or(i64::MAX)
}
