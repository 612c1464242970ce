//! Global-model certificates: the enclave's signature over each model it produces.
//!
//! Devices check the certificate against the enclave key from a verified
//! attestation report before training, so a host cannot hand them a model
//! the enclave did not make (a flipped bit, an older version, another round's).

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;
use crate::crypto::sha256;
use crate::error::{ProtocolError, Result};
use crate::sig::{SigningKey, VerifyingKey};
use crate::transcript::{Domain, Transcript, TranscriptHash};
use crate::wire::{b64, hex_array};

/// The enclave's signed statement about one global model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelCertificate {
    /// Protocol version.
    pub version: u16,
    /// Model architecture identifier (for example `mnist-2nn`).
    pub architecture: String,
    /// The model version (0 for the initial model, then one per aggregated round).
    pub model_version: u64,
    /// The round that produced it (0 for the initial model).
    pub round_id: u64,
    /// SHA-256 of the model's safetensors bytes.
    #[serde(with = "hex_array")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[0-9a-f]+$"))]
    pub model_sha256: [u8; 32],
    /// The enclave's signature.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub signature: Vec<u8>,
}

/// Longest model name.
pub const MAX_MODEL_NAME_LEN: usize = 64;

/// Checks a model name (the certificate's `architecture`): 1 to 64
/// characters of lowercase ASCII letters, digits, `.`, `_` and `-`,
/// starting with a letter or digit. It appears in file names, log fields
/// and URLs, so it is kept to characters that need no escaping anywhere.
pub fn validate_model_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_MODEL_NAME_LEN
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::malformed(
            "model name",
            "use 1 to 64 characters of a-z 0-9 . _ -, starting with a letter or digit",
        ))
    }
}

fn transcript(cert: &ModelCertificate, enclave_key: &VerifyingKey) -> TranscriptHash {
    let mut t = Transcript::new(Domain::GlobalModel);
    t.append("architecture", cert.architecture.as_bytes())
        .append_u64("model_version", cert.model_version)
        .append_u64("round_id", cert.round_id)
        .append("model_sha256", &cert.model_sha256)
        .append("enclave_key", enclave_key.as_bytes());
    t.hash()
}

/// Enclave side: certifies the model whose safetensors bytes are `model`.
pub fn certify(
    architecture: &str,
    model_version: u64,
    round_id: u64,
    model: &[u8],
    enclave_key: &SigningKey,
) -> Result<ModelCertificate> {
    let mut cert = ModelCertificate {
        version: PROTOCOL_VERSION,
        architecture: architecture.to_owned(),
        model_version,
        round_id,
        model_sha256: sha256(model),
        signature: Vec::new(),
    };
    cert.signature = enclave_key.sign(transcript(&cert, enclave_key.verifying_key()).as_bytes())?;
    Ok(cert)
}

/// Device side: checks that `model` is the one the enclave certified.
pub fn verify(cert: &ModelCertificate, model: &[u8], enclave_key: &VerifyingKey) -> Result<()> {
    if cert.version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(cert.version));
    }
    if !crate::secret::ct_eq(&sha256(model), &cert.model_sha256) {
        return Err(ProtocolError::Mismatch("model digest"));
    }
    enclave_key.verify(
        transcript(cert, enclave_key).as_bytes(),
        &cert.signature,
        "global model certificate",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::SignatureSuite;
    use rand::SeedableRng;

    #[test]
    fn model_names() {
        for good in ["mnist-cnn", "resnet50.v2", "a", "fashion_cnn-3"] {
            validate_model_name(good).unwrap();
        }
        let long = "m".repeat(MAX_MODEL_NAME_LEN + 1);
        for bad in ["", "-x", "Caps", "white space", "a/b", "é", long.as_str()] {
            assert!(validate_model_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn certificate_binds_bytes_and_key() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(41);
        let enclave = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
        let other = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
        let model = vec![1u8, 2, 3, 4];
        let cert = certify("mnist-2nn", 3, 3, &model, &enclave).unwrap();
        verify(&cert, &model, enclave.verifying_key()).unwrap();
        let mut flipped = model.clone();
        flipped[2] ^= 1;
        assert_eq!(
            verify(&cert, &flipped, enclave.verifying_key()),
            Err(ProtocolError::Mismatch("model digest"))
        );
        assert!(verify(&cert, &model, other.verifying_key()).is_err());
        let mut older = cert.clone();
        older.model_version = 2;
        assert!(verify(&older, &model, enclave.verifying_key()).is_err());
    }
}
