//! A real server on 127.0.0.1:0 over real HTTPS, with injectable time.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use qflare_edge::transport::Transport;
use qflare_edge::{EdgeError, EnrollOptions, Identity};
use qflare_protocol::api::ErrorBody;
use qflare_protocol::crypto::sha256;
use qflare_protocol::identity::{EnrollmentToken, ServerFingerprint};
use qflare_protocol::{KemSuite, SignatureSuite};
use qflare_server::api::CreatedToken;
use qflare_server::ratelimit::{
    Decision, MemoryRateLimiter, RateLimit, RateLimitError, RateLimiter,
};
use qflare_server::{Config, ManualClock, Server, ServerOptions, SharedState};
use qflare_store::Store;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdefghijklmnop";
/// Wall-clock seconds now: the server's manual clock starts here, so edge
/// clients (which use the real clock) agree with it until a test moves it.
pub fn real_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A memory rate limiter whose clock the test moves.
#[derive(Debug, Default)]
pub struct ManualTimeLimiter {
    inner: MemoryRateLimiter,
    pub millis: AtomicU64,
}

impl ManualTimeLimiter {
    pub fn advance(&self, by: Duration) {
        self.millis
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl RateLimiter for ManualTimeLimiter {
    async fn check(
        &self,
        class: &str,
        key: &str,
        limit: &RateLimit,
    ) -> Result<Decision, RateLimitError> {
        let now = Duration::from_millis(self.millis.load(Ordering::SeqCst));
        Ok(self.inner.check_at(class, key, limit, now))
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

pub fn generous() -> RateLimit {
    RateLimit {
        per_minute: 60_000,
        burst: 10_000,
    }
}

/// A configuration for tests: its own state directory, generous limits.
pub fn config(state_dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.state_dir = state_dir.to_path_buf();
    config.server.metrics_listen = None;
    // These tests exercise enrollment and sessions; the federation tests
    // (crates/qflare-cli/tests) run the enclave.
    config.federation.enabled = false;
    config.rate_limits.enroll = generous();
    config.rate_limits.sessions = generous();
    config.rate_limits.device = generous();
    config.rate_limits.admin = generous();
    config.rate_limits.public = generous();
    config
}

pub struct Setup {
    pub config: Config,
    pub store: Option<Arc<dyn Store>>,
    pub limiter: Option<Arc<dyn RateLimiter>>,
    pub clock: Arc<ManualClock>,
    pub with_metrics: bool,
}

impl Setup {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            config: config(state_dir),
            store: None,
            limiter: None,
            clock: Arc::new(ManualClock::new(real_now())),
            with_metrics: false,
        }
    }
}

pub struct TestServer {
    pub url: String,
    pub addr: SocketAddr,
    pub fingerprint: ServerFingerprint,
    pub state: SharedState,
    pub clock: Arc<ManualClock>,
    pub admin: Transport,
    pub metrics_url: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), qflare_server::ServerError>>,
}

impl TestServer {
    pub async fn start(setup: Setup) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = if setup.with_metrics {
            Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        } else {
            None
        };
        let metrics_url = metrics
            .as_ref()
            .map(|l| format!("http://{}/metrics", l.local_addr().unwrap()));
        let server = Server::new(
            setup.config,
            ServerOptions {
                admin_token: Some(ADMIN_TOKEN.into()),
                clock: Some(setup.clock.clone()),
                store: setup.store,
                rate_limiter: setup.limiter,
            },
        )
        .await
        .unwrap();
        let fingerprint = server.fingerprint();
        let state = server.state().clone();
        let url = format!("https://{addr}");
        let certificate = sha256(state.identity.certificate_chain[0].as_ref());
        let admin = Transport::pinned(&url, certificate, Duration::from_secs(60)).unwrap();
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(server.serve(listener, metrics, async move {
            let _ = rx.await;
        }));
        Self {
            url,
            addr,
            fingerprint,
            state,
            clock: setup.clock,
            admin,
            metrics_url,
            shutdown: Some(tx),
            handle,
        }
    }

    /// Graceful shutdown; the server must stop cleanly.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.handle).await.unwrap().unwrap();
    }

    pub async fn admin_post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.admin
            .http
            .post(self.admin.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.admin
            .http
            .get(self.admin.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
    }

    pub async fn create_token(&self, ttl_secs: u64) -> CreatedToken {
        let response = self
            .admin_post(
                "/v1/admin/tokens",
                serde_json::json!({ "label": "test", "ttl_secs": ttl_secs }),
            )
            .await;
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }

    pub async fn enroll(
        &self,
        dir: &Path,
        token: &str,
        kem: KemSuite,
    ) -> Result<Identity, EdgeError> {
        qflare_edge::enroll(
            EnrollOptions {
                server_url: self.url.clone(),
                token: EnrollmentToken::parse(token).unwrap(),
                fingerprint: self.fingerprint,
                device_name: "edge-test".into(),
                kem_suite: Some(kem),
                signature_suite: Some(SignatureSuite::MlDsa65),
            },
            dir,
        )
        .await
    }

    /// Creates a token and enrolls a device into `dir`.
    pub async fn enrolled(&self, dir: &Path) -> Identity {
        let token = self.create_token(3600).await;
        self.enroll(dir, &token.token, KemSuite::MlKem768)
            .await
            .unwrap()
    }

    /// POSTs raw bytes (no admin token).
    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> reqwest::Response {
        let mut request = self.admin.http.post(self.admin.url(path)).body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        request.send().await.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The error body of a response, asserting its shape.
pub async fn error_of(response: reqwest::Response) -> (u16, ErrorBody) {
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    let error: ErrorBody = serde_json::from_slice(&body).unwrap_or_else(|_| {
        panic!(
            "not the stable error shape: {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, error)
}

/// A fresh temporary directory that lives as long as the returned guard.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A PostgreSQL store in a fresh schema, when the test database is configured.
pub async fn postgres_store(schema: &str) -> Option<Arc<dyn Store>> {
    let url = std::env::var("QFLARE_TEST_POSTGRES_URL").ok()?;
    Some(
        qflare_store::open_postgres_in_schema(&url, schema)
            .await
            .unwrap(),
    )
}

pub fn random_schema(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut bytes);
    format!("{prefix}_{}", hex::encode(bytes))
}
