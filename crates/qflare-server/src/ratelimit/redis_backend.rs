//! The Redis backend: [`RedisRateLimiter`], one budget per key shared by
//! several server replicas.
//!
//! Each check runs `gcra.lua` (the step of `gcra.rs`, written for Redis and
//! against Redis's clock) atomically with `EVALSHA`. This file owns the
//! connection settings, key naming, decoding the script's reply and sorting
//! Redis errors into [`RateLimitError`] variants.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Decision, RateLimit, RateLimitError, RateLimiter, limited, validate_class};

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

/// The Redis side of [`RedisRateLimiter`]: one GCRA step, atomically.
///
/// Keys and numbers arrive as `KEYS`/`ARGV`, never spliced into the source, so
/// caller-supplied bytes cannot change the script (and its SHA1 stays constant,
/// letting `EVALSHA` hit the script cache).
const GCRA_SCRIPT: &str = include_str!("gcra.lua");

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

/// Rate limiter backed by Redis, shared by several server replicas.
///
/// Each check is one `EVALSHA` of an atomic script, keyed
/// `{prefix}{class}:{key}`; see the [module documentation](super).
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
    use std::hash::{BuildHasher, RandomState};

    use super::super::{DEFAULT_KEY_PREFIX, connect};
    use super::*;

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
