//! Shared state of a running server and the small services handlers use:
//! the clock, rate limiting, auditing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use qflare_protocol::crypto::sha256;
use qflare_protocol::secret::ct_eq;
use qflare_store::Store;
use serde_json::Value;

use crate::config::Config;
use crate::error::ApiError;
use crate::identity::ServerIdentity;
use crate::ledger::{AuditKind, Ledger};
use crate::metrics::Metrics;
use crate::ratelimit::{Decision, RateLimit, RateLimiter};

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

/// The client's address, attached to every request by the connection loop.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Everything a handler needs.
#[derive(Debug)]
pub struct AppState {
    /// The configuration the server started with.
    pub config: Config,
    /// Persistent state.
    pub store: Arc<dyn Store>,
    /// The server's keys and certificate.
    pub identity: Arc<ServerIdentity>,
    /// Request-rate limits.
    pub limiter: Arc<dyn RateLimiter>,
    /// The audit ledger.
    pub ledger: Ledger,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// The round controller and its enclave, when this server coordinates training.
    pub federation: Option<Arc<crate::federation::Federation>>,
    admin_token_hash: [u8; 32],
}

impl AppState {
    /// Assembles the state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        identity: Arc<ServerIdentity>,
        limiter: Arc<dyn RateLimiter>,
        ledger: Ledger,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        federation: Option<Arc<crate::federation::Federation>>,
        admin_token: &[u8],
    ) -> Self {
        Self {
            config,
            store,
            identity,
            limiter,
            ledger,
            metrics,
            clock,
            federation,
            admin_token_hash: sha256(admin_token),
        }
    }

    /// Unix seconds now.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Unix seconds now, as the store counts them.
    pub fn now_i64(&self) -> i64 {
        i64::try_from(self.now()).unwrap_or(i64::MAX)
    }

    /// Constant-time check of a presented admin token (hashes first, so the
    /// comparison is also independent of the presented length).
    pub fn admin_token_matches(&self, presented: &[u8]) -> bool {
        ct_eq(&sha256(presented), &self.admin_token_hash)
    }

    /// Counts a request against `limit`; 429 when over it, 503 when the limiter is down.
    pub async fn rate_limit(
        &self,
        class: &'static str,
        key: &str,
        limit: &RateLimit,
    ) -> Result<(), ApiError> {
        match self.limiter.check(class, key, limit).await {
            Ok(Decision::Allowed) => Ok(()),
            Ok(Decision::Limited { retry_after }) => {
                Metrics::count(&self.metrics.rate_limited, class);
                Err(
                    ApiError::rate_limited(retry_after.as_secs_f64().ceil() as u64)
                        .detail(format!("{class} limit")),
                )
            }
            Err(err) => Err(ApiError::unavailable(format!("rate limiter: {err}"))),
        }
    }

    /// Appends to the audit ledger; a failure is logged (by the ledger) and
    /// does not undo the action being audited.
    pub async fn audit(&self, kind: AuditKind, actor: &str, subject: &str, detail: Value) {
        if self
            .ledger
            .record(kind, actor, subject, detail, self.now())
            .await
            .is_ok()
        {
            self.metrics.audit_entries.inc();
        }
    }
}

/// Handlers receive the state through this alias.
pub type SharedState = Arc<AppState>;
