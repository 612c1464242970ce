//! Thin, typed wrappers over the aws-lc-rs primitives the protocol uses:
//! SHA-256/SHA-384, HKDF-SHA-256, HMAC-SHA-256 and AES-256-GCM.
//!
//! Nothing here is a new primitive; these functions fix the algorithm choices
//! in one place and turn the backend's opaque errors into ours.

use aws_lc_rs::{aead, digest, hkdf, hmac};

use crate::error::{ProtocolError, Result};
use crate::secret::SecretBytes;

/// AES-256-GCM key length.
pub const AEAD_KEY_LEN: usize = 32;
/// AES-256-GCM nonce length.
pub const AEAD_NONCE_LEN: usize = 12;
/// AES-256-GCM tag length.
pub const AEAD_TAG_LEN: usize = 16;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

/// SHA-384 of `data`.
pub fn sha384(data: &[u8]) -> [u8; 48] {
    let mut out = [0u8; 48];
    out.copy_from_slice(digest::digest(&digest::SHA384, data).as_ref());
    out
}

/// HKDF-SHA-256 output-length marker for aws-lc-rs.
struct OutputLen(usize);

impl hkdf::KeyType for OutputLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA-256 (RFC 5869): extract with `salt` over `ikm`, then expand one
/// output per label. Each label yields an independent key.
pub fn hkdf_sha256<const N: usize>(
    salt: &[u8],
    ikm: &[u8],
    labels: [(&[u8], usize); N],
) -> Result<[SecretBytes; N]> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut outputs: [SecretBytes; N] = std::array::from_fn(|_| SecretBytes::default());
    for (slot, (label, len)) in outputs.iter_mut().zip(labels) {
        let mut buf = vec![0u8; len];
        prk.expand(&[label], OutputLen(len))
            .and_then(|okm| okm.fill(&mut buf))
            .map_err(|_| ProtocolError::Backend("hkdf"))?;
        *slot = SecretBytes::new(buf);
    }
    Ok(outputs)
}

/// HMAC-SHA-256 tag of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(hmac::sign(&key, message).as_ref());
    out
}

/// Constant-time HMAC-SHA-256 verification.
pub fn hmac_sha256_verify(key: &[u8], message: &[u8], tag: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::verify(&key, message, tag).is_ok()
}

/// An AES-256-GCM key bound to a fixed base IV, as in TLS 1.3: the nonce for
/// sequence number `n` is the IV XOR `n`, so no nonce is ever sent or reused.
pub struct AeadKey {
    key: aead::LessSafeKey,
    base_iv: [u8; AEAD_NONCE_LEN],
}

impl AeadKey {
    /// Builds a key from 32 key bytes and a 12-byte base IV.
    pub fn new(key: &SecretBytes, base_iv: &SecretBytes) -> Result<Self> {
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, key.expose())
            .map_err(|_| ProtocolError::Backend("aead key"))?;
        let iv: [u8; AEAD_NONCE_LEN] =
            base_iv
                .expose()
                .try_into()
                .map_err(|_| ProtocolError::InvalidLength {
                    what: "aead iv",
                    expected: AEAD_NONCE_LEN,
                    actual: base_iv.len(),
                })?;
        Ok(Self {
            key: aead::LessSafeKey::new(unbound),
            base_iv: iv,
        })
    }

    fn nonce(&self, sequence: u64) -> aead::Nonce {
        let mut nonce = self.base_iv;
        for (byte, seq_byte) in nonce[4..].iter_mut().zip(sequence.to_be_bytes()) {
            *byte ^= seq_byte;
        }
        aead::Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts `buffer` in place and appends the tag.
    pub fn seal_in_place(&self, sequence: u64, aad: &[u8], buffer: &mut Vec<u8>) -> Result<()> {
        self.key
            .seal_in_place_append_tag(self.nonce(sequence), aead::Aad::from(aad), buffer)
            .map_err(|_| ProtocolError::Backend("aead seal"))
    }

    /// Decrypts `buffer` (ciphertext then tag) in place, leaving the plaintext.
    pub fn open_in_place(
        &self,
        sequence: u64,
        aad: &[u8],
        buffer: &mut Vec<u8>,
        what: &'static str,
    ) -> Result<()> {
        let plaintext_len = self
            .key
            .open_in_place(self.nonce(sequence), aead::Aad::from(aad), buffer)
            .map_err(|_| ProtocolError::Aead(what))?
            .len();
        buffer.truncate(plaintext_len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha_known_answers() {
        // FIPS 180-2 appendix examples for "abc".
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex::encode(sha384(b"abc")),
            "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed\
             8086072ba1e7cc2358baeca134c825a7"
        );
    }

    #[test]
    fn hkdf_rfc5869_case_1() {
        let ikm = [0x0bu8; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let [okm] = hkdf_sha256(&salt, &ikm, [(&info, 42)]).unwrap();
        assert_eq!(
            hex::encode(okm.expose()),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn aead_nonce_depends_on_sequence() {
        let key = AeadKey::new(
            &SecretBytes::new(vec![7; 32]),
            &SecretBytes::new(vec![9; 12]),
        )
        .unwrap();
        let mut a = b"same plaintext".to_vec();
        let mut b = a.clone();
        key.seal_in_place(1, b"", &mut a).unwrap();
        key.seal_in_place(2, b"", &mut b).unwrap();
        assert_ne!(a, b);
        let mut wrong = a.clone();
        assert!(key.open_in_place(2, b"", &mut wrong, "test").is_err());
        key.open_in_place(1, b"", &mut a, "test").unwrap();
        assert_eq!(a, b"same plaintext");
    }
}
