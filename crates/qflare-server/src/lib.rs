//! # qflare-server
//!
//! The QFLARE server: HTTPS (TLS 1.3 only, hybrid X25519MLKEM768 key
//! exchange preferred) in front of the post-quantum application protocol of
//! `qflare-protocol`.
//!
//! ```text
//!  TcpListener ─▶ TLS 1.3 (rustls, aws-lc-rs) ─▶ hyper ─▶ axum router (routes.rs)
//!                                                          │
//!      public: health, server-info, enroll, handshake ─────┤  rate limits (ratelimit/)
//!      sealed: SealedRequest extractor (sealed.rs) ────────┤  audit ledger (ledger.rs)
//!      admin:  bearer token (api/admin.rs) ────────────────┘  metrics (metrics.rs)
//!                              │
//!                       Store (qflare-store: SQLite or PostgreSQL)
//! ```
//!
//! Arrows between modules run one way, top to bottom:
//!
//! 1. [`routes`]: the router, its rate-limit and admin layers, and the
//!    [`openapi`] document collected from the handlers it registers.
//! 2. Handlers: [`api`] (JSON and sealed routes) and [`web`] (the pages),
//!    with the extractors they use: [`sealed`] (opens a sealed request
//!    against its session) and [`body`] (bounded JSON bodies).
//! 3. Services the handlers share: [`coordination`] (which replica runs the
//!    round controller, and the link the others reach it by), over
//!    [`federation`] (the round controller, which gets only a
//!    `ControllerContext`: config, store, auditor, metrics, clock, never the
//!    HTTP state), [`devices`], [`ledger`] (the audit chain),
//!    [`ratelimit`], and the memory budgets of update bodies ([`uploads`])
//!    and model downloads ([`downloads`]), both on [`budget`].
//! 4. Below them: `qflare-store`, `qflare-protocol`, the enclave host, and
//!    [`config`], [`identity`], [`clock`], [`metrics`], [`error`].
//!
//! [`app::AppState`] is what handlers see; it holds the services, and no
//! service holds it.
//!
//! * [`Server::serve`] takes a bound listener and a shutdown future, which
//!   is how tests run the real server on `127.0.0.1:0`.
//! * Errors answer with one JSON shape ([`error`], codes from
//!   `qflare_protocol::api::ErrorCode`); details go to the log.

#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod body;
pub mod budget;
pub mod clock;
pub mod config;
pub mod connections;
pub mod coordination;
pub mod devices;
pub mod downloads;
pub mod error;
pub mod federation;
pub mod identity;
pub mod key_chain;
pub mod key_rotation;
pub mod ledger;
pub mod metrics;
pub mod openapi;
pub mod ratelimit;
pub mod routes;
pub mod sealed;
pub mod uploads;
pub mod web;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as ConnectionBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use qflare_protocol::identity::ServerFingerprint;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

pub use app::{AppState, SharedState};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::Config;

use crate::app::ClientAddr;
use crate::identity::ServerIdentity;
use crate::ledger::{Auditor, Ledger};
use crate::metrics::{Metrics, TlsLabels};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The state directory or a key file is unusable.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] qflare_store::StoreError),
    /// Redis could not be reached.
    #[error(transparent)]
    RateLimit(#[from] ratelimit::RateLimitError),
    /// TLS could not be configured.
    #[error("tls: {0}")]
    Tls(String),
    /// A listener failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The enclave or the round controller could not start.
    #[error("federation: {0}")]
    Federation(String),
}

/// Concurrent streams one HTTP/2 connection may carry (hyper's default is
/// 200; a device needs one or two at a time).
const HTTP2_MAX_STREAMS: u32 = 32;

/// The largest read buffer of an HTTP/1.1 connection (hyper's default is
/// about 400 KiB); bodies stream through it in reads of this size. One TLS
/// record's plaintext: reads no larger than what rustls decrypts at once
/// cost nothing in throughput, and while a request is held (a long poll)
/// hyper keeps a buffer of the last read size reserved to notice the
/// client leaving, so at 10,000 held polls each KiB here is 10 MB.
const HTTP1_MAX_BUFFER_BYTES: usize = 16 * 1024;

/// Header bytes one HTTP/2 request may carry (HTTP/1.1 is bounded by hyper's
/// header buffer).
const HTTP2_MAX_HEADER_BYTES: u32 = 64 * 1024;

/// Start-up choices that are not configuration.
#[derive(Debug, Default)]
pub struct ServerOptions {
    /// The admin token (`QFLARE_ADMIN_TOKEN`); generated into the state directory when `None`.
    pub admin_token: Option<String>,
    /// Wall-clock time; the system clock when `None`.
    pub clock: Option<Arc<dyn Clock>>,
    /// An already opened store (tests isolate PostgreSQL schemas this way);
    /// opened from `server.database_url` when `None`.
    pub store: Option<Arc<dyn qflare_store::Store>>,
    /// A rate limiter; from `server.redis_url` (or in memory) when `None`.
    pub rate_limiter: Option<Arc<dyn ratelimit::RateLimiter>>,
}

/// A configured server, ready to serve.
#[derive(Debug)]
pub struct Server {
    state: SharedState,
    tls: Arc<rustls::ServerConfig>,
}

impl Server {
    /// Validates the configuration, loads (or creates) the identity, opens the
    /// store and the rate limiter.
    pub async fn new(config: Config, options: ServerOptions) -> Result<Self, ServerError> {
        config.validate()?;
        let identity = Arc::new(ServerIdentity::load_or_create(&config)?);
        let admin_token = identity::admin_token(&config.server.state_dir, options.admin_token)?;
        let store = match options.store {
            Some(store) => store,
            None => qflare_store::open(&config.server.database_url()).await?,
        };
        let limiter = match options.rate_limiter {
            Some(limiter) => limiter,
            None => ratelimit::connect(config.server.redis_url.as_deref()).await?,
        };
        let metrics = Metrics::new();
        let signing_key = Arc::new(
            qflare_protocol::sig::SigningKey::from_seed(
                identity.signing_key.suite(),
                identity.signing_key.seed().clone(),
            )
            .map_err(|e| ServerError::Tls(format!("server key: {e}")))?,
        );
        let ledger = Ledger::new(store.clone(), signing_key, config.audit.checkpoint_every);
        let tls = tls_config(&identity)?;
        let clock = options.clock.unwrap_or_else(|| Arc::new(SystemClock));
        ledger
            .record_key_rotation(&identity.key_handovers, clock.now())
            .await?;
        let auditor = Auditor::new(ledger, clock.clone(), metrics.audit_entries.clone());
        let federation = if config.federation.enabled {
            let context = federation::ControllerContext {
                config: config.clone(),
                store: store.clone(),
                auditor: auditor.clone(),
                metrics: metrics.clone(),
                clock: clock.clone(),
            };
            Some(
                coordination::Coordination::start(context, &identity)
                    .await
                    .map_err(|e| ServerError::Federation(e.to_string()))?,
            )
        } else {
            None
        };
        let state = Arc::new(AppState::new(
            config,
            store,
            identity,
            limiter,
            auditor,
            metrics,
            clock,
            federation,
            admin_token.expose(),
        ));
        Ok(Self { state, tls })
    }

    /// The fingerprint devices pin (`--server-key`).
    pub fn fingerprint(&self) -> ServerFingerprint {
        self.state.identity.fingerprint
    }

    /// The shared state (for tests and embedding).
    pub fn state(&self) -> &SharedState {
        &self.state
    }

    /// Serves HTTPS on `listener` (and metrics on `metrics`, if given) until
    /// `shutdown` completes, then drains in-flight requests for up to the
    /// configured grace period.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let router = routes::router(self.state.clone());
        let acceptor = TlsAcceptor::from(self.tls.clone());
        let graceful = GracefulShutdown::new();
        let handshake_timeout =
            Duration::from_secs(self.state.config.server.tls_handshake_timeout_secs.max(1));
        let grace = Duration::from_secs(self.state.config.server.shutdown_grace_secs);
        let idle_timeout = Duration::from_secs(self.state.config.server.idle_timeout_secs.max(1));
        let connections = Arc::new(connections::ConnectionLimiter::new(
            self.state.config.server.max_connections,
            self.state.config.server.max_connections_per_address,
            self.state.metrics.connections_open.clone(),
        ));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if let Some(metrics_listener) = metrics {
            tokio::spawn(serve_metrics(
                metrics_listener,
                self.state.metrics.clone(),
                stop_rx.clone(),
            ));
        }
        tokio::spawn(sweep_sessions(self.state.clone(), stop_rx.clone()));
        let advertised = advertised_address(&self.state.config, listener.local_addr()?);
        let controller = self
            .state
            .federation
            .clone()
            .map(|coordination| tokio::spawn(coordination.run(advertised, stop_rx.clone())));
        tracing::info!(
            addr = %listener.local_addr()?,
            fingerprint = %self.fingerprint(),
            store = self.state.store.backend(),
            rate_limits = self.state.limiter.backend(),
            "serving HTTPS"
        );
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let address = ratelimit::address_key(peer.ip());
            let permit = match connections.admit(address.clone()) {
                Ok(permit) => permit,
                Err(refusal) => {
                    Metrics::count(&self.state.metrics.connections_refused, refusal.as_str());
                    tracing::debug!(%peer, reason = refusal.as_str(), "connection refused");
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            let state = self.state.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                // Held for the life of the connection.
                let _permit = permit;
                // New connections from one address are rate limited before
                // the handshake, the part that costs the server CPU. If the
                // limiter is unreachable the connection goes on: every
                // request it carries is still checked (and refused with 503
                // while the limiter is down).
                let limit = state.config.rate_limits.connections;
                if let Ok(ratelimit::Decision::Limited { .. }) =
                    state.limiter.check("connections", &address, &limit).await
                {
                    Metrics::count(&state.metrics.connections_refused, "rate");
                    tracing::debug!(%peer, "connection refused: rate limit");
                    return;
                }
                let tcp = connections::IdleIo::new(tcp, idle_timeout);
                let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => {
                        state.metrics.tls_failures.inc();
                        tracing::debug!(%peer, %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        state.metrics.tls_failures.inc();
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let group = tls
                    .get_ref()
                    .1
                    .negotiated_key_exchange_group()
                    .map_or_else(|| "none".to_owned(), |g| format!("{:?}", g.name()));
                tracing::debug!(%peer, group = %group, "TLS handshake complete");
                state
                    .metrics
                    .tls_handshakes
                    .get_or_create(&TlsLabels { group })
                    .inc();
                let service = router.map_request(move |mut request: axum::extract::Request<_>| {
                    request.extensions_mut().insert(ClientAddr(peer));
                    request
                });
                let mut builder = ConnectionBuilder::new(TokioExecutor::new());
                // The read buffer grows to hold what one read brings (an
                // update body arrives in large reads) and stays that size
                // for the life of the connection: hyper's default ceiling
                // of about 400 KiB per connection made a server holding
                // 10,000 devices' connections about 3.4 GiB (64 KiB: 2.4).
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .max_buf_size(HTTP1_MAX_BUFFER_BYTES);
                // HTTP/2 is offered by ALPN too: the same idle rule holds
                // (IdleIo, below the TLS layer), and a connection carries a
                // bounded number of concurrent streams and header bytes.
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(HTTP2_MAX_STREAMS)
                    .max_header_list_size(HTTP2_MAX_HEADER_BYTES);
                let connection = builder.serve_connection_with_upgrades(
                    TokioIo::new(tls),
                    TowerToHyperService::new(service),
                );
                if let Err(err) = watcher.watch(connection.into_owned()).await {
                    tracing::debug!(%peer, %err, "connection ended with an error");
                }
            });
        }
        tracing::info!("shutting down: no new connections, draining");
        let _ = stop_tx.send(true);
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "connections still open after the grace period; closing"
            );
        }
        if let Some(controller) = controller {
            // The controller stops its enclave on the way out.
            let _ = tokio::time::timeout(grace, controller).await;
        }
        Ok(())
    }
}

/// Where other replicas reach this one: the configured address, else the
/// bound one (which only works when it names one interface).
fn advertised_address(config: &Config, bound: std::net::SocketAddr) -> String {
    if let Some(address) = &config.server.advertise_address {
        return address.clone();
    }
    if bound.ip().is_unspecified() && config.server.database_url().starts_with("postgres") {
        tracing::warn!(
            %bound,
            "server.advertise_address is not set and the listener is bound to every interface: \
             other replicas cannot reach this one if it coordinates"
        );
    }
    bound.to_string()
}

/// Deletes expired sessions (and abandoned handshakes) every few minutes, so
/// the session table holds only live sessions.
async fn sweep_sessions(state: SharedState, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        match state.store.delete_expired_sessions(state.now_i64()).await {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "expired sessions deleted"),
            Err(err) => tracing::warn!(%err, "could not delete expired sessions"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(300)) => {}
            _ = stop.changed() => return,
        }
    }
}

fn tls_config(identity: &ServerIdentity) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            identity.certificate_chain.clone(),
            identity.tls_private_key.clone_key(),
        )
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    let shutdown = async move {
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
    };
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(%err, "metrics listener stopped");
    }
}

/// Binds the configured listeners and serves until `shutdown` completes.
pub async fn serve(
    config: Config,
    options: ServerOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let metrics = match config.server.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    Server::new(config, options)
        .await?
        .serve(listener, metrics, shutdown)
        .await
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
}
