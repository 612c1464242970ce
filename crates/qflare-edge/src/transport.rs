//! HTTPS to the QFLARE server: TLS 1.3 only, hybrid X25519MLKEM768 key
//! exchange preferred (aws-lc-rs), and the server's certificate *pinned*
//! rather than checked against public CAs.
//!
//! Pinning works in two steps, because the one fingerprint a device is given
//! covers both the TLS certificate and the server's ML-DSA key:
//!
//! 1. [`Transport::discover`] connects accepting any certificate (the TLS
//!    handshake signature is still verified, proving the server holds the
//!    certificate's key), records the certificate, fetches `/v1/server-info`
//!    for the ML-DSA key, and checks `fingerprint == H(certificate, key)`.
//!    Nothing secret is sent on that connection.
//! 2. Every later connection accepts exactly that certificate
//!    ([`Transport::pinned`]); the enrollment token travels only there.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qflare_protocol::api::routes;
use qflare_protocol::crypto::sha256;
use qflare_protocol::enrollment::ServerInfo;
use qflare_protocol::identity::ServerFingerprint;
use qflare_protocol::secret::ct_eq;
use qflare_protocol::sig::VerifyingKey;
use qflare_protocol::wire::limits;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::error::EdgeError;
use crate::response::decode_plain;

/// Which certificates a connection accepts.
#[derive(Debug)]
enum Pin {
    /// Any certificate, recorded for a later fingerprint check.
    Capture(Mutex<Option<Vec<u8>>>),
    /// Exactly the certificate with this SHA-256.
    Sha256([u8; 32]),
}

#[derive(Debug)]
struct PinnedVerifier {
    pin: Pin,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pin {
            Pin::Capture(slot) => {
                if let Ok(mut slot) = slot.lock() {
                    *slot = Some(end_entity.to_vec());
                }
                Ok(ServerCertVerified::assertion())
            }
            Pin::Sha256(expected) if ct_eq(&sha256(end_entity.as_ref()), expected) => {
                Ok(ServerCertVerified::assertion())
            }
            Pin::Sha256(_) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered, so this is never reached by an honest server.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client(
    verifier: Arc<PinnedVerifier>,
    provider: Arc<CryptoProvider>,
    timeout: Duration,
) -> Result<reqwest::Client, EdgeError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| EdgeError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .https_only(true)
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| EdgeError::Tls(e.to_string()))
}

/// What a server presents before anything is checked against a pin.
#[derive(Debug, Clone)]
pub struct PresentedServer {
    /// Its TLS end-entity certificate (DER).
    pub certificate: Vec<u8>,
    /// What `/v1/server-info` said.
    pub info: ServerInfo,
    /// The ML-DSA key in the info.
    pub key: VerifyingKey,
}

/// A verified server: its certificate hash and ML-DSA key, ready to pin.
#[derive(Debug, Clone)]
pub struct VerifiedServer {
    /// What was fetched from `/v1/server-info`.
    pub info: ServerInfo,
    /// The server's ML-DSA key, checked against the fingerprint.
    pub verifying_key: VerifyingKey,
    /// SHA-256 of the server's TLS certificate.
    pub certificate_sha256: [u8; 32],
    /// The fingerprint that matched.
    pub fingerprint: ServerFingerprint,
}

/// An HTTPS client bound to one server, reached at one address or, for
/// a server of several replicas, at whichever of its addresses answers.
#[derive(Debug, Clone)]
pub struct Transport {
    /// The server's (first) base URL, without a trailing slash.
    pub base_url: String,
    /// The pinned client.
    pub http: reqwest::Client,
    /// Every address, `base_url` first; requests go to `addresses[in_use]`.
    addresses: Arc<[String]>,
    in_use: Arc<AtomicUsize>,
}

impl Transport {
    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// Step 1: fetch the server's info and check it and the certificate
    /// against `fingerprint`.
    pub async fn discover(
        base_url: &str,
        fingerprint: &ServerFingerprint,
    ) -> Result<VerifiedServer, EdgeError> {
        let presented = Self::inspect(base_url).await?;
        fingerprint.verify(&presented.certificate, &presented.key)?;
        Ok(VerifiedServer {
            certificate_sha256: sha256(&presented.certificate),
            info: presented.info,
            verifying_key: presented.key,
            fingerprint: *fingerprint,
        })
    }

    /// What the server at `base_url` presents, verified only in that it
    /// holds its certificate's private key: its certificate, its info and
    /// its ML-DSA key. For a check against a fingerprint or a pin by the
    /// caller; nothing secret is sent.
    pub async fn inspect(base_url: &str) -> Result<PresentedServer, EdgeError> {
        let base_url = base_url.trim_end_matches('/');
        let provider = Self::provider();
        let verifier = Arc::new(PinnedVerifier {
            pin: Pin::Capture(Mutex::new(None)),
            provider: provider.clone(),
        });
        let http = client(verifier.clone(), provider, Duration::from_secs(30))?;
        let response = http
            .get(format!("{base_url}{}", routes::SERVER_INFO))
            .send()
            .await
            .map_err(EdgeError::network)?;
        let info: ServerInfo = decode_plain(response, limits::SERVER_INFO).await?;
        let certificate = match &verifier.pin {
            Pin::Capture(slot) => slot.lock().ok().and_then(|mut s| s.take()),
            Pin::Sha256(_) => None,
        }
        .ok_or_else(|| EdgeError::Tls("no server certificate was seen".into()))?;
        let key = VerifyingKey::from_bytes(info.signature_suite, info.verifying_key.clone())?;
        Ok(PresentedServer {
            certificate,
            info,
            key,
        })
    }

    /// Step 2: a client that accepts only the certificate with this hash.
    pub fn pinned(
        base_url: &str,
        certificate_sha256: [u8; 32],
        timeout: Duration,
    ) -> Result<Self, EdgeError> {
        let provider = Self::provider();
        let verifier = Arc::new(PinnedVerifier {
            pin: Pin::Sha256(certificate_sha256),
            provider: provider.clone(),
        });
        let base_url = base_url.trim_end_matches('/').to_owned();
        Ok(Self {
            addresses: Arc::from(vec![base_url.clone()]),
            in_use: Arc::new(AtomicUsize::new(0)),
            base_url,
            http: client(verifier, provider, timeout)?,
        })
    }

    /// Also reaches the server at `alternates` (replicas presenting the
    /// same pinned certificate), moving to the next one whenever the one in
    /// use cannot be reached ([`Transport::fail_over`]).
    #[must_use]
    pub fn with_alternates(mut self, alternates: &[String]) -> Self {
        let mut addresses = vec![self.base_url.clone()];
        addresses.extend(
            alternates
                .iter()
                .map(|url| url.trim_end_matches('/').to_owned()),
        );
        self.addresses = Arc::from(addresses);
        self
    }

    /// The absolute URL of `path` at the address in use.
    pub fn url(&self, path: &str) -> String {
        let index = self.in_use.load(Ordering::Relaxed) % self.addresses.len();
        format!("{}{path}", self.addresses[index])
    }

    /// The address in use could not be reached: the next request goes to
    /// the next one (shared by every clone, so a device's session and
    /// downloads move together). No effect with a single address.
    pub fn fail_over(&self) {
        if self.addresses.len() > 1 {
            let next = self.in_use.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                now = %self.addresses[next % self.addresses.len()],
                "the server could not be reached; failing over to its next address"
            );
        }
    }

    /// Sends `request`, failing over to the next address if this one
    /// cannot be reached.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, EdgeError> {
        request.send().await.map_err(|err| {
            if err.is_connect() || err.is_timeout() || err.is_request() {
                self.fail_over();
            }
            EdgeError::network(err)
        })
    }
}
