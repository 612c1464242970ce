//! One replica calling the coordinator: the three things only the replica
//! that holds the enclave can do for a device (a fresh attestation report,
//! the certificate of the current model, judging an update), over HTTPS to
//! the coordinator's internal routes.
//!
//! Trust between replicas rests on what they already share, the state
//! directory: the TLS connection accepts exactly this deployment's own
//! certificate (every replica presents the same one), and the caller
//! presents a bearer key derived from `storage.key`
//! ([`ServerIdentity::replica_key`]). What travels is protected end to end
//! anyway: reports and certificates are signed by the enclave and checked by
//! the device, and an update is signed by the device and sealed to the
//! enclave. The link only has to keep outsiders off the internal routes.

use std::sync::Arc;
use std::time::Duration;

use qflare_protocol::attestation::AttestationReport;
use qflare_protocol::federation::SubmitReceipt;
use qflare_protocol::model::ModelCertificate;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::identity::ServerIdentity;

/// `POST`: a report for a device's nonce, or the boot's report.
pub const ATTEST: &str = "/internal/v1/attest";
/// `POST`: the current model's version and certificate.
pub const MODEL: &str = "/internal/v1/model";
/// `POST`: an update envelope, already checked against its device's
/// signature by the forwarding replica, to record and judge.
pub const UPDATES: &str = "/internal/v1/updates";
/// The device whose sealed session an update arrived in.
pub const DEVICE_HEADER: &str = "x-qflare-device";

/// Asks for a report.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    /// The device's nonce (hex); none: the enclave boot's own report.
    #[serde(default)]
    pub nonce: Option<String>,
}

/// The coordinator's enclave, as a replica needs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnclaveReport {
    /// Which boot of the enclave answered.
    pub generation: u64,
    /// The report (for the nonce asked, else the boot's); none while the
    /// enclave is down.
    pub report: Option<AttestationReport>,
}

/// The current model as the coordinator's enclave certifies it; the
/// bytes come from the shared database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertifiedModel {
    /// The model version.
    pub version: u64,
    /// The running enclave's certificate of it.
    pub certificate: ModelCertificate,
    /// SHA-256 of the certifying key (hex).
    pub enclave_key_sha256: String,
}

/// An HTTPS client to whichever replica coordinates.
#[derive(Clone)]
pub struct ReplicaLink {
    http: reqwest::Client,
    bearer: Arc<Zeroizing<String>>,
}

impl std::fmt::Debug for ReplicaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaLink").finish_non_exhaustive()
    }
}

impl ReplicaLink {
    /// A client that accepts only this deployment's certificate.
    pub fn new(identity: &ServerIdentity, timeout: Duration) -> Result<Self, String> {
        let certificate = identity
            .certificate_chain
            .first()
            .ok_or("the TLS certificate chain is empty")?
            .as_ref()
            .to_vec();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = Arc::new(OwnCertificate {
            certificate,
            provider: provider.clone(),
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // HTTP/2: a replica's calls for all its devices share one
        // connection instead of opening one each, which the coordinator's
        // per-address connection cap would soon refuse.
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            bearer: Arc::new(Zeroizing::new(format!(
                "Bearer {}",
                hex::encode(identity.replica_key.expose())
            ))),
        })
    }

    /// Whether `presented` is the bearer of this deployment's replicas
    /// (constant time).
    pub fn accepts(&self, presented: &[u8]) -> bool {
        qflare_protocol::secret::ct_eq(presented, self.bearer.as_bytes())
    }

    /// A fresh report for `nonce` (or the boot's) from the coordinator at `address`.
    pub async fn attest(&self, address: &str, nonce: Option<[u8; 32]>) -> ApiResult<EnclaveReport> {
        let request = AttestRequest {
            nonce: nonce.map(hex::encode),
        };
        let body = serde_json::to_vec(&request).map_err(ApiError::internal)?;
        self.call(address, ATTEST, body, None).await
    }

    /// The current model's certificate from the coordinator at `address`.
    pub async fn model(&self, address: &str) -> ApiResult<CertifiedModel> {
        self.call(address, MODEL, b"{}".to_vec(), None).await
    }

    /// Hands `device_id`'s update envelope to the coordinator at `address`.
    pub async fn submit(
        &self,
        address: &str,
        device_id: &str,
        envelope: Vec<u8>,
    ) -> ApiResult<SubmitReceipt> {
        self.call(address, UPDATES, envelope, Some(device_id)).await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        address: &str,
        path: &str,
        body: Vec<u8>,
        device_id: Option<&str>,
    ) -> ApiResult<T> {
        let mut request = self
            .http
            .post(format!("https://{address}{path}"))
            .header(http::header::AUTHORIZATION, self.bearer.as_str())
            .body(body);
        request = match device_id {
            Some(device_id) => request.header(DEVICE_HEADER, device_id),
            None => request.header(http::header::CONTENT_TYPE, "application/json"),
        };
        // The coordinator is dying or moving: to the device this is the
        // enclave restarting, which it already waits out and re-attests for.
        let moving = |err: reqwest::Error| {
            ApiError::new(ErrorCode::EnclaveRestarting)
                .detail(format!("the coordinator at {address}: {err}"))
                .retry_after(2)
        };
        let response = request.send().await.map_err(moving)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bytes = response.bytes().await.map_err(moving)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::internal(format!("the coordinator's answer to {path}: {e}"))
            });
        }
        let code = serde_json::from_slice::<ErrorBody>(&bytes)
            .map_or(ErrorCode::InternalError, |body| body.code);
        let mut err = ApiError::new(code).detail(format!("the coordinator answered {status}"));
        if let Some(secs) = retry_after {
            err = err.retry_after(secs);
        }
        Err(err)
    }
}

/// Accepts exactly the deployment's own end-entity certificate; the
/// handshake signature is still checked, so the peer holds its key.
#[derive(Debug)]
struct OwnCertificate {
    certificate: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for OwnCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.certificate.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "not this deployment's certificate".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
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
