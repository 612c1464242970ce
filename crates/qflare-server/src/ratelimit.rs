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
//! * [`connect`] picks the backend from configuration.
//!
//! This module does not decide what happens when Redis is down: `check` returns
//! [`RateLimitError::Unavailable`] or [`RateLimitError::Timeout`] and the caller
//! chooses to fail open or closed.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

/// Key prefix [`connect`] uses for the Redis backend.
pub const DEFAULT_KEY_PREFIX: &str = "qflare:rl:";

/// How many (class, key) pairs [`MemoryRateLimiter::new`] tracks at most.
///
/// An entry costs roughly 16 bytes of payload plus hash-table overhead, so the
/// cap bounds the table at a few tens of MiB however many keys an attacker sprays.
pub const DEFAULT_MAX_KEYS: usize = 1 << 20;

/// Upper bound on the tolerance `τ` (2^50 µs, about 35.7 years).
///
/// Any burst that would need more is indistinguishable from "unlimited" in
/// practice; the cap keeps `now + τ + T` below 2^53 µs so the Redis script's
/// double-precision arithmetic stays exact.
pub const MAX_TOLERANCE: Duration = Duration::from_micros(1 << 50);

/// Upper bound on one Redis check, including waiting for a reconnection.
///
/// A rate-limit check sits in front of every request, so a stalled Redis must
/// turn into a prompt error rather than into stalled requests.
pub const REDIS_CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// Upper bound on [`RedisRateLimiter::connect`], reconnection attempts included.
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Timeout of one TCP/handshake attempt to Redis.
const REDIS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Timeout of one Redis command once connected.
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
/// Reconnection attempts after a failed one; kept small because the check
/// timeout caps how long a request waits anyway.
const REDIS_RECONNECT_RETRIES: usize = 3;
/// Backoff bounds between reconnection attempts.
const REDIS_RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
const REDIS_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// How long a caller is told to wait when a [`RateLimit`] admits nothing
/// (see [`MemoryRateLimiter::check_at`]): one minute, the unit of the limit.
const REFUSE_ALL_RETRY: Duration = Duration::from_secs(60);

/// Number of independently locked shards of the in-memory table. A power of
/// two well above the core count keeps lock contention negligible.
const SHARDS: usize = 16;

/// A shard does not scan for expired entries until it holds this many (or its
/// cap, if smaller): small tables cost nothing to keep.
const MIN_PRUNE_LEN: usize = 256;

/// The Redis side of [`RedisRateLimiter`]: one GCRA step, atomically.
///
/// Keys and numbers arrive as `KEYS`/`ARGV`, never spliced into the source, so
/// caller-supplied bytes cannot change the script (and its SHA1 stays constant,
/// letting `EVALSHA` hit the script cache).
const GCRA_SCRIPT: &str = r"
-- KEYS[1]: the TAT of one (class, key), integer microseconds since the Unix epoch.
-- ARGV[1]: emission interval T; ARGV[2]: tolerance tau; both integer microseconds.
-- Returns {1, 0} when allowed, {0, retry_after_us} when limited.

-- Redis before 5.0 refuses writes after TIME unless the script replicates its
-- effects instead of itself; later versions always do and keep this as a no-op.
if redis.replicate_commands then redis.replicate_commands() end

-- The server's clock, so that replicas with skewed clocks share one timeline.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])

-- GET answers false for a missing key and tonumber(false) is nil. A missing or
-- past TAT both mean a full budget.
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end

local allow_at = tat - tolerance
if now < allow_at then
  return {0, allow_at - now}
end

local new_tat = tat + interval
-- Once new_tat has passed, the key means the same as no key: expire it then,
-- rounded up to the next millisecond plus one. string.format keeps all digits
-- (Lua's default number formatting would round to 14 significant digits).
local ttl_ms = math.floor((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl_ms))
return {1, 0}
";

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
    fn gcra(&self) -> Result<Gcra, RateLimitError> {
        Gcra::new(self).ok_or(RateLimitError::InvalidLimit {
            per_minute: self.per_minute,
            burst: self.burst,
        })
    }
}

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

impl RateLimitError {
    /// Sorts a Redis error into "could not talk to Redis" and "Redis said no".
    fn from_redis(err: redis::RedisError) -> Self {
        if err.is_io_error()
            || err.is_timeout()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
        {
            Self::Unavailable(err)
        } else {
            Self::Script(err)
        }
    }
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

/// Saturating conversion to whole microseconds.
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// GCRA parameters of a valid [`RateLimit`], in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gcra {
    /// Emission interval `T`, at least 1.
    interval: u64,
    /// Tolerance `τ`, at most [`MAX_TOLERANCE`].
    tolerance: u64,
}

impl Gcra {
    /// `None` when the limit admits nothing.
    fn new(limit: &RateLimit) -> Option<Self> {
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
    fn step(self, stored_tat: Option<u64>, now: u64) -> Result<u64, u64> {
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

/// In-process rate limiter; the default, and right for a single replica.
///
/// See the [module documentation](self) for the memory bound and what happens
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

/// A `Limited` decision; a retry time of zero is raised to 1 µs so callers
/// never see "limited, retry now".
fn limited(retry_us: u64) -> Decision {
    Decision::Limited {
        retry_after: Duration::from_micros(retry_us.max(1)),
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

/// Rate limiter backed by Redis, shared by several server replicas.
///
/// Each check is one `EVALSHA` of an atomic script, keyed
/// `{prefix}{class}:{key}`; see the [module documentation](self).
pub struct RedisRateLimiter {
    /// Cheap to clone; every clone shares one multiplexed connection and
    /// reconnects it when it drops.
    connection: ConnectionManager,
    script: redis::Script,
    key_prefix: Vec<u8>,
}

impl RedisRateLimiter {
    /// Connects to Redis at `url` and loads the script; keys are named
    /// `{key_prefix}{class}:{key}`.
    ///
    /// Fails with [`RateLimitError::InvalidUrl`], [`RateLimitError::Unavailable`]
    /// or [`RateLimitError::Timeout`] (after [`REDIS_CONNECT_TIMEOUT`]), or
    /// [`RateLimitError::Script`] when the server cannot run Lua scripts, so a
    /// misconfiguration shows at startup rather than on the first request.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<Self, RateLimitError> {
        let client = redis::Client::open(url).map_err(RateLimitError::InvalidUrl)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_ATTEMPT_TIMEOUT))
            .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
            .set_number_of_retries(REDIS_RECONNECT_RETRIES)
            .set_min_delay(REDIS_RECONNECT_MIN_DELAY)
            .set_max_delay(REDIS_RECONNECT_MAX_DELAY);
        let script = redis::Script::new(GCRA_SCRIPT);
        let setup = async {
            let mut connection = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(RateLimitError::from_redis)?;
            script
                .prepare_invoke()
                .load_async(&mut connection)
                .await
                .map_err(RateLimitError::from_redis)?;
            Ok::<_, RateLimitError>(connection)
        };
        let connection = tokio::time::timeout(REDIS_CONNECT_TIMEOUT, setup)
            .await
            .map_err(|_| RateLimitError::Timeout(REDIS_CONNECT_TIMEOUT))??;
        Ok(Self {
            connection,
            script,
            key_prefix: key_prefix.as_bytes().to_vec(),
        })
    }

    /// `{prefix}{class}:{key}` as raw bytes: keys may hold any bytes, and they
    /// travel as `KEYS[1]`, never as script source.
    fn redis_key(&self, class: &str, key: &str) -> Vec<u8> {
        let mut name = Vec::with_capacity(self.key_prefix.len() + class.len() + 1 + key.len());
        name.extend_from_slice(&self.key_prefix);
        name.extend_from_slice(class.as_bytes());
        name.push(b':');
        name.extend_from_slice(key.as_bytes());
        name
    }
}

/// Turns the script's `{allowed, retry_after_us}` into a [`Decision`].
fn decode_reply(allowed: i64, retry_us: i64) -> Result<Decision, RateLimitError> {
    match (allowed, u64::try_from(retry_us)) {
        (1, _) => Ok(Decision::Allowed),
        (0, Ok(retry_us)) if retry_us > 0 => Ok(limited(retry_us)),
        _ => Err(RateLimitError::UnexpectedReply(format!(
            "{{{allowed}, {retry_us}}}"
        ))),
    }
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection is left out: its details include the server address
        // and possibly credentials.
        f.debug_struct("RedisRateLimiter")
            .field("key_prefix", &String::from_utf8_lossy(&self.key_prefix))
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check(
        &self,
        class: &str,
        key: &str,
        limit: &RateLimit,
    ) -> Result<Decision, RateLimitError> {
        let gcra = limit.gcra()?;
        validate_class(class)?;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.redis_key(class, key))
            .arg(gcra.interval)
            .arg(gcra.tolerance);
        let mut connection = self.connection.clone();
        let reply = tokio::time::timeout(
            REDIS_CHECK_TIMEOUT,
            invocation.invoke_async::<(i64, i64)>(&mut connection),
        )
        .await;
        match reply {
            Ok(Ok((allowed, retry_us))) => decode_reply(allowed, retry_us),
            Ok(Err(err)) => {
                let err = RateLimitError::from_redis(err);
                tracing::debug!(error = %err, "Redis rate-limit check failed");
                Err(err)
            }
            Err(_) => {
                tracing::debug!("Redis rate-limit check timed out");
                Err(RateLimitError::Timeout(REDIS_CHECK_TIMEOUT))
            }
        }
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn at_secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    // ---- GCRA core and types ---------------------------------------------

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

    #[test]
    fn script_replies_decode_strictly() {
        assert_eq!(decode_reply(1, 0).unwrap(), Decision::Allowed);
        assert_eq!(
            decode_reply(0, 1_500).unwrap(),
            Decision::Limited {
                retry_after: Duration::from_micros(1_500)
            }
        );
        assert!(matches!(
            decode_reply(0, 0),
            Err(RateLimitError::UnexpectedReply(_))
        ));
        assert!(matches!(
            decode_reply(0, -5),
            Err(RateLimitError::UnexpectedReply(_))
        ));
        assert!(matches!(
            decode_reply(2, 0),
            Err(RateLimitError::UnexpectedReply(_))
        ));
    }

    // ---- memory backend --------------------------------------------------

    #[test]
    fn burst_passes_then_limited_then_recovers() {
        let limiter = MemoryRateLimiter::new();
        let limit = RateLimit {
            per_minute: 60,
            burst: 5,
        };
        let t0 = at_secs(1_000);
        for i in 0..5 {
            assert_eq!(
                limiter.check_at("enroll", "203.0.113.9", &limit, t0),
                Decision::Allowed,
                "request {i}"
            );
        }
        let Decision::Limited { retry_after } =
            limiter.check_at("enroll", "203.0.113.9", &limit, t0)
        else {
            panic!("request past the burst was allowed");
        };
        // Five requests at once put the TAT 5 T ahead; the sixth may come once
        // one T of it has drained: retry_after == T.
        assert_eq!(retry_after, Duration::from_secs(1));
        // Limited requests are not counted: asking again does not move it.
        assert_eq!(
            limiter.check_at("enroll", "203.0.113.9", &limit, t0),
            Decision::Limited { retry_after }
        );
        // Just short of it: still limited, with the remainder to wait.
        assert_eq!(
            limiter.check_at(
                "enroll",
                "203.0.113.9",
                &limit,
                t0 + retry_after - Duration::from_micros(1)
            ),
            Decision::Limited {
                retry_after: Duration::from_micros(1)
            }
        );
        let t1 = t0 + retry_after;
        assert_eq!(
            limiter.check_at("enroll", "203.0.113.9", &limit, t1),
            Decision::Allowed
        );
        assert!(matches!(
            limiter.check_at("enroll", "203.0.113.9", &limit, t1),
            Decision::Limited { .. }
        ));
        // After a full quiet period the whole burst is back.
        let t2 = t1 + Duration::from_secs(5);
        for _ in 0..5 {
            assert_eq!(
                limiter.check_at("enroll", "203.0.113.9", &limit, t2),
                Decision::Allowed
            );
        }
        assert!(matches!(
            limiter.check_at("enroll", "203.0.113.9", &limit, t2),
            Decision::Limited { .. }
        ));
    }

    #[test]
    fn sustained_rate_at_exactly_per_minute_passes_indefinitely() {
        let limiter = MemoryRateLimiter::new();
        // 7 per minute does not divide a minute into whole microseconds, which
        // is where rounding the wrong way would show.
        for (per_minute, burst) in [(7_u32, 1_u32), (60, 1), (600, 3), (1_000_000, 1)] {
            let limit = RateLimit { per_minute, burst };
            let key = format!("{per_minute}/{burst}");
            for i in 0..20_000_u64 {
                // The i-th request exactly on schedule, truncated to µs.
                let now = Duration::from_micros(i * 60_000_000 / u64::from(per_minute));
                assert_eq!(
                    limiter.check_at("device", &key, &limit, now),
                    Decision::Allowed,
                    "{key}: request {i} at {now:?}"
                );
            }
        }
    }

    #[test]
    fn faster_than_the_rate_is_held_to_the_rate() {
        let limiter = MemoryRateLimiter::new();
        let limit = RateLimit {
            per_minute: 60,
            burst: 10,
        };
        // Ten requests a second for a minute: the burst plus one per second pass.
        let allowed = (0..600_u64)
            .filter(|i| {
                limiter.check_at("public", "k", &limit, Duration::from_millis(i * 100))
                    == Decision::Allowed
            })
            .count();
        assert_eq!(allowed, 10 + 59);
    }

    #[test]
    fn classes_and_keys_have_separate_budgets() {
        let limiter = MemoryRateLimiter::new();
        let limit = RateLimit {
            per_minute: 1,
            burst: 1,
        };
        let now = at_secs(5);
        assert_eq!(
            limiter.check_at("enroll", "a", &limit, now),
            Decision::Allowed
        );
        assert!(matches!(
            limiter.check_at("enroll", "a", &limit, now),
            Decision::Limited { .. }
        ));
        assert_eq!(
            limiter.check_at("enroll", "b", &limit, now),
            Decision::Allowed
        );
        assert_eq!(
            limiter.check_at("sessions", "a", &limit, now),
            Decision::Allowed
        );
        // Splitting the same bytes differently is a different pair.
        assert_eq!(
            limiter.check_at("enrol", "la", &limit, now),
            Decision::Allowed
        );
        assert!(matches!(
            limiter.check_at("sessions", "a", &limit, now),
            Decision::Limited { .. }
        ));
        assert_eq!(limiter.tracked_keys(), 4);
    }

    #[test]
    fn retry_after_is_never_zero_and_is_exact() {
        let limiter = MemoryRateLimiter::new();
        let limit = RateLimit {
            per_minute: 7,
            burst: 3,
        };
        let mut now = Duration::ZERO;
        let mut limited_seen = 0;
        for step in 0..5_000_u64 {
            match limiter.check_at("admin", "k", &limit, now) {
                Decision::Allowed => {}
                Decision::Limited { retry_after } => {
                    limited_seen += 1;
                    assert!(retry_after > Duration::ZERO);
                    // Waiting exactly that long is enough.
                    assert_eq!(
                        limiter.check_at("admin", "k", &limit, now + retry_after),
                        Decision::Allowed
                    );
                    now += retry_after;
                }
            }
            // Irregular gaps, shorter than T on average.
            now += Duration::from_micros((step * 7_919) % 5_000_000);
        }
        assert!(limited_seen > 100, "only {limited_seen} limited");
    }

    #[test]
    fn spraying_distinct_keys_keeps_the_table_bounded() {
        let limiter = MemoryRateLimiter::new();
        let limit = RateLimit {
            per_minute: 60,
            burst: 2,
        };
        let mut peak = 0;
        // 100,000 distinct keys, one per millisecond: about 1,000 are live at
        // any moment (each TAT lies 1 s ahead), and only pruning stops the
        // other 99,000 from piling up.
        for i in 0..100_000_u64 {
            let key = format!("198.51.{}.{}", i / 256, i % 256);
            let now = Duration::from_millis(i);
            assert_eq!(
                limiter.check_at("public", &key, &limit, now),
                Decision::Allowed,
                "key {i}"
            );
            peak = peak.max(limiter.tracked_keys());
        }
        assert!(peak <= 2 * SHARDS * MIN_PRUNE_LEN, "table grew to {peak}");
        // Once everything has expired, the next prune empties the shard it runs on.
        let later = Duration::from_secs(200);
        for i in 0..10_000_u64 {
            limiter.check_at("public", &format!("late-{i}"), &limit, later);
        }
        assert!(limiter.tracked_keys() <= 10_000 + SHARDS * MIN_PRUNE_LEN);
    }

    #[test]
    fn a_full_table_refuses_new_keys_but_serves_tracked_ones() {
        let max_keys = 1_024;
        let limiter = MemoryRateLimiter::with_max_keys(max_keys);
        // Burst 2, so a tracked key still has budget left after the spray.
        let limit = RateLimit {
            per_minute: 60,
            burst: 2,
        };
        let now = at_secs(10);
        // Keys sprayed within one instant all stay live, so pruning cannot help.
        let mut first_refused = None;
        let mut allowed = 0;
        for i in 0..100_000_u64 {
            match limiter.check_at("public", &format!("spray-{i}"), &limit, now) {
                Decision::Allowed => allowed += 1,
                Decision::Limited { retry_after } => {
                    // Until the earliest live entry expires: one T.
                    assert_eq!(retry_after, Duration::from_secs(1));
                    first_refused.get_or_insert(i);
                }
            }
        }
        assert_eq!(allowed, max_keys);
        assert_eq!(limiter.tracked_keys(), max_keys);
        assert!(first_refused.unwrap() < max_keys as u64 * 2);
        // While the table is full, a key admitted before it filled (the very
        // first always is) keeps its normal budget, and a new one waits.
        assert_eq!(
            limiter.check_at("public", "spray-0", &limit, now),
            Decision::Allowed
        );
        assert!(matches!(
            limiter.check_at("public", "spray-0", &limit, now),
            Decision::Limited { .. }
        ));
        assert!(matches!(
            limiter.check_at("enroll", "newcomer", &limit, now),
            Decision::Limited { .. }
        ));
        // Once the sprayed entries expire, new keys get in again.
        let later = now + Duration::from_secs(3);
        assert_eq!(
            limiter.check_at("enroll", "newcomer", &limit, later),
            Decision::Allowed
        );
        assert!(limiter.tracked_keys() <= max_keys);
    }

    #[test]
    fn zero_limits_admit_nothing_and_check_reports_them() {
        let limiter = MemoryRateLimiter::new();
        for limit in [
            RateLimit {
                per_minute: 0,
                burst: 5,
            },
            RateLimit {
                per_minute: 5,
                burst: 0,
            },
            RateLimit {
                per_minute: 0,
                burst: 0,
            },
        ] {
            assert_eq!(
                limiter.check_at("enroll", "k", &limit, at_secs(1)),
                Decision::Limited { retry_after: MIN }
            );
            assert!(matches!(
                limit.validate(),
                Err(RateLimitError::InvalidLimit { .. })
            ));
        }
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[tokio::test]
    async fn trait_check_uses_the_monotonic_clock_and_validates_input() {
        let limiter: Arc<dyn RateLimiter> = connect(None).await.unwrap();
        assert_eq!(limiter.backend(), "memory");
        let limit = RateLimit {
            per_minute: 1,
            burst: 2,
        };
        assert_eq!(
            limiter.check("enroll", "k", &limit).await.unwrap(),
            Decision::Allowed
        );
        assert_eq!(
            limiter.check("enroll", "k", &limit).await.unwrap(),
            Decision::Allowed
        );
        let Decision::Limited { retry_after } = limiter.check("enroll", "k", &limit).await.unwrap()
        else {
            panic!("third request within a minute was allowed");
        };
        // Nearly a full T (60 s) away; the real time that passed is tiny.
        assert!(
            retry_after > Duration::from_secs(50) && retry_after <= MIN,
            "{retry_after:?}"
        );

        let err = limiter
            .check(
                "enroll",
                "k",
                &RateLimit {
                    per_minute: 0,
                    burst: 1,
                },
            )
            .await;
        assert!(matches!(
            err,
            Err(RateLimitError::InvalidLimit {
                per_minute: 0,
                burst: 1
            })
        ));
        for class in ["", "en:roll"] {
            assert!(matches!(
                limiter.check(class, "k", &limit).await,
                Err(RateLimitError::InvalidClass(_))
            ));
        }
    }

    #[test]
    fn concurrent_checks_never_exceed_the_burst() {
        let limiter = MemoryRateLimiter::new();
        let limit = RateLimit {
            per_minute: 1,
            burst: 100,
        };
        let now = at_secs(42);
        let allowed: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..500)
                            .filter(|_| {
                                limiter.check_at("device", "shared", &limit, now)
                                    == Decision::Allowed
                            })
                            .count()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap())
                .sum()
        });
        assert_eq!(allowed, 100);
    }

    #[test]
    fn extreme_times_and_limits_do_not_panic() {
        let limiter = MemoryRateLimiter::new();
        let limits = [
            RateLimit {
                per_minute: u32::MAX,
                burst: u32::MAX,
            },
            RateLimit {
                per_minute: 1,
                burst: u32::MAX,
            },
            RateLimit {
                per_minute: 1,
                burst: 1,
            },
        ];
        for limit in limits {
            for now in [
                Duration::ZERO,
                Duration::from_secs(u64::MAX / 2),
                Duration::MAX,
            ] {
                let _ = limiter.check_at("public", "edge", &limit, now);
            }
        }
        // A burst far beyond what the tolerance cap covers still works.
        let huge = RateLimit {
            per_minute: 1,
            burst: u32::MAX,
        };
        for _ in 0..1_000 {
            assert_eq!(
                limiter.check_at("public", "huge", &huge, at_secs(1)),
                Decision::Allowed
            );
        }
    }

    // ---- Redis backend ---------------------------------------------------

    /// The test server, or `None` after printing why the test is skipped.
    fn redis_url(test: &str) -> Option<String> {
        match std::env::var("QFLARE_TEST_REDIS_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                eprintln!(
                    "SKIPPED {test}: set QFLARE_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379) to run it"
                );
                None
            }
        }
    }

    /// A key prefix no other test or run shares, so runs never see each
    /// other's budgets (keys expire by themselves within seconds).
    fn unique_prefix() -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        let salt = RandomState::new().hash_one((std::process::id(), nanos));
        format!("qflare:rl:test:{salt:016x}:")
    }

    #[tokio::test]
    async fn redis_burst_passes_then_limited_with_retry_after() {
        let Some(url) = redis_url("redis_burst_passes_then_limited_with_retry_after") else {
            return;
        };
        let limiter = RedisRateLimiter::connect(&url, &unique_prefix())
            .await
            .unwrap();
        assert_eq!(limiter.backend(), "redis");
        let limit = RateLimit {
            per_minute: 60,
            burst: 3,
        };
        for i in 0..3 {
            assert_eq!(
                limiter
                    .check("enroll", "203.0.113.9", &limit)
                    .await
                    .unwrap(),
                Decision::Allowed,
                "request {i}"
            );
        }
        let Decision::Limited { retry_after } = limiter
            .check("enroll", "203.0.113.9", &limit)
            .await
            .unwrap()
        else {
            panic!("request past the burst was allowed");
        };
        // One T (1 s) less the real time the four round trips took.
        assert!(
            retry_after > Duration::from_millis(500) && retry_after <= Duration::from_secs(1),
            "{retry_after:?}"
        );
        // Other classes and keys are untouched.
        assert_eq!(
            limiter
                .check("sessions", "203.0.113.9", &limit)
                .await
                .unwrap(),
            Decision::Allowed
        );
        assert_eq!(
            limiter
                .check("enroll", "203.0.113.10", &limit)
                .await
                .unwrap(),
            Decision::Allowed
        );
        // The key is set to expire once it stops mattering: within T + τ.
        let key = limiter.redis_key("enroll", "203.0.113.9");
        let mut connection = limiter.connection.clone();
        let ttl_ms: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(ttl_ms > 0 && ttl_ms <= 3_001, "PTTL {ttl_ms}");
    }

    #[tokio::test]
    async fn redis_replicas_share_one_budget() {
        let Some(url) = redis_url("redis_replicas_share_one_budget") else {
            return;
        };
        let prefix = unique_prefix();
        // Two limiters, two connections: two server replicas.
        let first = RedisRateLimiter::connect(&url, &prefix).await.unwrap();
        let second = RedisRateLimiter::connect(&url, &prefix).await.unwrap();
        let limit = RateLimit {
            per_minute: 60,
            burst: 4,
        };
        for replica in [&first, &second, &first, &second] {
            assert_eq!(
                replica.check("device", "dev-1", &limit).await.unwrap(),
                Decision::Allowed
            );
        }
        assert!(matches!(
            first.check("device", "dev-1", &limit).await.unwrap(),
            Decision::Limited { .. }
        ));
        assert!(matches!(
            second.check("device", "dev-1", &limit).await.unwrap(),
            Decision::Limited { .. }
        ));
    }

    #[tokio::test]
    async fn redis_recovers_after_retry_after() {
        let Some(url) = redis_url("redis_recovers_after_retry_after") else {
            return;
        };
        let limiter = RedisRateLimiter::connect(&url, &unique_prefix())
            .await
            .unwrap();
        // T = 100 ms, so recovery takes about 100 ms of real time: Redis owns
        // the clock here, so this is the one test that has to wait.
        let limit = RateLimit {
            per_minute: 600,
            burst: 1,
        };
        assert_eq!(
            limiter.check("admin", "k", &limit).await.unwrap(),
            Decision::Allowed
        );
        let Decision::Limited { mut retry_after } =
            limiter.check("admin", "k", &limit).await.unwrap()
        else {
            panic!("second request within T was allowed");
        };
        assert!(retry_after <= Duration::from_millis(100), "{retry_after:?}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            // Wait exactly as a well-behaved client would, then ask again.
            tokio::time::sleep(retry_after).await;
            match limiter.check("admin", "k", &limit).await.unwrap() {
                Decision::Allowed => break,
                Decision::Limited { retry_after: next } => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "not recovered within 1 s"
                    );
                    retry_after = next;
                }
            }
        }
        // The recovered request spent the budget again.
        assert!(matches!(
            limiter.check("admin", "k", &limit).await.unwrap(),
            Decision::Limited { .. }
        ));
    }

    #[tokio::test]
    async fn redis_keys_with_arbitrary_bytes_stay_data() {
        let Some(url) = redis_url("redis_keys_with_arbitrary_bytes_stay_data") else {
            return;
        };
        let limiter = RedisRateLimiter::connect(&url, &unique_prefix())
            .await
            .unwrap();
        let limit = RateLimit {
            per_minute: 60,
            burst: 1,
        };
        let hostile = "x') redis.call('FLUSHALL') --\n\0\u{7f}💥 *";
        assert_eq!(
            limiter.check("public", hostile, &limit).await.unwrap(),
            Decision::Allowed
        );
        assert!(matches!(
            limiter.check("public", hostile, &limit).await.unwrap(),
            Decision::Limited { .. }
        ));
        let mut connection = limiter.connection.clone();
        let exists: bool = redis::cmd("EXISTS")
            .arg(limiter.redis_key("public", hostile))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(exists);
    }

    #[tokio::test]
    async fn redis_reconnects_after_the_connection_drops() {
        let Some(url) = redis_url("redis_reconnects_after_the_connection_drops") else {
            return;
        };
        let prefix = unique_prefix();
        let limiter = RedisRateLimiter::connect(&url, &prefix).await.unwrap();
        let other = RedisRateLimiter::connect(&url, &prefix).await.unwrap();
        let limit = RateLimit {
            per_minute: 60,
            burst: 10,
        };
        assert_eq!(
            limiter.check("device", "d", &limit).await.unwrap(),
            Decision::Allowed
        );
        let mut connection = limiter.connection.clone();
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut connection)
            .await
            .unwrap();
        // Kill exactly our own connection (the server is shared with others).
        let mut killer = other.connection.clone();
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut killer)
            .await
            .unwrap();
        assert_eq!(killed, 1);
        // The first check may see the broken connection and fail as
        // Unavailable; that failure starts the reconnection, so one of the
        // next few succeeds without any waiting on our side.
        let mut outcomes = Vec::new();
        for _ in 0..5 {
            let outcome = limiter.check("device", "d", &limit).await;
            let ok = outcome.is_ok();
            outcomes.push(outcome);
            if ok {
                break;
            }
        }
        let last = outcomes.last().unwrap();
        assert!(matches!(last, Ok(Decision::Allowed)), "{outcomes:?}");
        for failure in &outcomes[..outcomes.len() - 1] {
            assert!(
                matches!(failure, Err(RateLimitError::Unavailable(_))),
                "{failure:?}"
            );
        }
        let new_id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_ne!(new_id, id);
    }

    #[tokio::test]
    async fn redis_rejects_bad_input_without_touching_redis() {
        let Some(url) = redis_url("redis_rejects_bad_input_without_touching_redis") else {
            return;
        };
        let limiter = connect(Some(&url)).await.unwrap();
        assert_eq!(limiter.backend(), "redis");
        let err = limiter
            .check(
                "enroll",
                "k",
                &RateLimit {
                    per_minute: 10,
                    burst: 0,
                },
            )
            .await;
        assert!(matches!(
            err,
            Err(RateLimitError::InvalidLimit {
                per_minute: 10,
                burst: 0
            })
        ));
        let err = limiter
            .check(
                "a:b",
                "k",
                &RateLimit {
                    per_minute: 10,
                    burst: 1,
                },
            )
            .await;
        assert!(matches!(err, Err(RateLimitError::InvalidClass(_))));
        assert!(format!("{limiter:?}").contains(DEFAULT_KEY_PREFIX));
    }

    #[tokio::test]
    async fn bad_url_and_unreachable_server_are_errors_not_hangs() {
        let err = RedisRateLimiter::connect("not a url", "p:")
            .await
            .unwrap_err();
        assert!(matches!(err, RateLimitError::InvalidUrl(_)), "{err:?}");
        // Port 1 on loopback refuses at once; the bounded reconnection
        // attempts end well inside the connect timeout.
        let err = RedisRateLimiter::connect("redis://127.0.0.1:1", "p:")
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                RateLimitError::Unavailable(_) | RateLimitError::Timeout(_)
            ),
            "{err:?}"
        );
    }
}
