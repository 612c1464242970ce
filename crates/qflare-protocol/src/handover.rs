//! Server key rotation: the server hands its identity (ML-DSA key and TLS
//! certificate) over to a successor with a statement signed by the old key,
//! which devices pin, and by the new key (proof of possession), both over one
//! transcript that names the two keys, the new certificate and the time.
//!
//! The server publishes every hand-over it has made, oldest first, in
//! `/v1/server-info`. A device whose pin no longer matches the server walks
//! that chain from the key it pins ([`follow_chain`]): each link must be
//! signed by the key the device trusts at that point, and the chain must end
//! at exactly the key and certificate the server presents. So a device that
//! slept through several rotations still catches up, and nobody without a
//! pinned key can move a device's pin. A stolen old key can; rotation does
//! not revoke (see docs/system_design.md §14).

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;
use crate::crypto::sha256;
use crate::error::{ProtocolError, Result};
use crate::identity::ServerFingerprint;
use crate::secret::ct_eq;
use crate::sig::{SigningKey, VerifyingKey};
use crate::suite::SignatureSuite;
use crate::transcript::{Domain, Transcript, TranscriptHash};
use crate::wire::b64;

/// The most hand-overs a server publishes or a device walks.
pub const MAX_CHAIN: usize = 64;

/// One hand-over from an old server key and certificate to new ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServerKeyHandover {
    /// Protocol version.
    pub version: u16,
    /// Suite of the key handing over.
    pub old_signature_suite: SignatureSuite,
    /// The key handing over.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, content_encoding = "base64url"))]
    pub old_verifying_key: Vec<u8>,
    /// Suite of the successor key.
    pub new_signature_suite: SignatureSuite,
    /// The successor key.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, content_encoding = "base64url"))]
    pub new_verifying_key: Vec<u8>,
    /// The successor's TLS end-entity certificate (DER).
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, content_encoding = "base64url"))]
    pub new_certificate: Vec<u8>,
    /// Unix seconds when the hand-over was made.
    pub issued_at: u64,
    /// Signature by the old key.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, content_encoding = "base64url"))]
    pub old_key_signature: Vec<u8>,
    /// Signature by the new key.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, content_encoding = "base64url"))]
    pub new_key_signature: Vec<u8>,
}

fn transcript(
    old_key: &VerifyingKey,
    new_key: &VerifyingKey,
    new_certificate: &[u8],
    issued_at: u64,
) -> TranscriptHash {
    let mut t = Transcript::new(Domain::ServerKeyHandover);
    t.append("old_signature_suite", old_key.suite().as_str().as_bytes())
        .append("old_verifying_key", old_key.as_bytes())
        .append("new_signature_suite", new_key.suite().as_str().as_bytes())
        .append("new_verifying_key", new_key.as_bytes())
        .append("new_certificate", new_certificate)
        .append_u64("issued_at", issued_at);
    t.hash()
}

/// Server side: `old` hands over to `new`, whose TLS certificate is
/// `new_certificate` (DER).
pub fn build(
    old: &SigningKey,
    new: &SigningKey,
    new_certificate: &[u8],
    now: u64,
) -> Result<ServerKeyHandover> {
    if old.verifying_key() == new.verifying_key() {
        return Err(ProtocolError::malformed(
            "server key hand-over",
            "the new key equals the old key",
        ));
    }
    let hash = transcript(
        old.verifying_key(),
        new.verifying_key(),
        new_certificate,
        now,
    );
    Ok(ServerKeyHandover {
        version: PROTOCOL_VERSION,
        old_signature_suite: old.suite(),
        old_verifying_key: old.verifying_key().as_bytes().to_vec(),
        new_signature_suite: new.suite(),
        new_verifying_key: new.verifying_key().as_bytes().to_vec(),
        new_certificate: new_certificate.to_vec(),
        issued_at: now,
        old_key_signature: old.sign(hash.as_bytes())?,
        new_key_signature: new.sign(hash.as_bytes())?,
    })
}

impl ServerKeyHandover {
    /// The key handing over, as stated (not yet verified).
    pub fn old_key(&self) -> Result<VerifyingKey> {
        VerifyingKey::from_bytes(self.old_signature_suite, self.old_verifying_key.clone())
    }

    /// Checks that `trusted` signed this hand-over and the new key accepted
    /// it; returns the new key.
    pub fn verify(&self, trusted: &VerifyingKey) -> Result<VerifyingKey> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(self.version));
        }
        if &self.old_key()? != trusted {
            return Err(ProtocolError::Mismatch("server key hand-over: old key"));
        }
        let new_key =
            VerifyingKey::from_bytes(self.new_signature_suite, self.new_verifying_key.clone())?;
        let hash = transcript(trusted, &new_key, &self.new_certificate, self.issued_at);
        trusted.verify(
            hash.as_bytes(),
            &self.old_key_signature,
            "server key hand-over by the old key",
        )?;
        new_key.verify(
            hash.as_bytes(),
            &self.new_key_signature,
            "server key hand-over by the new key",
        )?;
        Ok(new_key)
    }
}

/// Where a walk of the chain ends: what a device pins from now on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSuccessor {
    /// The server's current ML-DSA key.
    pub key: VerifyingKey,
    /// SHA-256 of its current TLS certificate.
    pub certificate_sha256: [u8; 32],
    /// The fingerprint over both.
    pub fingerprint: ServerFingerprint,
    /// How many hand-overs were followed.
    pub steps: usize,
}

/// Device side: walks `chain` (oldest first) from the `pinned` key to the
/// key and certificate the server `presents`. Links before the pinned key
/// are skipped (a device enrolled after them); every link after it must be
/// signed by the key trusted at that point, and the last must name exactly
/// what the server presents.
pub fn follow_chain(
    chain: &[ServerKeyHandover],
    pinned: &VerifyingKey,
    presented_key: &VerifyingKey,
    presented_certificate: &[u8],
) -> Result<ServerSuccessor> {
    if chain.len() > MAX_CHAIN {
        return Err(ProtocolError::malformed(
            "server key hand-overs",
            format!("more than {MAX_CHAIN}"),
        ));
    }
    let start = chain
        .iter()
        .position(|link| link.old_key().is_ok_and(|old| &old == pinned))
        .ok_or(ProtocolError::Mismatch(
            "server key hand-overs: none starts at the pinned key",
        ))?;
    let mut trusted = pinned.clone();
    let mut certificate: &[u8] = &[];
    for link in &chain[start..] {
        trusted = link.verify(&trusted)?;
        certificate = &link.new_certificate;
    }
    if &trusted != presented_key || !ct_eq(certificate, presented_certificate) {
        return Err(ProtocolError::Mismatch(
            "server key hand-overs: the chain does not end at the server's key and certificate",
        ));
    }
    Ok(ServerSuccessor {
        fingerprint: ServerFingerprint::compute(presented_certificate, &trusted),
        certificate_sha256: sha256(presented_certificate),
        key: trusted,
        steps: chain.len() - start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn key(rng: &mut rand_chacha::ChaCha20Rng) -> SigningKey {
        SigningKey::generate(SignatureSuite::MlDsa65, rng).unwrap()
    }

    #[test]
    fn a_device_follows_two_hand_overs_from_its_pin() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(71);
        let (a, b, c) = (key(&mut rng), key(&mut rng), key(&mut rng));
        let chain = vec![
            build(&a, &b, b"cert-b", 10).unwrap(),
            build(&b, &c, b"cert-c", 20).unwrap(),
        ];
        let end = follow_chain(&chain, a.verifying_key(), c.verifying_key(), b"cert-c").unwrap();
        assert_eq!(&end.key, c.verifying_key());
        assert_eq!(end.steps, 2);
        assert_eq!(end.certificate_sha256, sha256(b"cert-c"));
        assert_eq!(
            end.fingerprint,
            ServerFingerprint::compute(b"cert-c", c.verifying_key())
        );
        // A device enrolled under B walks only the last link.
        let end = follow_chain(&chain, b.verifying_key(), c.verifying_key(), b"cert-c").unwrap();
        assert_eq!(end.steps, 1);
    }

    #[test]
    fn forged_or_mismatched_chains_are_refused() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(72);
        let (a, b, c, thief) = (key(&mut rng), key(&mut rng), key(&mut rng), key(&mut rng));
        let good = build(&a, &b, b"cert-b", 10).unwrap();
        // The thief claims A's hand-over but signs with its own key.
        let mut forged = build(&thief, &c, b"cert-c", 10).unwrap();
        forged.old_verifying_key = a.verifying_key().as_bytes().to_vec();
        assert!(follow_chain(&[forged], a.verifying_key(), c.verifying_key(), b"cert-c").is_err());
        // A genuine hand-over whose new key did not sign (no proof of possession).
        let mut unaccepted = good.clone();
        unaccepted.new_key_signature = thief
            .sign(transcript(a.verifying_key(), b.verifying_key(), b"cert-b", 10).as_bytes())
            .unwrap();
        assert!(
            follow_chain(
                &[unaccepted],
                a.verifying_key(),
                b.verifying_key(),
                b"cert-b"
            )
            .is_err()
        );
        // Any field changed breaks the signatures.
        let mut other_cert = good.clone();
        other_cert.new_certificate = b"cert-x".to_vec();
        assert!(
            follow_chain(
                &[other_cert],
                a.verifying_key(),
                b.verifying_key(),
                b"cert-x"
            )
            .is_err()
        );
        // A chain that ends elsewhere than what the server presents.
        let chain = [good.clone()];
        assert!(follow_chain(&chain, a.verifying_key(), c.verifying_key(), b"cert-b").is_err());
        assert!(follow_chain(&chain, a.verifying_key(), b.verifying_key(), b"cert-c").is_err());
        // No link from the pinned key.
        assert!(follow_chain(&chain, c.verifying_key(), b.verifying_key(), b"cert-b").is_err());
        // The same key cannot hand over to itself.
        assert!(build(&a, &a, b"cert-a", 10).is_err());
        // The wire form round-trips and refuses unknown fields.
        let json = serde_json::to_value(&good).unwrap();
        let back: ServerKeyHandover = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, good);
        let mut extra = json;
        extra["note"] = serde_json::json!("x");
        assert!(serde_json::from_value::<ServerKeyHandover>(extra).is_err());
    }
}
