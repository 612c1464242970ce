//! The device's checks of what the host sends before anything is trained or
//! sealed: the enclave's report against the policy and our nonce, and each
//! downloaded model against the attested enclave's certificate.

use qflare_protocol::attestation::{
    self, ATTESTATION_NONCE_LEN, AttestationPolicy, AttestationReport, VerifiedEnclave,
};
use qflare_protocol::crypto::sha256;
use qflare_protocol::federation;
use qflare_protocol::model::ModelCertificate;
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::wire::limits;

use crate::error::{EdgeError, ModelRefusal};

/// Checks a round answer's report: policy (mode, measurement, age), our
/// nonce, and the enclave's signature.
pub fn verify_round_report(
    report: &AttestationReport,
    policy: &AttestationPolicy,
    nonce: &[u8; ATTESTATION_NONCE_LEN],
    now: u64,
) -> Result<VerifiedEnclave, EdgeError> {
    attestation::verify_report(report, policy, Some(nonce), now).map_err(EdgeError::Attestation)
}

/// Checks a model download against the attested enclave and the round:
/// the enclave key hash, the certificate (digest and signature), the model
/// version and the model's name. Returns the certificate and the model bytes.
pub fn verify_model_certificate<'a>(
    download: &'a [u8],
    enclave: &VerifiedEnclave,
    model_version: u64,
    architecture: &str,
) -> Result<(ModelCertificate, &'a [u8]), EdgeError> {
    let refuse = EdgeError::ModelRefused;
    let (header, model) = federation::decode_model_download(download)
        .map_err(|e| refuse(ModelRefusal::Malformed(e)))?;
    // Both values are public; a plain comparison leaks nothing.
    if header.enclave_key_sha256 != sha256(enclave.verifying_key.as_bytes()) {
        return Err(refuse(ModelRefusal::EnclaveKeyMismatch));
    }
    qflare_protocol::model::verify(&header.certificate, model, &enclave.verifying_key)
        .map_err(|e| refuse(ModelRefusal::Certificate(e)))?;
    let certificate = header.certificate;
    if certificate.model_version != model_version {
        return Err(refuse(ModelRefusal::VersionMismatch {
            expected: model_version,
            received: certificate.model_version,
        }));
    }
    if certificate.architecture != architecture {
        return Err(refuse(ModelRefusal::ArchitectureMismatch {
            expected: architecture.to_owned(),
            received: certificate.architecture,
        }));
    }
    Ok((certificate, model))
}

/// Decodes certified model bytes: well-formed tensors with finite values.
/// Whether they are a model the device can train is its trainer's question
/// (the built-in trainer checks its architecture's layout).
pub fn decode_model(model: &[u8]) -> Result<TensorMap, EdgeError> {
    let refuse = |reason: String| EdgeError::ModelRefused(ModelRefusal::Layout(reason));
    let weights =
        TensorMap::from_safetensors(model, limits::TENSORS).map_err(|e| refuse(e.to_string()))?;
    if let Some(name) = weights.first_non_finite() {
        return Err(refuse(format!("tensor {name} holds a NaN or an infinity")));
    }
    Ok(weights)
}

/// [`verify_model_certificate`] then [`decode_model`].
pub fn verify_model_download(
    download: &[u8],
    enclave: &VerifiedEnclave,
    model_version: u64,
    architecture: &str,
) -> Result<(ModelCertificate, TensorMap), EdgeError> {
    let (certificate, model) =
        verify_model_certificate(download, enclave, model_version, architecture)?;
    Ok((certificate, decode_model(model)?))
}
