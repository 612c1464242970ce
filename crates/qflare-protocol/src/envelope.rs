//! Step 4: the signed, end-to-end sealed update envelope.
//!
//! ```text
//! inner σ_i = Sign_device(H(round, device, model version, examples, SHA-256(update)))
//! (ct, ss)  = Encaps(enclave KEM key)                      -- from the attestation report
//! T_env     = H(version, round, device, model version, suite, enclave key, ct)
//! key, iv   = HKDF(salt = T_env, ikm = ss)
//! payload   = AES-256-GCM(key, iv, aad = T_env; examples ‖ σ_i ‖ update)
//! outer σ_o = Sign_device(H(version, round, device, model version, suite, ct, payload))
//! ```
//!
//! The host checks σ_o with the device's registered key (so only enrolled
//! devices reach the enclave) and forwards the envelope; it never holds `ss`
//! and learns neither the update nor even the example count. The enclave
//! decapsulates, opens, and checks σ_i, which binds the update to the round
//! and model version it was trained for: an envelope replayed into another
//! round, or re-signed by another device, fails there.
//!
//! The key and IV are used for exactly one message, so the fixed sequence 0
//! is a unique nonce. This is HPKE's base mode (RFC 9180) in structure, with
//! our transcript in place of HPKE's labeled extract.

use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::PROTOCOL_VERSION;
use crate::channel::Reader;
use crate::crypto::{AeadKey, hkdf_sha256, sha256};
use crate::error::{ProtocolError, Result};
use crate::identity::{DEVICE_ID_LEN, DeviceId};
use crate::kem::{KemPublicKey, KemSecretKey};
use crate::sig::{SigningKey, VerifyingKey};
use crate::suite::KemSuite;
use crate::transcript::{Domain, Transcript, TranscriptHash};
use crate::wire::b64;

/// What an update claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateMetadata {
    /// The round it was trained for.
    pub round_id: u64,
    /// The device that trained it.
    pub device_id: DeviceId,
    /// The global model version it started from.
    pub model_version: u64,
    /// How many local examples it was trained on (FedAvg's weight).
    pub example_count: u64,
}

/// The envelope as it travels from device through host to enclave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateEnvelope {
    /// Protocol version.
    pub version: u16,
    /// The round (cleartext, so the host can route it).
    pub round_id: u64,
    /// The device (cleartext, so the host can check the outer signature).
    pub device_id: DeviceId,
    /// The global model version the update starts from.
    pub model_version: u64,
    /// Suite of the enclave key the payload is sealed to.
    pub kem_suite: KemSuite,
    /// The encapsulation to the enclave key.
    #[serde(with = "b64")]
    pub kem_ciphertext: Vec<u8>,
    /// AES-256-GCM of example count, inner signature and update.
    #[serde(with = "b64")]
    pub sealed_payload: Vec<u8>,
    /// The device's signature over the whole envelope.
    #[serde(with = "b64")]
    pub outer_signature: Vec<u8>,
}

/// The first bytes of an envelope's binary encoding. An envelope's JSON
/// starts with `{`, so one look at the first byte tells the two apart.
pub const BINARY_MAGIC: [u8; 4] = *b"QFE\x01";

impl UpdateEnvelope {
    /// The binary encoding devices send: the cleartext header, then the
    /// three byte strings as they are. JSON's base64 makes an update a third
    /// larger and costs the host and the enclave a parse of every byte; this
    /// costs a copy. All integers are big-endian.
    ///
    /// ```text
    /// "QFE\x01" ‖ version u16 ‖ round_id u64 ‖ device_id [16] ‖ model_version u64
    ///   ‖ suite name length u8 ‖ suite name (e.g. "ml-kem-768")
    ///   ‖ u32 length ‖ kem_ciphertext ‖ u32 length ‖ outer_signature
    ///   ‖ sealed_payload (the rest)
    /// ```
    pub fn to_bytes(&self) -> Vec<u8> {
        let suite = self.kem_suite.as_str().as_bytes();
        let mut out = Vec::with_capacity(
            BINARY_MAGIC.len()
                + 2
                + 8
                + DEVICE_ID_LEN
                + 8
                + 1
                + suite.len()
                + 8
                + self.kem_ciphertext.len()
                + self.outer_signature.len()
                + self.sealed_payload.len(),
        );
        out.extend_from_slice(&BINARY_MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.round_id.to_be_bytes());
        out.extend_from_slice(self.device_id.as_bytes());
        out.extend_from_slice(&self.model_version.to_be_bytes());
        // Suite names are short ASCII constants (`KemSuite::as_str`).
        out.push(suite.len() as u8);
        out.extend_from_slice(suite);
        for field in [&self.kem_ciphertext, &self.outer_signature] {
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field);
        }
        out.extend_from_slice(&self.sealed_payload);
        out
    }

    /// Reads [`UpdateEnvelope::to_bytes`]' encoding; every byte must belong
    /// to a field.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let malformed =
            |_| ProtocolError::malformed("update envelope", "truncated binary envelope");
        let mut reader = Reader::new(bytes);
        if reader.array::<4>().map_err(malformed)? != BINARY_MAGIC {
            return Err(ProtocolError::malformed(
                "update envelope",
                "not a binary envelope",
            ));
        }
        let version = u16::from_be_bytes(reader.array().map_err(malformed)?);
        let round_id = u64::from_be_bytes(reader.array().map_err(malformed)?);
        let device_id = DeviceId::from_bytes(reader.array().map_err(malformed)?);
        let model_version = u64::from_be_bytes(reader.array().map_err(malformed)?);
        let [suite_len] = reader.array().map_err(malformed)?;
        let suite = reader.take(usize::from(suite_len)).map_err(malformed)?;
        let kem_suite: KemSuite = std::str::from_utf8(suite)
            .map_err(|_| ProtocolError::malformed("update envelope", "suite name is not UTF-8"))?
            .parse()?;
        let mut field = || -> Result<Vec<u8>> {
            let len = u32::from_be_bytes(reader.array().map_err(malformed)?) as usize;
            Ok(reader.take(len).map_err(malformed)?.to_vec())
        };
        let kem_ciphertext = field()?;
        let outer_signature = field()?;
        let sealed_payload = reader.rest().to_vec();
        Ok(Self {
            version,
            round_id,
            device_id,
            model_version,
            kem_suite,
            kem_ciphertext,
            sealed_payload,
            outer_signature,
        })
    }
}

/// Decodes an envelope in either encoding — binary (what devices send) or
/// JSON (what devices before the binary encoding sent, still accepted) —
/// refusing anything over `limit` bytes before looking at it.
pub fn decode(bytes: &[u8], limit: usize) -> Result<UpdateEnvelope> {
    if bytes.len() > limit {
        return Err(ProtocolError::TooLarge {
            what: "update envelope",
            limit,
            actual: bytes.len(),
        });
    }
    if bytes.starts_with(&BINARY_MAGIC) {
        UpdateEnvelope::from_bytes(bytes)
    } else {
        crate::wire::decode("update envelope", bytes, limit)
    }
}

/// An update the enclave has opened and whose inner signature verified.
pub struct OpenedUpdate {
    /// The verified metadata.
    pub metadata: UpdateMetadata,
    /// The update bytes (safetensors), wiped on drop.
    pub update: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for OpenedUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OpenedUpdate({:?}, {} bytes)",
            self.metadata,
            self.update.len()
        )
    }
}

fn inner_transcript(meta: &UpdateMetadata, update_digest: &[u8; 32]) -> TranscriptHash {
    let mut t = Transcript::new(Domain::UpdateInner);
    t.append_u64("round_id", meta.round_id)
        .append("device_id", meta.device_id.as_bytes())
        .append_u64("model_version", meta.model_version)
        .append_u64("example_count", meta.example_count)
        .append("update_sha256", update_digest);
    t.hash()
}

fn key_transcript(
    version: u16,
    round_id: u64,
    device_id: &DeviceId,
    model_version: u64,
    enclave_key: &KemPublicKey,
    kem_ciphertext: &[u8],
) -> TranscriptHash {
    let mut t = Transcript::new(Domain::EnvelopeKey);
    t.append_u64("version", u64::from(version))
        .append_u64("round_id", round_id)
        .append("device_id", device_id.as_bytes())
        .append_u64("model_version", model_version)
        .append("kem_suite", enclave_key.suite().as_str().as_bytes())
        .append("enclave_key", enclave_key.as_bytes())
        .append("kem_ciphertext", kem_ciphertext);
    t.hash()
}

fn outer_transcript(envelope: &UpdateEnvelope) -> TranscriptHash {
    let mut t = Transcript::new(Domain::UpdateOuter);
    t.append_u64("version", u64::from(envelope.version))
        .append_u64("round_id", envelope.round_id)
        .append("device_id", envelope.device_id.as_bytes())
        .append_u64("model_version", envelope.model_version)
        .append("kem_suite", envelope.kem_suite.as_str().as_bytes())
        .append("kem_ciphertext", &envelope.kem_ciphertext)
        .append("sealed_payload", &envelope.sealed_payload);
    t.hash()
}

fn payload_key(
    transcript: &TranscriptHash,
    shared: &crate::secret::SecretBytes,
) -> Result<AeadKey> {
    let [key, iv] = hkdf_sha256(
        transcript.as_bytes(),
        shared.expose(),
        [
            (b"qflare v1 envelope key", 32),
            (b"qflare v1 envelope iv", 12),
        ],
    )?;
    AeadKey::new(&key, &iv)
}

/// Device side: signs, seals to the enclave key, signs again.
pub fn seal<R: CryptoRng + ?Sized>(
    metadata: &UpdateMetadata,
    update: &[u8],
    device_key: &SigningKey,
    enclave_key: &KemPublicKey,
    rng: &mut R,
) -> Result<UpdateEnvelope> {
    let inner_signature =
        device_key.sign(inner_transcript(metadata, &sha256(update)).as_bytes())?;
    let (kem_ciphertext, shared) = enclave_key.encapsulate(rng)?;
    let transcript = key_transcript(
        PROTOCOL_VERSION,
        metadata.round_id,
        &metadata.device_id,
        metadata.model_version,
        enclave_key,
        &kem_ciphertext,
    );
    let mut payload = Vec::with_capacity(8 + 4 + inner_signature.len() + update.len() + 16);
    payload.extend_from_slice(&metadata.example_count.to_be_bytes());
    payload.extend_from_slice(&(inner_signature.len() as u32).to_be_bytes());
    payload.extend_from_slice(&inner_signature);
    payload.extend_from_slice(update);
    payload_key(&transcript, &shared)?.seal_in_place(0, transcript.as_bytes(), &mut payload)?;

    let mut envelope = UpdateEnvelope {
        version: PROTOCOL_VERSION,
        round_id: metadata.round_id,
        device_id: metadata.device_id,
        model_version: metadata.model_version,
        kem_suite: enclave_key.suite(),
        kem_ciphertext,
        sealed_payload: payload,
        outer_signature: Vec::new(),
    };
    envelope.outer_signature = device_key.sign(outer_transcript(&envelope).as_bytes())?;
    Ok(envelope)
}

/// Host side: is this envelope really from the device it names?
pub fn verify_outer(envelope: &UpdateEnvelope, device_key: &VerifyingKey) -> Result<()> {
    if envelope.version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(envelope.version));
    }
    device_key.verify(
        outer_transcript(envelope).as_bytes(),
        &envelope.outer_signature,
        "envelope outer signature",
    )
}

/// Enclave side: checks the outer signature, decapsulates, opens, and checks
/// the inner signature. `enclave_public` must be the key the payload was
/// sealed to (the one in this enclave's attestation report).
pub fn open(
    envelope: &UpdateEnvelope,
    enclave_secret: &KemSecretKey,
    enclave_public: &KemPublicKey,
    device_key: &VerifyingKey,
) -> Result<OpenedUpdate> {
    verify_outer(envelope, device_key)?;
    if envelope.kem_suite != enclave_secret.suite()
        || enclave_public.suite() != enclave_secret.suite()
    {
        return Err(ProtocolError::SuiteMismatch {
            expected: enclave_secret.suite().as_str(),
            actual: envelope.kem_suite.as_str(),
        });
    }
    let shared = enclave_secret.decapsulate(&envelope.kem_ciphertext)?;
    let transcript = key_transcript(
        envelope.version,
        envelope.round_id,
        &envelope.device_id,
        envelope.model_version,
        enclave_public,
        &envelope.kem_ciphertext,
    );
    let mut payload = Zeroizing::new(envelope.sealed_payload.clone());
    payload_key(&transcript, &shared)?.open_in_place(
        0,
        transcript.as_bytes(),
        &mut payload,
        "envelope payload",
    )?;

    let mut reader = Reader::new(&payload);
    let example_count = u64::from_be_bytes(reader.array()?);
    let signature_len = u32::from_be_bytes(reader.array()?) as usize;
    if signature_len != device_key.suite().signature_len() {
        return Err(ProtocolError::malformed(
            "envelope payload",
            "bad inner signature length",
        ));
    }
    let inner_signature = reader.take(signature_len)?;
    let update = reader.rest();
    let metadata = UpdateMetadata {
        round_id: envelope.round_id,
        device_id: envelope.device_id,
        model_version: envelope.model_version,
        example_count,
    };
    device_key.verify(
        inner_transcript(&metadata, &sha256(update)).as_bytes(),
        inner_signature,
        "update inner signature",
    )?;
    Ok(OpenedUpdate {
        metadata,
        update: Zeroizing::new(update.to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kem::KemKeyPair;
    use crate::suite::SignatureSuite;
    use rand::SeedableRng;

    struct Fixture {
        rng: rand_chacha::ChaCha20Rng,
        device: SigningKey,
        enclave: KemKeyPair,
        meta: UpdateMetadata,
    }

    fn fixture(suite: KemSuite) -> Fixture {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(21);
        let device = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
        let enclave = KemKeyPair::generate(suite, &mut rng).unwrap();
        let meta = UpdateMetadata {
            round_id: 7,
            device_id: DeviceId::random(&mut rng),
            model_version: 6,
            example_count: 600,
        };
        Fixture {
            rng,
            device,
            enclave,
            meta,
        }
    }

    #[test]
    fn round_trip_every_kem_suite() {
        for suite in KemSuite::ALL {
            let mut f = fixture(suite);
            let update = vec![42u8; 1000];
            let env = seal(&f.meta, &update, &f.device, &f.enclave.public, &mut f.rng).unwrap();
            verify_outer(&env, f.device.verifying_key()).unwrap();
            let opened = open(
                &env,
                &f.enclave.secret,
                &f.enclave.public,
                f.device.verifying_key(),
            )
            .unwrap();
            assert_eq!(opened.metadata, f.meta);
            assert_eq!(&opened.update[..], &update[..]);
            // The example count travels only inside the sealed payload.
            let wire = serde_json::to_string(&env).unwrap();
            assert!(!wire.contains("example"));
        }
    }

    #[test]
    fn binary_and_json_encodings_decode_to_the_same_envelope() {
        for suite in KemSuite::ALL {
            let mut f = fixture(suite);
            let update = vec![42u8; 3000];
            let env = seal(&f.meta, &update, &f.device, &f.enclave.public, &mut f.rng).unwrap();
            let binary = env.to_bytes();
            let json = serde_json::to_vec(&env).unwrap();
            assert_eq!(decode(&binary, usize::MAX).unwrap(), env);
            assert_eq!(decode(&json, usize::MAX).unwrap(), env);
            // The payload travels as it is: no base64 third on top.
            assert!(binary.len() < env.sealed_payload.len() + 20_000);
            assert!(json.len() > env.sealed_payload.len() * 4 / 3);
            verify_outer(
                &decode(&binary, usize::MAX).unwrap(),
                f.device.verifying_key(),
            )
            .unwrap();
        }
    }

    #[test]
    fn a_truncated_extended_or_oversized_binary_envelope_is_refused() {
        let mut f = fixture(KemSuite::MlKem768);
        let env = seal(
            &f.meta,
            &[1u8; 100],
            &f.device,
            &f.enclave.public,
            &mut f.rng,
        )
        .unwrap();
        let binary = env.to_bytes();
        // Every cut inside the header or the two sized fields is malformed;
        // a cut in the payload changes what the outer signature covers.
        let header = binary.len() - env.sealed_payload.len();
        for cut in 0..header {
            assert!(
                matches!(
                    decode(&binary[..cut], usize::MAX),
                    Err(ProtocolError::Malformed { .. })
                ),
                "cut at {cut}"
            );
        }
        let short = decode(&binary[..binary.len() - 1], usize::MAX).unwrap();
        assert!(verify_outer(&short, f.device.verifying_key()).is_err());
        let mut longer = binary.clone();
        longer.push(0);
        let longer = decode(&longer, usize::MAX).unwrap();
        assert!(verify_outer(&longer, f.device.verifying_key()).is_err());
        assert!(matches!(
            decode(&binary, binary.len() - 1),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut unknown_suite = binary.clone();
        let suite_at = 4 + 2 + 8 + DEVICE_ID_LEN + 8 + 1;
        unknown_suite[suite_at] = b'x';
        assert!(decode(&unknown_suite, usize::MAX).is_err());
    }
}
