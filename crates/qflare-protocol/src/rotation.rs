//! Device key rotation: a device replaces its long-term keys through an
//! authenticated session, with a request signed by its *old* key (proving the
//! current identity) and by the *new* key (proof of possession), both over
//! one transcript that names the device, both key sets and the time.

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;
use crate::error::{ProtocolError, Result};
use crate::identity::{DeviceId, DeviceKeys};
use crate::kem::KemPublicKey;
use crate::sig::{SigningKey, VerifyingKey};
use crate::suite::{KemSuite, SignatureSuite};
use crate::transcript::{Domain, Transcript, TranscriptHash};
use crate::wire::b64;

/// How far a rotation request's timestamp may be from the server's clock.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// `POST /v1/devices/self/rotate-keys` body (inside a sealed session).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotationRequest {
    /// Protocol version.
    pub version: u16,
    /// The device rotating its keys.
    pub device_id: DeviceId,
    /// Suite of the new KEM key.
    pub kem_suite: KemSuite,
    /// The new KEM public key.
    #[serde(with = "b64")]
    pub kem_public_key: Vec<u8>,
    /// Suite of the new verifying key.
    pub signature_suite: SignatureSuite,
    /// The new verifying key.
    #[serde(with = "b64")]
    pub verifying_key: Vec<u8>,
    /// Unix seconds when the request was made.
    pub issued_at: u64,
    /// Signature by the device's current (old) key.
    #[serde(with = "b64")]
    pub old_key_signature: Vec<u8>,
    /// Signature by the new key.
    #[serde(with = "b64")]
    pub new_key_signature: Vec<u8>,
}

fn transcript(
    device_id: &DeviceId,
    old_key: &VerifyingKey,
    kem_public_key: &KemPublicKey,
    verifying_key: &VerifyingKey,
    issued_at: u64,
) -> TranscriptHash {
    let mut t = Transcript::new(Domain::KeyRotation);
    t.append("device_id", device_id.as_bytes())
        .append("old_signature_suite", old_key.suite().as_str().as_bytes())
        .append("old_verifying_key", old_key.as_bytes())
        .append("kem_suite", kem_public_key.suite().as_str().as_bytes())
        .append("kem_public_key", kem_public_key.as_bytes())
        .append("signature_suite", verifying_key.suite().as_str().as_bytes())
        .append("verifying_key", verifying_key.as_bytes())
        .append_u64("issued_at", issued_at);
    t.hash()
}

/// Device side: builds the request that replaces `old_key` with `new_keys`.
pub fn build_request(
    device_id: DeviceId,
    old_key: &SigningKey,
    new_keys: &DeviceKeys,
    now: u64,
) -> Result<KeyRotationRequest> {
    let hash = transcript(
        &device_id,
        old_key.verifying_key(),
        &new_keys.kem.public,
        new_keys.signing.verifying_key(),
        now,
    );
    Ok(KeyRotationRequest {
        version: PROTOCOL_VERSION,
        device_id,
        kem_suite: new_keys.kem.public.suite(),
        kem_public_key: new_keys.kem.public.as_bytes().to_vec(),
        signature_suite: new_keys.signing.suite(),
        verifying_key: new_keys.signing.verifying_key().as_bytes().to_vec(),
        issued_at: now,
        old_key_signature: old_key.sign(hash.as_bytes())?,
        new_key_signature: new_keys.signing.sign(hash.as_bytes())?,
    })
}

/// The new public keys of a verified rotation.
#[derive(Debug, Clone)]
pub struct VerifiedRotation {
    /// The new KEM key.
    pub kem_public_key: KemPublicKey,
    /// The new verifying key.
    pub verifying_key: VerifyingKey,
}

/// Server side: checks the request of `device_id`, whose registered key is `old_key`.
pub fn verify_request(
    request: &KeyRotationRequest,
    device_id: &DeviceId,
    old_key: &VerifyingKey,
    now: u64,
) -> Result<VerifiedRotation> {
    if request.version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(request.version));
    }
    if &request.device_id != device_id {
        return Err(ProtocolError::Mismatch("device id"));
    }
    if request.issued_at.abs_diff(now) > MAX_CLOCK_SKEW_SECS {
        return Err(ProtocolError::Expired {
            expires_at: request.issued_at.saturating_add(MAX_CLOCK_SKEW_SECS),
            now,
        });
    }
    let kem_public_key =
        KemPublicKey::from_bytes(request.kem_suite, request.kem_public_key.clone())?;
    let verifying_key =
        VerifyingKey::from_bytes(request.signature_suite, request.verifying_key.clone())?;
    if &verifying_key == old_key {
        return Err(ProtocolError::malformed(
            "key rotation",
            "the new key equals the old key",
        ));
    }
    let hash = transcript(
        device_id,
        old_key,
        &kem_public_key,
        &verifying_key,
        request.issued_at,
    );
    old_key.verify(
        hash.as_bytes(),
        &request.old_key_signature,
        "rotation by the old key",
    )?;
    verifying_key.verify(
        hash.as_bytes(),
        &request.new_key_signature,
        "rotation by the new key",
    )?;
    Ok(VerifiedRotation {
        kem_public_key,
        verifying_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn rotation_needs_both_keys_and_a_fresh_time() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(61);
        let old =
            DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng).unwrap();
        let new =
            DeviceKeys::generate(KemSuite::MlKem1024, SignatureSuite::MlDsa87, &mut rng).unwrap();
        let thief =
            DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng).unwrap();
        let id = DeviceId::random(&mut rng);
        let request = build_request(id, &old.signing, &new, 1000).unwrap();
        let verified = verify_request(&request, &id, old.signing.verifying_key(), 1100).unwrap();
        assert_eq!(verified.kem_public_key.suite(), KemSuite::MlKem1024);

        // Signed by someone else's old key.
        let forged = build_request(id, &thief.signing, &new, 1000).unwrap();
        assert!(verify_request(&forged, &id, old.signing.verifying_key(), 1000).is_err());
        // New key without possession: swap in another public key.
        let mut swapped = request.clone();
        swapped.verifying_key = thief.signing.verifying_key().as_bytes().to_vec();
        assert!(verify_request(&swapped, &id, old.signing.verifying_key(), 1000).is_err());
        // Stale, or for another device.
        assert!(matches!(
            verify_request(&request, &id, old.signing.verifying_key(), 2000),
            Err(ProtocolError::Expired { .. })
        ));
        let other = DeviceId::random(&mut rng);
        assert!(verify_request(&request, &other, old.signing.verifying_key(), 1000).is_err());
    }
}
