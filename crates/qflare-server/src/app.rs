//! Shared state of a running server and the small services handlers use:
//! the clock, rate limiting, auditing.

use std::net::SocketAddr;
use std::sync::Arc;

use qflare_protocol::crypto::sha256;
use qflare_protocol::secret::ct_eq;
use qflare_store::Store;
use serde_json::Value;

use crate::clock::{Clock, store_time};
use crate::config::Config;
use crate::error::ApiError;
use crate::identity::ServerIdentity;
use crate::ledger::{AuditKind, Auditor};
use crate::metrics::Metrics;
use crate::ratelimit::{Decision, RateLimit, RateLimiter};

/// The client's address, attached to every request by the connection loop.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

impl ClientAddr {
    /// The key this client's per-address rate limits use.
    pub fn rate_limit_key(&self) -> String {
        crate::ratelimit::address_key(self.0.ip())
    }
}

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
    /// The audit ledger, as handlers append to it.
    pub auditor: Auditor,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Federated training: this replica's round controller and enclave while
    /// it coordinates, the way to the coordinator otherwise; `None` when
    /// `federation.enabled` is off.
    pub federation: Option<Arc<crate::coordination::Coordination>>,
    /// Who may send an update body now, and the memory all of them may use.
    pub uploads: crate::uploads::UploadGate,
    /// The memory all model downloads in flight may hold.
    pub downloads: crate::downloads::DownloadBudget,
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
        auditor: Auditor,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        federation: Option<Arc<crate::coordination::Coordination>>,
        admin_token: &[u8],
    ) -> Self {
        Self {
            uploads: crate::uploads::UploadGate::new(config.limits.uploads_in_memory_bytes),
            downloads: crate::downloads::DownloadBudget::new(
                config.limits.downloads_in_memory_bytes,
            ),
            config,
            store,
            identity,
            limiter,
            auditor,
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
        store_time(self.now())
    }

    /// Constant-time check of a presented admin token (hashes first, so the
    /// comparison is also independent of the presented length). Nothing
    /// shorter than a valid token can match, whatever the stored hash: an
    /// empty Basic-auth password or bearer token is refused outright.
    pub fn admin_token_matches(&self, presented: &[u8]) -> bool {
        presented.len() >= crate::identity::MIN_ADMIN_TOKEN_LEN
            && ct_eq(&sha256(presented), &self.admin_token_hash)
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

    /// Appends to the audit ledger; see [`Auditor`].
    pub async fn audit(&self, kind: AuditKind, actor: &str, subject: &str, detail: Value) {
        self.auditor.audit(kind, actor, subject, detail).await;
    }
}

/// Handlers receive the state through this alias.
pub type SharedState = Arc<AppState>;
