//! The in-process backend: [`MemoryRateLimiter`], the default and right for a
//! single replica.
//!
//! It keeps one TAT per (class, key) in a sharded, capped table and runs the
//! step from `gcra.rs` on it under a `std` mutex. Its memory bound and what
//! happens when it is reached are described in the [parent module](super).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::gcra::{Gcra, micros};
use super::{Decision, RateLimit, RateLimitError, RateLimiter, limited, validate_class};

/// How many (class, key) pairs [`MemoryRateLimiter::new`] tracks at most.
///
/// An entry costs roughly 16 bytes of payload plus hash-table overhead, so the
/// cap bounds the table at a few tens of MiB however many keys an attacker sprays.
pub const DEFAULT_MAX_KEYS: usize = 1 << 20;

/// How long a caller is told to wait when a [`RateLimit`] admits nothing
/// (see [`MemoryRateLimiter::check_at`]): one minute, the unit of the limit.
const REFUSE_ALL_RETRY: Duration = Duration::from_secs(60);

/// Number of independently locked shards of the in-memory table. A power of
/// two well above the core count keeps lock contention negligible.
const SHARDS: usize = 16;

/// A shard does not scan for expired entries until it holds this many (or its
/// cap, if smaller): small tables cost nothing to keep.
const MIN_PRUNE_LEN: usize = 256;

/// In-process rate limiter; the default, and right for a single replica.
///
/// See the [module documentation](super) for the memory bound and what happens
/// when it is reached.
pub struct MemoryRateLimiter {
    /// Keyed hash of (class, key). Random per limiter, so an attacker cannot
    /// choose keys that collide, either in the tables or on purpose to share
    /// someone else's budget.
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
    max_keys_per_shard: usize,
    /// Origin of the monotonic clock `check` passes to `check_at`.
    epoch: Instant,
}

/// One lock's worth of the in-memory table.
#[derive(Debug)]
struct Shard {
    /// TAT (µs since the limiter's epoch) by hash of (class, key).
    tats: HashMap<u64, u64>,
    /// Table size at which inserting a new key first tries to prune. Doubles
    /// with the live size after each prune, so pruning costs O(1) amortized
    /// per insert.
    prune_at: usize,
    /// No stored TAT is earlier than this, so no entry can be pruned before
    /// `now` reaches it: lets a full table refuse new keys without rescanning.
    earliest_tat: u64,
    /// Whether the shard is refusing new keys, to log transitions rather than
    /// every refused request.
    saturated: bool,
}

impl Shard {
    fn new(max_keys: usize) -> Self {
        Self {
            tats: HashMap::new(),
            prune_at: MIN_PRUNE_LEN.min(max_keys),
            earliest_tat: u64::MAX,
            saturated: false,
        }
    }

    /// Drops every entry whose TAT has passed (they mean the same as absent).
    fn prune(&mut self, now: u64, max_keys: usize) {
        if now < self.earliest_tat {
            return;
        }
        let mut earliest = u64::MAX;
        self.tats.retain(|_, tat| {
            let live = *tat > now;
            if live {
                earliest = earliest.min(*tat);
            }
            live
        });
        self.earliest_tat = earliest;
        let len = self.tats.len();
        self.prune_at = len
            .saturating_mul(2)
            .clamp(MIN_PRUNE_LEN.min(max_keys), max_keys);
        // Give memory back after a spray has passed, without shrinking on
        // every small fluctuation.
        if self.tats.capacity() > len.saturating_mul(4).max(MIN_PRUNE_LEN) {
            self.tats.shrink_to(len.saturating_mul(2));
        }
    }
}

impl MemoryRateLimiter {
    /// A limiter tracking at most [`DEFAULT_MAX_KEYS`] keys.
    pub fn new() -> Self {
        Self::with_max_keys(DEFAULT_MAX_KEYS)
    }

    /// A limiter tracking at most about `max_keys` (class, key) pairs.
    ///
    /// The cap is split evenly over 16 shards, so the effective cap is
    /// `max_keys` rounded up to a multiple of 16 (and at least 16).
    pub fn with_max_keys(max_keys: usize) -> Self {
        let max_keys_per_shard = max_keys.div_ceil(SHARDS).max(1);
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(max_keys_per_shard)))
                .collect(),
            max_keys_per_shard,
            epoch: Instant::now(),
        }
    }

    /// Number of (class, key) pairs currently held, live or not yet pruned.
    pub fn tracked_keys(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).tats.len()).sum()
    }

    /// Same as [`RateLimiter::check`] but at an explicit time (for tests and for
    /// the trait impl, which passes a monotonic now).
    ///
    /// `now` counts from an arbitrary epoch that must stay the same for the
    /// life of the limiter. A limit with a zero field admits nothing: it is
    /// answered with `Limited { retry_after: 60 s }` and leaves no state
    /// (`check` reports [`RateLimitError::InvalidLimit`] instead). When the
    /// key's shard is full of live entries, a key not yet tracked is limited
    /// until the earliest of them expires.
    pub fn check_at(&self, class: &str, key: &str, limit: &RateLimit, now: Duration) -> Decision {
        let Some(gcra) = Gcra::new(limit) else {
            return Decision::Limited {
                retry_after: REFUSE_ALL_RETRY,
            };
        };
        let now = micros(now);
        let hash = self.hasher.hash_one((class, key));
        // The table hashes keys again with its own random state, so taking the
        // shard from the top bits keeps the two choices independent.
        let shard_index = usize::try_from(hash >> 60).unwrap_or(0) % SHARDS;
        let mut shard = lock(&self.shards[shard_index]);

        if let Some(tat) = shard.tats.get_mut(&hash) {
            return match gcra.step(Some(*tat), now) {
                Ok(new_tat) => {
                    *tat = new_tat;
                    Decision::Allowed
                }
                Err(retry_us) => limited(retry_us),
            };
        }

        // A new key needs room. Prune first when the shard is big enough for
        // that to be worth a scan; `prune` skips the scan when nothing can
        // have expired yet.
        if shard.tats.len() >= shard.prune_at {
            shard.prune(now, self.max_keys_per_shard);
        }
        if shard.tats.len() >= self.max_keys_per_shard {
            // Refuse-safe: growing without bound would let a key-spraying
            // client exhaust memory, so an untracked key waits until an entry
            // can expire. Tracked keys are unaffected.
            if !shard.saturated {
                shard.saturated = true;
                tracing::warn!(
                    shard = shard_index,
                    max_keys = self.max_keys_per_shard,
                    "rate-limit table full of live keys; refusing new keys until some expire"
                );
            }
            return limited(shard.earliest_tat.saturating_sub(now));
        }
        if shard.saturated {
            shard.saturated = false;
            tracing::info!(
                shard = shard_index,
                "rate-limit table accepting new keys again"
            );
        }

        match gcra.step(None, now) {
            Ok(new_tat) => {
                shard.tats.insert(hash, new_tat);
                shard.earliest_tat = shard.earliest_tat.min(new_tat);
                Decision::Allowed
            }
            // Unreachable with burst ≥ 1 (an empty TAT always admits), but a
            // refusal needs no state, so there is nothing to undo.
            Err(retry_us) => limited(retry_us),
        }
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A shard holds plain integers that are consistent after every statement,
    // so a panic elsewhere while holding the lock leaves nothing to repair.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for MemoryRateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The table itself is large and meaningless as hashes; report its size.
        f.debug_struct("MemoryRateLimiter")
            .field("tracked_keys", &self.tracked_keys())
            .field("max_keys", &self.max_keys_per_shard.saturating_mul(SHARDS))
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn check(
        &self,
        class: &str,
        key: &str,
        limit: &RateLimit,
    ) -> Result<Decision, RateLimitError> {
        limit.validate()?;
        // Same rule as the Redis backend, so a class that works in development
        // cannot start failing in production.
        validate_class(class)?;
        Ok(self.check_at(class, key, limit, self.epoch.elapsed()))
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
