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
use rustls::pki_types::ServerName;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A verifier that accepts exactly the test server's certificate.
#[derive(Debug)]
pub struct Exactly {
    certificate: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Exactly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        assert_eq!(sha256(end_entity.as_ref()), self.certificate);
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no TLS 1.2".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn client_config(
    server: &TestServer,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Exactly {
            certificate: sha256(server.state.identity.certificate_chain[0].as_ref()),
            provider,
        }))
        .with_no_client_auth()
}

/// A raw TLS 1.3 connection to the test server from `local` (any 127.0.0.0/8
/// address), offering `alpn`: for tests that must control every byte.
pub async fn raw_tls(
    server: &TestServer,
    local: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = client_config(server, &[&rustls::version::TLS13]);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = connect_from(local, server.addr).await;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// A TCP connection to `to` from the loopback address `local`.
pub async fn connect_from(local: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(local.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// An HTTPS client from `local` that trusts whatever certificate the test
/// server shows, speaking HTTP/2 only when `http2` is set.
pub fn reqwest_from(local: &str, http2: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .local_address(local.parse::<std::net::IpAddr>().unwrap())
        .tls_danger_accept_invalid_certs(true);
    let builder = if http2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    builder.build().unwrap()
}

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
    // No TEE here: the enclave is a hardened process.
    config.enclave.allow_software_mode = true;
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
    config.rate_limits.connections = generous();
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
                alternate_urls: Vec::new(),
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
