//! Signatures: a typed trait per algorithm and a value-level layer on top,
//! mirroring [`crate::kem`].
//!
//! ML-DSA-65/87 (FIPS 204) come from aws-lc-rs. A signing key is stored as
//! its 32-byte FIPS 204 seed ξ (the compact private-key form of FIPS 204
//! §6.1 and the IETF LAMPS "seed" encoding) and expanded once when loaded.
//! Signing is FIPS 204's default hedged variant with an empty context string;
//! domain separation comes from [`crate::transcript`], whose labels are part
//! of every signed message.

use aws_lc_rs::signature::{
    self as awssig, KeyPair, ParsedPublicKey, PqdsaKeyPair, PqdsaSigningAlgorithm,
    PqdsaVerificationAlgorithm,
};
use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::error::{ProtocolError, Result};
use crate::secret::SecretBytes;
use crate::suite::SignatureSuite;

/// Length of an ML-DSA private seed ξ.
pub const SIGNING_SEED_LEN: usize = 32;

/// A signature scheme with typed keys.
pub trait SignatureScheme {
    /// The suite this type implements.
    const SUITE: SignatureSuite;
    /// An expanded signing key.
    type SigningKey;
    /// A parsed verifying key.
    type VerifyingKey;

    /// Expands a signing key from its 32-byte seed.
    fn signing_key_from_seed(seed: &[u8]) -> Result<Self::SigningKey>;
    /// The verifying key of a signing key.
    fn verifying_key(key: &Self::SigningKey) -> Result<Vec<u8>>;
    /// Parses and validates an encoded verifying key.
    fn parse_verifying_key(bytes: &[u8]) -> Result<Self::VerifyingKey>;
    /// Signs `message`.
    fn sign(key: &Self::SigningKey, message: &[u8]) -> Result<Vec<u8>>;
    /// Verifies `signature` over `message`.
    fn verify(key: &Self::VerifyingKey, message: &[u8], signature: &[u8]) -> Result<()>;
}

macro_rules! aws_ml_dsa {
    ($name:ident, $suite:expr, $signing:expr, $verifying:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy)]
        pub struct $name;

        impl $name {
            const SIGNING: &'static PqdsaSigningAlgorithm = &$signing;
            const VERIFYING: &'static PqdsaVerificationAlgorithm = &$verifying;
        }

        impl SignatureScheme for $name {
            const SUITE: SignatureSuite = $suite;
            type SigningKey = PqdsaKeyPair;
            type VerifyingKey = ParsedPublicKey;

            fn signing_key_from_seed(seed: &[u8]) -> Result<Self::SigningKey> {
                if seed.len() != SIGNING_SEED_LEN {
                    return Err(ProtocolError::InvalidLength {
                        what: "ml-dsa seed",
                        expected: SIGNING_SEED_LEN,
                        actual: seed.len(),
                    });
                }
                PqdsaKeyPair::from_seed(Self::SIGNING, seed)
                    .map_err(|_| ProtocolError::InvalidKey("ml-dsa seed"))
            }

            fn verifying_key(key: &Self::SigningKey) -> Result<Vec<u8>> {
                Ok(key.public_key().as_ref().to_vec())
            }

            fn parse_verifying_key(bytes: &[u8]) -> Result<Self::VerifyingKey> {
                let expected = Self::SUITE.verifying_key_len();
                if bytes.len() != expected {
                    return Err(ProtocolError::InvalidLength {
                        what: "ml-dsa verifying key",
                        expected,
                        actual: bytes.len(),
                    });
                }
                ParsedPublicKey::new(Self::VERIFYING, bytes)
                    .map_err(|_| ProtocolError::InvalidKey("ml-dsa verifying key"))
            }

            fn sign(key: &Self::SigningKey, message: &[u8]) -> Result<Vec<u8>> {
                let mut signature = vec![0u8; Self::SUITE.signature_len()];
                let written = key
                    .sign(message, &mut signature)
                    .map_err(|_| ProtocolError::Backend("ml-dsa sign"))?;
                signature.truncate(written);
                Ok(signature)
            }

            fn verify(key: &Self::VerifyingKey, message: &[u8], signature: &[u8]) -> Result<()> {
                key.verify_sig(message, signature)
                    .map_err(|_| ProtocolError::BadSignature("ml-dsa"))
            }
        }
    };
}

aws_ml_dsa!(
    MlDsa65,
    SignatureSuite::MlDsa65,
    awssig::ML_DSA_65_SIGNING,
    awssig::ML_DSA_65,
    "ML-DSA-65 (FIPS 204) via aws-lc-rs."
);
aws_ml_dsa!(
    MlDsa87,
    SignatureSuite::MlDsa87,
    awssig::ML_DSA_87_SIGNING,
    awssig::ML_DSA_87,
    "ML-DSA-87 (FIPS 204) via aws-lc-rs."
);

macro_rules! with_sig {
    ($suite:expr, $S:ident => $body:expr) => {
        match $suite {
            SignatureSuite::MlDsa65 => {
                type $S = MlDsa65;
                $body
            }
            SignatureSuite::MlDsa87 => {
                type $S = MlDsa87;
                $body
            }
        }
    };
}

/// A signing key of some suite: the seed it came from and its expansion.
pub struct SigningKey {
    suite: SignatureSuite,
    seed: SecretBytes,
    expanded: PqdsaKeyPair,
    verifying: VerifyingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SigningKey({}, public {:?}, [REDACTED])",
            self.suite, self.verifying
        )
    }
}

impl SigningKey {
    /// Generates a signing key from 32 bytes of the injected RNG.
    pub fn generate<R: CryptoRng + ?Sized>(suite: SignatureSuite, rng: &mut R) -> Result<Self> {
        let mut seed = Zeroizing::new(vec![0u8; SIGNING_SEED_LEN]);
        rng.fill_bytes(&mut seed);
        Self::from_seed(suite, SecretBytes::from(seed))
    }

    /// Expands a signing key from its stored seed.
    pub fn from_seed(suite: SignatureSuite, seed: SecretBytes) -> Result<Self> {
        with_sig!(suite, S => {
            let expanded = S::signing_key_from_seed(seed.expose())?;
            let verifying = VerifyingKey { suite, bytes: S::verifying_key(&expanded)? };
            Ok(Self { suite, seed, expanded, verifying })
        })
    }

    /// The suite.
    pub fn suite(&self) -> SignatureSuite {
        self.suite
    }

    /// The seed, for writing to an owner-only key file.
    pub fn seed(&self) -> &SecretBytes {
        &self.seed
    }

    /// The matching verifying key.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.verifying
    }

    /// Signs `message` (in this crate, always a transcript hash).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        with_sig!(self.suite, S => S::sign(&self.expanded, message))
    }
}

/// An encoded, validated verifying key of some suite.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    suite: SignatureSuite,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VerifyingKey({}, sha256:{})",
            self.suite,
            hex::encode(&crate::crypto::sha256(&self.bytes)[..8])
        )
    }
}

impl VerifyingKey {
    /// Validates `bytes` as a verifying key of `suite`.
    pub fn from_bytes(suite: SignatureSuite, bytes: Vec<u8>) -> Result<Self> {
        with_sig!(suite, S => { S::parse_verifying_key(&bytes)?; });
        Ok(Self { suite, bytes })
    }

    /// The suite.
    pub fn suite(&self) -> SignatureSuite {
        self.suite
    }

    /// The FIPS 204 encoding.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Verifies `signature` over `message`; `context` names the check in the error.
    pub fn verify(&self, message: &[u8], signature: &[u8], context: &'static str) -> Result<()> {
        if signature.len() != self.suite.signature_len() {
            return Err(ProtocolError::BadSignature(context));
        }
        with_sig!(self.suite, S => {
            let key = S::parse_verifying_key(&self.bytes)?;
            S::verify(&key, message, signature).map_err(|_| ProtocolError::BadSignature(context))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sign_verify_and_reject() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        for suite in SignatureSuite::ALL {
            let key = SigningKey::generate(suite, &mut rng).unwrap();
            assert_eq!(
                key.verifying_key().as_bytes().len(),
                suite.verifying_key_len()
            );
            let sig = key.sign(b"message").unwrap();
            assert_eq!(sig.len(), suite.signature_len());
            key.verifying_key()
                .verify(b"message", &sig, "test")
                .unwrap();
            assert_eq!(
                key.verifying_key().verify(b"messagf", &sig, "test"),
                Err(ProtocolError::BadSignature("test"))
            );
            let mut bad = sig.clone();
            bad[10] ^= 0x40;
            assert!(
                key.verifying_key()
                    .verify(b"message", &bad, "test")
                    .is_err()
            );
            assert!(
                key.verifying_key()
                    .verify(b"message", &sig[1..], "test")
                    .is_err()
            );

            // Deterministic key generation from the injected RNG.
            let again = SigningKey::from_seed(suite, key.seed().clone()).unwrap();
            assert_eq!(again.verifying_key(), key.verifying_key());
            assert!(!format!("{key:?}").contains(&hex::encode(key.seed().expose())));
        }
    }
}
