//! Step 1: enrollment with a single-use token and proof of possession.
//!
//! ```text
//! device                                          server
//!   keys <- generate(kem suite, signature suite)
//!   EnrollRequest { token, name, public keys,
//!                   pinned server fingerprint,
//!                   proof = Sign_device(T_req) }  ──▶  verify proof, consume token
//!                                                  ◀──  EnrollResponse { device id,
//!   verify with pinned server key                       enrolled_at, Sign_server(T_resp) }
//! ```
//!
//! `T_req` binds the token's hash, the device name, both suites and public
//! keys, and the fingerprint the device pinned, so a proof cannot be replayed
//! with other keys, another token, or toward another server. `T_resp` chains
//! `T_req` with the assigned id, so the answer belongs to this request only.

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;
use crate::error::{ProtocolError, Result};
use crate::identity::{
    DeviceId, DeviceKeys, EnrollmentToken, ServerFingerprint, TokenHash, validate_device_name,
};
use crate::kem::KemPublicKey;
use crate::sig::{SigningKey, VerifyingKey};
use crate::suite::{KemSuite, SignatureSuite};
use crate::transcript::{Domain, Transcript, TranscriptHash};
use crate::wire::b64;

/// `POST /v1/enroll` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// Protocol version.
    pub version: u16,
    /// The enrollment token, base64url.
    pub token: String,
    /// Operator-chosen device name.
    pub device_name: String,
    /// The KEM suite of `kem_public_key`.
    pub kem_suite: KemSuite,
    /// The device's KEM public key.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub kem_public_key: Vec<u8>,
    /// The signature suite of `verifying_key`.
    pub signature_suite: SignatureSuite,
    /// The device's verifying key.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub verifying_key: Vec<u8>,
    /// The fingerprint the device pinned for this server (hex).
    pub server_fingerprint: String,
    /// Proof of possession: the device's signature over the request transcript.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub proof: Vec<u8>,
}

/// `POST /v1/enroll` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// Protocol version.
    pub version: u16,
    /// The id the server assigned.
    pub device_id: DeviceId,
    /// Unix seconds of enrollment.
    pub enrolled_at: u64,
    /// The server's signature over the response transcript.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub signature: Vec<u8>,
}

/// `GET /v1/server-info`: what a device needs before enrolling. Fetched over
/// a TLS connection whose certificate the device then checks, together with
/// `verifying_key`, against the fingerprint it was given out of band.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServerInfo {
    /// Protocol version.
    pub version: u16,
    /// The server's fingerprint (hex), for display; devices recompute it.
    pub fingerprint: String,
    /// The server's signature suite.
    pub signature_suite: SignatureSuite,
    /// The server's ML-DSA verifying key.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub verifying_key: Vec<u8>,
    /// KEM suites devices may enroll with.
    pub kem_suites: Vec<KemSuite>,
    /// The KEM suite the server recommends.
    pub default_kem_suite: KemSuite,
    /// Signature suites devices may enroll with.
    pub signature_suites: Vec<SignatureSuite>,
    /// Every hand-over of the server's identity to a new key, oldest first:
    /// how a device whose pin is older than the current key catches up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_handovers: Vec<crate::handover::ServerKeyHandover>,
}

fn request_transcript(
    token_hash: &TokenHash,
    device_name: &str,
    kem_public_key: &KemPublicKey,
    verifying_key: &VerifyingKey,
    server: &ServerFingerprint,
) -> TranscriptHash {
    let mut t = Transcript::new(Domain::EnrollRequest);
    t.append("token_hash", token_hash.0.as_bytes())
        .append("device_name", device_name.as_bytes())
        .append("kem_suite", kem_public_key.suite().as_str().as_bytes())
        .append("kem_public_key", kem_public_key.as_bytes())
        .append("signature_suite", verifying_key.suite().as_str().as_bytes())
        .append("verifying_key", verifying_key.as_bytes())
        .append("server_fingerprint", server.as_bytes());
    t.hash()
}

fn response_transcript(
    request: &TranscriptHash,
    device_id: &DeviceId,
    enrolled_at: u64,
) -> TranscriptHash {
    let mut t = Transcript::new(Domain::EnrollResponse);
    t.append_hash("request", request)
        .append("device_id", device_id.as_bytes())
        .append_u64("enrolled_at", enrolled_at);
    t.hash()
}

/// Device side: builds a signed enrollment request.
pub fn build_request(
    token: &EnrollmentToken,
    device_name: &str,
    keys: &DeviceKeys,
    server: &ServerFingerprint,
) -> Result<EnrollRequest> {
    validate_device_name(device_name)?;
    let transcript = request_transcript(
        &token.hash(),
        device_name,
        &keys.kem.public,
        keys.signing.verifying_key(),
        server,
    );
    Ok(EnrollRequest {
        version: PROTOCOL_VERSION,
        token: token.reveal(),
        device_name: device_name.to_owned(),
        kem_suite: keys.kem.public.suite(),
        kem_public_key: keys.kem.public.as_bytes().to_vec(),
        signature_suite: keys.signing.suite(),
        verifying_key: keys.signing.verifying_key().as_bytes().to_vec(),
        server_fingerprint: server.to_string(),
        proof: keys.signing.sign(transcript.as_bytes())?,
    })
}

/// An enrollment request whose proof of possession has been checked.
/// The token has *not* been consumed yet: that is the server's atomic step.
#[derive(Debug)]
pub struct VerifiedRequest {
    /// The hash to look the token up by and consume.
    pub token_hash: TokenHash,
    /// The validated device name.
    pub device_name: String,
    /// The device's KEM key.
    pub kem_public_key: KemPublicKey,
    /// The device's verifying key.
    pub verifying_key: VerifyingKey,
    transcript: TranscriptHash,
}

/// Server side: checks version, name, suites, keys, the pinned fingerprint
/// and the proof of possession.
pub fn verify_request(
    request: &EnrollRequest,
    server: &ServerFingerprint,
    allowed_kem: &[KemSuite],
    allowed_signature: &[SignatureSuite],
) -> Result<VerifiedRequest> {
    if request.version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(request.version));
    }
    validate_device_name(&request.device_name)?;
    if !allowed_kem.contains(&request.kem_suite)
        || !allowed_signature.contains(&request.signature_suite)
    {
        return Err(ProtocolError::SuiteMismatch {
            expected: "a suite this server offers",
            actual: if allowed_kem.contains(&request.kem_suite) {
                request.signature_suite.as_str()
            } else {
                request.kem_suite.as_str()
            },
        });
    }
    let pinned = ServerFingerprint::parse(&request.server_fingerprint)?;
    if !pinned.matches(server) {
        return Err(ProtocolError::PinMismatch);
    }
    let token = EnrollmentToken::parse(&request.token)?;
    let token_hash = token.hash();
    let kem_public_key =
        KemPublicKey::from_bytes(request.kem_suite, request.kem_public_key.clone())?;
    let verifying_key =
        VerifyingKey::from_bytes(request.signature_suite, request.verifying_key.clone())?;
    let transcript = request_transcript(
        &token_hash,
        &request.device_name,
        &kem_public_key,
        &verifying_key,
        server,
    );
    verifying_key.verify(
        transcript.as_bytes(),
        &request.proof,
        "enrollment proof of possession",
    )?;
    Ok(VerifiedRequest {
        token_hash,
        device_name: request.device_name.clone(),
        kem_public_key,
        verifying_key,
        transcript,
    })
}

/// Server side: signs the answer once the token is consumed and the device stored.
pub fn sign_response(
    request: &VerifiedRequest,
    device_id: DeviceId,
    enrolled_at: u64,
    server_key: &SigningKey,
) -> Result<EnrollResponse> {
    let transcript = response_transcript(&request.transcript, &device_id, enrolled_at);
    Ok(EnrollResponse {
        version: PROTOCOL_VERSION,
        device_id,
        enrolled_at,
        signature: server_key.sign(transcript.as_bytes())?,
    })
}

/// Device side: checks the answer against the pinned server key.
pub fn verify_response(
    response: &EnrollResponse,
    request: &EnrollRequest,
    server_key: &VerifyingKey,
    server: &ServerFingerprint,
) -> Result<DeviceId> {
    if response.version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(response.version));
    }
    let token = EnrollmentToken::parse(&request.token)?;
    let kem_public_key =
        KemPublicKey::from_bytes(request.kem_suite, request.kem_public_key.clone())?;
    let verifying_key =
        VerifyingKey::from_bytes(request.signature_suite, request.verifying_key.clone())?;
    let request_hash = request_transcript(
        &token.hash(),
        &request.device_name,
        &kem_public_key,
        &verifying_key,
        server,
    );
    let transcript = response_transcript(&request_hash, &response.device_id, response.enrolled_at);
    server_key.verify(
        transcript.as_bytes(),
        &response.signature,
        "enrollment response",
    )?;
    Ok(response.device_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    struct Fixture {
        rng: rand_chacha::ChaCha20Rng,
        server_key: SigningKey,
        fingerprint: ServerFingerprint,
        token: EnrollmentToken,
        keys: DeviceKeys,
    }

    fn fixture() -> Fixture {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let server_key = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
        let fingerprint = ServerFingerprint::compute(b"certificate", server_key.verifying_key());
        let token = EnrollmentToken::generate(&mut rng);
        let keys =
            DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng).unwrap();
        Fixture {
            rng,
            server_key,
            fingerprint,
            token,
            keys,
        }
    }

    #[test]
    fn honest_enrollment_round_trip() {
        let mut f = fixture();
        let request = build_request(&f.token, "edge-1", &f.keys, &f.fingerprint).unwrap();
        let verified = verify_request(
            &request,
            &f.fingerprint,
            &KemSuite::ALL,
            &SignatureSuite::ALL,
        )
        .unwrap();
        assert_eq!(verified.token_hash, f.token.hash());
        let id = DeviceId::random(&mut f.rng);
        let response = sign_response(&verified, id, 1_700_000_000, &f.server_key).unwrap();
        let got = verify_response(
            &response,
            &request,
            f.server_key.verifying_key(),
            &f.fingerprint,
        )
        .unwrap();
        assert_eq!(got, id);
    }

    #[test]
    fn proof_signed_by_another_key_is_refused() {
        let mut f = fixture();
        let mut request = build_request(&f.token, "edge-1", &f.keys, &f.fingerprint).unwrap();
        let thief =
            DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut f.rng).unwrap();
        // Keep the victim's public keys but sign with another key.
        let forged = build_request(&f.token, "edge-1", &thief, &f.fingerprint).unwrap();
        request.proof = forged.proof;
        assert!(matches!(
            verify_request(
                &request,
                &f.fingerprint,
                &KemSuite::ALL,
                &SignatureSuite::ALL
            ),
            Err(ProtocolError::BadSignature(_))
        ));
    }

    #[test]
    fn every_bound_field_is_checked() {
        let f = fixture();
        let request = build_request(&f.token, "edge-1", &f.keys, &f.fingerprint).unwrap();
        let mut other_token = request.clone();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(99);
        other_token.token = EnrollmentToken::generate(&mut rng).reveal();
        let mut other_name = request.clone();
        other_name.device_name = "edge-2".into();
        let mut other_pin = request.clone();
        other_pin.server_fingerprint = "00".repeat(32);
        let mut bad_version = request.clone();
        bad_version.version = 99;
        for (case, expect_pin) in [(other_token, false), (other_name, false), (other_pin, true)] {
            let err = verify_request(&case, &f.fingerprint, &KemSuite::ALL, &SignatureSuite::ALL)
                .unwrap_err();
            if expect_pin {
                assert_eq!(err, ProtocolError::PinMismatch);
            } else {
                assert!(matches!(err, ProtocolError::BadSignature(_)), "{err:?}");
            }
        }
        assert_eq!(
            verify_request(
                &bad_version,
                &f.fingerprint,
                &KemSuite::ALL,
                &SignatureSuite::ALL
            )
            .unwrap_err(),
            ProtocolError::UnsupportedVersion(99)
        );
        assert!(matches!(
            verify_request(
                &request,
                &f.fingerprint,
                &[KemSuite::MlKem1024],
                &SignatureSuite::ALL
            ),
            Err(ProtocolError::SuiteMismatch { .. })
        ));
    }

    #[test]
    fn response_from_another_server_key_is_refused() {
        let mut f = fixture();
        let request = build_request(&f.token, "edge-1", &f.keys, &f.fingerprint).unwrap();
        let verified = verify_request(
            &request,
            &f.fingerprint,
            &KemSuite::ALL,
            &SignatureSuite::ALL,
        )
        .unwrap();
        let impostor = SigningKey::generate(SignatureSuite::MlDsa65, &mut f.rng).unwrap();
        let id = DeviceId::random(&mut f.rng);
        let response = sign_response(&verified, id, 5, &impostor).unwrap();
        assert!(
            verify_response(
                &response,
                &request,
                f.server_key.verifying_key(),
                &f.fingerprint
            )
            .is_err()
        );
        let mut tampered = sign_response(&verified, id, 5, &f.server_key).unwrap();
        tampered.device_id = DeviceId::random(&mut f.rng);
        assert!(
            verify_response(
                &tampered,
                &request,
                f.server_key.verifying_key(),
                &f.fingerprint
            )
            .is_err()
        );
    }
}
