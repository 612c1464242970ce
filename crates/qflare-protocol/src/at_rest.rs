//! Wrapping secrets that must be stored: pending handshakes and session keys
//! in a database shared by server replicas.
//!
//! AES-256-GCM under a storage key that never leaves the servers' state
//! directory, with a random 96-bit nonce per item and the item's identity as
//! associated data, so a wrapped blob cannot be moved to another row. Random
//! nonces are safe here far beyond any realistic number of sessions (the
//! 2^32-message bound for one key).

use aws_lc_rs::aead;
use rand_core::CryptoRng;

use crate::crypto::{AEAD_KEY_LEN, AEAD_NONCE_LEN};
use crate::error::{ProtocolError, Result};
use crate::secret::SecretBytes;

/// A key for wrapping secrets at rest.
pub struct AtRestKey {
    key: aead::LessSafeKey,
}

impl std::fmt::Debug for AtRestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AtRestKey([REDACTED])")
    }
}

impl AtRestKey {
    /// Uses 32 secret bytes as the storage key.
    pub fn new(key: &SecretBytes) -> Result<Self> {
        if key.len() != AEAD_KEY_LEN {
            return Err(ProtocolError::InvalidLength {
                what: "storage key",
                expected: AEAD_KEY_LEN,
                actual: key.len(),
            });
        }
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, key.expose())
            .map_err(|_| ProtocolError::Backend("storage key"))?;
        Ok(Self {
            key: aead::LessSafeKey::new(unbound),
        })
    }

    /// Wraps `secret`, bound to `context` (for example a session id and a purpose).
    pub fn wrap<R: CryptoRng + ?Sized>(
        &self,
        context: &[u8],
        secret: &SecretBytes,
        rng: &mut R,
    ) -> Result<Vec<u8>> {
        let mut nonce = [0u8; AEAD_NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(AEAD_NONCE_LEN + secret.len() + 16);
        out.extend_from_slice(&nonce);
        let mut body = zeroize::Zeroizing::new(secret.expose().to_vec());
        self.key
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(context),
                &mut *body,
            )
            .map_err(|_| ProtocolError::Backend("wrap"))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Unwraps a blob made by [`AtRestKey::wrap`] with the same `context`.
    pub fn unwrap(&self, context: &[u8], wrapped: &[u8]) -> Result<SecretBytes> {
        if wrapped.len() < AEAD_NONCE_LEN + 16 {
            return Err(ProtocolError::malformed("wrapped secret", "too short"));
        }
        let (nonce, body) = wrapped.split_at(AEAD_NONCE_LEN);
        let mut nonce_bytes = [0u8; AEAD_NONCE_LEN];
        nonce_bytes.copy_from_slice(nonce);
        let mut body = zeroize::Zeroizing::new(body.to_vec());
        let len = self
            .key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce_bytes),
                aead::Aad::from(context),
                &mut body,
            )
            .map_err(|_| ProtocolError::Aead("wrapped secret"))?
            .len();
        body.truncate(len);
        Ok(SecretBytes::from(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn wrap_is_bound_to_context() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(51);
        let key = AtRestKey::new(&SecretBytes::new(vec![3; 32])).unwrap();
        let secret = SecretBytes::from_slice(b"session keys");
        let wrapped = key.wrap(b"session:1", &secret, &mut rng).unwrap();
        assert_eq!(key.unwrap(b"session:1", &wrapped).unwrap(), secret);
        assert!(key.unwrap(b"session:2", &wrapped).is_err());
        let mut flipped = wrapped.clone();
        flipped[20] ^= 1;
        assert!(key.unwrap(b"session:1", &flipped).is_err());
        assert!(key.unwrap(b"session:1", &wrapped[..10]).is_err());
    }
}
