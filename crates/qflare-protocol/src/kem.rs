//! Key encapsulation: a typed trait per algorithm and a value-level layer on top.
//!
//! About 600 lines of code plus tests: one short implementation of [`Kem`]
//! per algorithm and the one dispatch over them; splitting per algorithm
//! would scatter a table meant to be read as one.
//!
//! [`Kem`] follows the shape of RustCrypto's `kem` crate: each algorithm is a
//! type with associated key types, so code that knows its algorithm at compile
//! time is checked by the compiler. Protocol code instead holds a
//! [`KemSuite`] *value* and encoded keys ([`KemPublicKey`], [`KemSecretKey`]);
//! the single [`with_kem!`] dispatch turns the value back into the type.
//!
//! Implementations (never hand-rolled):
//! - ML-KEM-768/1024 (FIPS 203) from aws-lc-rs. Keys and ciphertexts are the
//!   FIPS 203 byte encodings; the secret key is the 2400/3168-byte expanded
//!   decapsulation key of FIPS 203 §7.1. aws-lc-rs draws key-generation and
//!   encapsulation randomness from its own DRBG; it offers no seeded variant.
//! - FrodoKEM-640/976-AES from `frodo-kem-rs` (the FrodoKEM specification
//!   submitted to ISO, with the salted FO transform), fed the injected RNG.
//! - X-Wing (draft-connolly-cfrg-xwing-kem): ML-KEM-768 from aws-lc-rs,
//!   X25519 from aws-lc-rs, combined with SHA3-256 exactly as the draft says,
//!   so encapsulation keys and ciphertexts interoperate with other X-Wing
//!   implementations. Only the *stored* secret key differs: the draft keeps a
//!   32-byte seed and expands it with SHAKE-256 into an ML-KEM seed, which
//!   aws-lc-rs cannot consume, so we store the expanded ML-KEM key and the
//!   X25519 scalar instead.

use aws_lc_rs::{agreement, digest, kem as awskem};
use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::error::{ProtocolError, Result};
use crate::secret::SecretBytes;
use crate::suite::KemSuite;

/// A key-encapsulation mechanism with typed keys.
pub trait Kem {
    /// The suite this type implements.
    const SUITE: KemSuite;
    /// A parsed encapsulation (public) key.
    type EncapsulationKey;
    /// A parsed decapsulation (secret) key.
    type DecapsulationKey;

    /// Generates a key pair.
    fn generate<R: CryptoRng + ?Sized>(
        rng: &mut R,
    ) -> Result<(Self::DecapsulationKey, Self::EncapsulationKey)>;
    /// Encapsulates a fresh shared secret to `key`; returns the ciphertext and the secret.
    fn encapsulate<R: CryptoRng + ?Sized>(
        key: &Self::EncapsulationKey,
        rng: &mut R,
    ) -> Result<(Vec<u8>, SecretBytes)>;
    /// Recovers the shared secret from `ciphertext`.
    fn decapsulate(key: &Self::DecapsulationKey, ciphertext: &[u8]) -> Result<SecretBytes>;
    /// Parses and validates an encoded encapsulation key.
    fn parse_encapsulation_key(bytes: &[u8]) -> Result<Self::EncapsulationKey>;
    /// Encodes an encapsulation key.
    fn encode_encapsulation_key(key: &Self::EncapsulationKey) -> Result<Vec<u8>>;
    /// Parses an encoded decapsulation key.
    fn parse_decapsulation_key(bytes: &[u8]) -> Result<Self::DecapsulationKey>;
    /// Encodes a decapsulation key.
    fn encode_decapsulation_key(key: &Self::DecapsulationKey) -> Result<SecretBytes>;
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(ProtocolError::InvalidLength {
            what,
            expected,
            actual,
        })
    }
}

// ---------------------------------------------------------------- ML-KEM

/// The ML-KEM modulus q.
const ML_KEM_Q: u16 = 3329;

/// FIPS 203 §7.2 encapsulation-key *modulus check*: every 12-bit coefficient
/// of the encoded t̂ (all but the trailing 32-byte ρ) must be below q, i.e.
/// `ByteEncode₁₂(ByteDecode₁₂(ek[0:384k])) == ek[0:384k]`.
///
/// aws-lc-rs only length-checks in `EncapsulationKey::new` and runs this check
/// when encapsulating, so without it a malformed key would pass
/// [`KemPublicKey::from_bytes`] (and be stored at enrollment) only to fail
/// every later encapsulation. This is a range check on public input, not
/// cryptography; the length has already been checked by the caller.
fn ml_kem_modulus_check(ek: &[u8]) -> Result<()> {
    let t_hat = &ek[..ek.len().saturating_sub(32)];
    let reduced = t_hat.chunks_exact(3).all(|b| {
        let c0 = u16::from(b[0]) | (u16::from(b[1] & 0x0f) << 8);
        let c1 = u16::from(b[1] >> 4) | (u16::from(b[2]) << 4);
        c0 < ML_KEM_Q && c1 < ML_KEM_Q
    });
    if reduced {
        Ok(())
    } else {
        Err(ProtocolError::InvalidKey("ml-kem encapsulation key"))
    }
}

/// FIPS 203 §7.3 decapsulation-key *hash check*: the key embeds its
/// encapsulation key `ek = dk[384k .. 768k+32]` followed by `H(ek)`; a key file
/// corrupted there is refused when loaded rather than decapsulating to wrong
/// secrets later. The caller has checked the length (768k + 96 bytes).
fn ml_kem_hash_check(dk: &[u8]) -> Result<()> {
    let k = (dk.len() - 96) / 768;
    let ek = &dk[384 * k..768 * k + 32];
    let embedded_hash = &dk[768 * k + 32..768 * k + 64];
    let computed = digest::digest(&digest::SHA3_256, ek);
    if crate::secret::ct_eq(computed.as_ref(), embedded_hash) {
        ml_kem_modulus_check(ek)
    } else {
        Err(ProtocolError::InvalidKey("ml-kem decapsulation key"))
    }
}

macro_rules! aws_ml_kem {
    ($name:ident, $suite:expr, $alg:expr, $dk_len:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy)]
        pub struct $name;

        impl Kem for $name {
            const SUITE: KemSuite = $suite;
            type EncapsulationKey = awskem::EncapsulationKey;
            type DecapsulationKey = awskem::DecapsulationKey;

            fn generate<R: CryptoRng + ?Sized>(
                _rng: &mut R,
            ) -> Result<(Self::DecapsulationKey, Self::EncapsulationKey)> {
                let dk = awskem::DecapsulationKey::generate(&$alg)
                    .map_err(|_| ProtocolError::Backend("ml-kem keygen"))?;
                let ek = dk
                    .encapsulation_key()
                    .map_err(|_| ProtocolError::Backend("ml-kem keygen"))?;
                Ok((dk, ek))
            }

            fn encapsulate<R: CryptoRng + ?Sized>(
                key: &Self::EncapsulationKey,
                _rng: &mut R,
            ) -> Result<(Vec<u8>, SecretBytes)> {
                let (ct, ss) = key
                    .encapsulate()
                    .map_err(|_| ProtocolError::Encapsulation)?;
                Ok((ct.as_ref().to_vec(), SecretBytes::from_slice(ss.as_ref())))
            }

            fn decapsulate(key: &Self::DecapsulationKey, ciphertext: &[u8]) -> Result<SecretBytes> {
                check_len(
                    "ml-kem ciphertext",
                    Self::SUITE.ciphertext_len(),
                    ciphertext.len(),
                )?;
                let ss = key
                    .decapsulate(awskem::Ciphertext::from(ciphertext))
                    .map_err(|_| ProtocolError::Decapsulation)?;
                Ok(SecretBytes::from_slice(ss.as_ref()))
            }

            fn parse_encapsulation_key(bytes: &[u8]) -> Result<Self::EncapsulationKey> {
                check_len(
                    "ml-kem encapsulation key",
                    Self::SUITE.encapsulation_key_len(),
                    bytes.len(),
                )?;
                ml_kem_modulus_check(bytes)?;
                awskem::EncapsulationKey::new(&$alg, bytes)
                    .map_err(|_| ProtocolError::InvalidKey("ml-kem encapsulation key"))
            }

            fn encode_encapsulation_key(key: &Self::EncapsulationKey) -> Result<Vec<u8>> {
                key.key_bytes()
                    .map(|bytes| bytes.as_ref().to_vec())
                    .map_err(|_| ProtocolError::Backend("ml-kem key export"))
            }

            fn parse_decapsulation_key(bytes: &[u8]) -> Result<Self::DecapsulationKey> {
                check_len("ml-kem decapsulation key", $dk_len, bytes.len())?;
                ml_kem_hash_check(bytes)?;
                awskem::DecapsulationKey::new(&$alg, bytes)
                    .map_err(|_| ProtocolError::InvalidKey("ml-kem decapsulation key"))
            }

            fn encode_decapsulation_key(key: &Self::DecapsulationKey) -> Result<SecretBytes> {
                key.key_bytes()
                    .map(|bytes| SecretBytes::from_slice(bytes.as_ref()))
                    .map_err(|_| ProtocolError::Backend("ml-kem key export"))
            }
        }
    };
}

aws_ml_kem!(
    MlKem768,
    KemSuite::MlKem768,
    awskem::ML_KEM_768,
    2400,
    "ML-KEM-768 (FIPS 203) via aws-lc-rs."
);
aws_ml_kem!(
    MlKem1024,
    KemSuite::MlKem1024,
    awskem::ML_KEM_1024,
    3168,
    "ML-KEM-1024 (FIPS 203) via aws-lc-rs."
);

// ---------------------------------------------------------------- FrodoKEM

macro_rules! frodo_kem {
    ($name:ident, $suite:expr, $alg:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy)]
        pub struct $name;

        impl Kem for $name {
            const SUITE: KemSuite = $suite;
            type EncapsulationKey = frodo_kem_rs::EncryptionKey;
            type DecapsulationKey = frodo_kem_rs::DecryptionKey;

            fn generate<R: CryptoRng + ?Sized>(
                rng: &mut R,
            ) -> Result<(Self::DecapsulationKey, Self::EncapsulationKey)> {
                let (ek, dk) = $alg.generate_keypair(rng);
                Ok((dk, ek))
            }

            fn encapsulate<R: CryptoRng + ?Sized>(
                key: &Self::EncapsulationKey,
                rng: &mut R,
            ) -> Result<(Vec<u8>, SecretBytes)> {
                let (ct, ss) = $alg
                    .encapsulate_with_rng(key, rng)
                    .map_err(|_| ProtocolError::Encapsulation)?;
                Ok((ct.value().to_vec(), SecretBytes::from_slice(ss.value())))
            }

            fn decapsulate(key: &Self::DecapsulationKey, ciphertext: &[u8]) -> Result<SecretBytes> {
                check_len(
                    "frodokem ciphertext",
                    Self::SUITE.ciphertext_len(),
                    ciphertext.len(),
                )?;
                let ct = $alg
                    .ciphertext_from_bytes(ciphertext)
                    .map_err(|_| ProtocolError::Decapsulation)?;
                let (ss, message) = $alg
                    .decapsulate(key, &ct)
                    .map_err(|_| ProtocolError::Decapsulation)?;
                // The recovered message is as secret as the shared secret.
                drop(Zeroizing::new(message));
                Ok(SecretBytes::from_slice(ss.value()))
            }

            fn parse_encapsulation_key(bytes: &[u8]) -> Result<Self::EncapsulationKey> {
                check_len(
                    "frodokem encapsulation key",
                    Self::SUITE.encapsulation_key_len(),
                    bytes.len(),
                )?;
                $alg.encryption_key_from_bytes(bytes)
                    .map_err(|_| ProtocolError::InvalidKey("frodokem encapsulation key"))
            }

            fn encode_encapsulation_key(key: &Self::EncapsulationKey) -> Result<Vec<u8>> {
                Ok(key.value().to_vec())
            }

            fn parse_decapsulation_key(bytes: &[u8]) -> Result<Self::DecapsulationKey> {
                $alg.decryption_key_from_bytes(bytes)
                    .map_err(|_| ProtocolError::InvalidKey("frodokem decapsulation key"))
            }

            fn encode_decapsulation_key(key: &Self::DecapsulationKey) -> Result<SecretBytes> {
                Ok(SecretBytes::from_slice(key.value()))
            }
        }
    };
}

frodo_kem!(
    FrodoKem640Aes,
    KemSuite::FrodoKem640Aes,
    frodo_kem_rs::Algorithm::FrodoKem640Aes,
    "FrodoKEM-640-AES via frodo-kem-rs."
);
frodo_kem!(
    FrodoKem976Aes,
    KemSuite::FrodoKem976Aes,
    frodo_kem_rs::Algorithm::FrodoKem976Aes,
    "FrodoKEM-976-AES via frodo-kem-rs."
);

// ---------------------------------------------------------------- X-Wing

/// The X-Wing combiner label, `\.//^\` (draft-connolly-cfrg-xwing-kem §5).
const XWING_LABEL: &[u8; 6] = b"\\.//^\\";
const X25519_LEN: usize = 32;
const ML_KEM_768_DK_LEN: usize = 2400;

/// X-Wing: ML-KEM-768 + X25519 hybrid.
#[derive(Debug, Clone, Copy)]
pub struct XWing;

/// An X-Wing encapsulation key: `pk_M || pk_X` on the wire.
pub struct XWingEncapsulationKey {
    ml_kem: awskem::EncapsulationKey,
    x25519: [u8; X25519_LEN],
}

/// An X-Wing decapsulation key.
pub struct XWingDecapsulationKey {
    ml_kem: awskem::DecapsulationKey,
    x25519_secret: SecretBytes,
    x25519_public: [u8; X25519_LEN],
}

fn x25519_private(scalar: &[u8]) -> Result<agreement::PrivateKey> {
    agreement::PrivateKey::from_private_key(&agreement::X25519, scalar)
        .map_err(|_| ProtocolError::InvalidKey("x25519 scalar"))
}

fn x25519_public(private: &agreement::PrivateKey) -> Result<[u8; X25519_LEN]> {
    let public = private
        .compute_public_key()
        .map_err(|_| ProtocolError::Backend("x25519 public key"))?;
    public
        .as_ref()
        .try_into()
        .map_err(|_| ProtocolError::Backend("x25519 public key"))
}

/// X25519 shared secret; aws-lc refuses an all-zero (non-contributory) result,
/// which matches X-Wing's `DecapsulationKeyRejectNonContrib` behaviour.
fn x25519_agree(private: &agreement::PrivateKey, peer: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
    agreement::agree(
        private,
        agreement::UnparsedPublicKey::new(&agreement::X25519, peer),
        ProtocolError::Decapsulation,
        |shared| {
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(shared);
            Ok(out)
        },
    )
}

fn xwing_combine(ss_m: &[u8], ss_x: &[u8], ct_x: &[u8], pk_x: &[u8]) -> SecretBytes {
    let mut ctx = digest::Context::new(&digest::SHA3_256);
    ctx.update(ss_m);
    ctx.update(ss_x);
    ctx.update(ct_x);
    ctx.update(pk_x);
    ctx.update(XWING_LABEL);
    SecretBytes::from_slice(ctx.finish().as_ref())
}

impl Kem for XWing {
    const SUITE: KemSuite = KemSuite::X25519MlKem768;
    type EncapsulationKey = XWingEncapsulationKey;
    type DecapsulationKey = XWingDecapsulationKey;

    fn generate<R: CryptoRng + ?Sized>(
        rng: &mut R,
    ) -> Result<(Self::DecapsulationKey, Self::EncapsulationKey)> {
        let (dk_m, ek_m) = MlKem768::generate(rng)?;
        let mut scalar = Zeroizing::new([0u8; X25519_LEN]);
        rng.fill_bytes(scalar.as_mut());
        let private = x25519_private(scalar.as_ref())?;
        let public = x25519_public(&private)?;
        Ok((
            XWingDecapsulationKey {
                ml_kem: dk_m,
                x25519_secret: SecretBytes::from_slice(scalar.as_ref()),
                x25519_public: public,
            },
            XWingEncapsulationKey {
                ml_kem: ek_m,
                x25519: public,
            },
        ))
    }

    fn encapsulate<R: CryptoRng + ?Sized>(
        key: &Self::EncapsulationKey,
        rng: &mut R,
    ) -> Result<(Vec<u8>, SecretBytes)> {
        let (mut ciphertext, ss_m) = MlKem768::encapsulate(&key.ml_kem, rng)?;
        let mut ephemeral = Zeroizing::new([0u8; X25519_LEN]);
        rng.fill_bytes(ephemeral.as_mut());
        let ephemeral = x25519_private(ephemeral.as_ref())?;
        let ct_x = x25519_public(&ephemeral)?;
        let ss_x =
            x25519_agree(&ephemeral, &key.x25519).map_err(|_| ProtocolError::Encapsulation)?;
        let shared = xwing_combine(ss_m.expose(), ss_x.as_ref(), &ct_x, &key.x25519);
        ciphertext.extend_from_slice(&ct_x);
        Ok((ciphertext, shared))
    }

    fn decapsulate(key: &Self::DecapsulationKey, ciphertext: &[u8]) -> Result<SecretBytes> {
        check_len(
            "x-wing ciphertext",
            Self::SUITE.ciphertext_len(),
            ciphertext.len(),
        )?;
        let (ct_m, ct_x) = ciphertext.split_at(KemSuite::MlKem768.ciphertext_len());
        let ss_m = MlKem768::decapsulate(&key.ml_kem, ct_m)?;
        let private = x25519_private(key.x25519_secret.expose())?;
        let ss_x = x25519_agree(&private, ct_x)?;
        Ok(xwing_combine(
            ss_m.expose(),
            ss_x.as_ref(),
            ct_x,
            &key.x25519_public,
        ))
    }

    fn parse_encapsulation_key(bytes: &[u8]) -> Result<Self::EncapsulationKey> {
        check_len(
            "x-wing encapsulation key",
            Self::SUITE.encapsulation_key_len(),
            bytes.len(),
        )?;
        let (pk_m, pk_x) = bytes.split_at(KemSuite::MlKem768.encapsulation_key_len());
        let mut x25519 = [0u8; X25519_LEN];
        x25519.copy_from_slice(pk_x);
        Ok(XWingEncapsulationKey {
            ml_kem: MlKem768::parse_encapsulation_key(pk_m)?,
            x25519,
        })
    }

    fn encode_encapsulation_key(key: &Self::EncapsulationKey) -> Result<Vec<u8>> {
        let mut out = MlKem768::encode_encapsulation_key(&key.ml_kem)?;
        out.extend_from_slice(&key.x25519);
        Ok(out)
    }

    fn parse_decapsulation_key(bytes: &[u8]) -> Result<Self::DecapsulationKey> {
        check_len(
            "x-wing decapsulation key",
            ML_KEM_768_DK_LEN + X25519_LEN,
            bytes.len(),
        )?;
        let (dk_m, sk_x) = bytes.split_at(ML_KEM_768_DK_LEN);
        let private = x25519_private(sk_x)?;
        Ok(XWingDecapsulationKey {
            ml_kem: MlKem768::parse_decapsulation_key(dk_m)?,
            x25519_secret: SecretBytes::from_slice(sk_x),
            x25519_public: x25519_public(&private)?,
        })
    }

    fn encode_decapsulation_key(key: &Self::DecapsulationKey) -> Result<SecretBytes> {
        let dk_m = MlKem768::encode_decapsulation_key(&key.ml_kem)?;
        let mut out = Zeroizing::new(Vec::with_capacity(dk_m.len() + X25519_LEN));
        out.extend_from_slice(dk_m.expose());
        out.extend_from_slice(key.x25519_secret.expose());
        Ok(SecretBytes::from(out))
    }
}

// ---------------------------------------------------------------- values

/// Runs `$body` with `$K` bound to the [`Kem`] type of the suite value `$suite`.
/// The only place where a suite value becomes a code path.
macro_rules! with_kem {
    ($suite:expr, $K:ident => $body:expr) => {
        match $suite {
            KemSuite::MlKem768 => {
                type $K = MlKem768;
                $body
            }
            KemSuite::MlKem1024 => {
                type $K = MlKem1024;
                $body
            }
            KemSuite::FrodoKem640Aes => {
                type $K = FrodoKem640Aes;
                $body
            }
            KemSuite::FrodoKem976Aes => {
                type $K = FrodoKem976Aes;
                $body
            }
            KemSuite::X25519MlKem768 => {
                type $K = XWing;
                $body
            }
        }
    };
}

/// An encoded, validated encapsulation key of some suite.
#[derive(Clone, PartialEq, Eq)]
pub struct KemPublicKey {
    suite: KemSuite,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for KemPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KemPublicKey({}, sha256:{})",
            self.suite,
            hex::encode(&crate::crypto::sha256(&self.bytes)[..8])
        )
    }
}

impl KemPublicKey {
    /// Validates `bytes` as an encapsulation key of `suite` (length and the
    /// algorithm's own checks, such as the FIPS 203 §7.2 modulus check).
    pub fn from_bytes(suite: KemSuite, bytes: Vec<u8>) -> Result<Self> {
        with_kem!(suite, K => { K::parse_encapsulation_key(&bytes)?; });
        Ok(Self { suite, bytes })
    }

    /// The suite.
    pub fn suite(&self) -> KemSuite {
        self.suite
    }

    /// The standard encoding.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Encapsulates a fresh shared secret to this key.
    pub fn encapsulate<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
    ) -> Result<(Vec<u8>, SecretBytes)> {
        with_kem!(self.suite, K => {
            let key = K::parse_encapsulation_key(&self.bytes)?;
            K::encapsulate(&key, rng)
        })
    }
}

/// An encoded decapsulation key of some suite. Zeroized on drop, never printed.
#[derive(Clone)]
pub struct KemSecretKey {
    suite: KemSuite,
    bytes: SecretBytes,
}

impl std::fmt::Debug for KemSecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KemSecretKey({}, [REDACTED])", self.suite)
    }
}

impl KemSecretKey {
    /// Validates `bytes` as a decapsulation key of `suite`.
    pub fn from_bytes(suite: KemSuite, bytes: SecretBytes) -> Result<Self> {
        with_kem!(suite, K => { K::parse_decapsulation_key(bytes.expose())?; });
        Ok(Self { suite, bytes })
    }

    /// The suite.
    pub fn suite(&self) -> KemSuite {
        self.suite
    }

    /// The encoded secret key, for writing to an owner-only key file.
    pub fn to_secret_bytes(&self) -> &SecretBytes {
        &self.bytes
    }

    /// Recovers a shared secret from `ciphertext`.
    pub fn decapsulate(&self, ciphertext: &[u8]) -> Result<SecretBytes> {
        with_kem!(self.suite, K => {
            let key = K::parse_decapsulation_key(self.bytes.expose())?;
            K::decapsulate(&key, ciphertext)
        })
    }
}

/// A freshly generated key pair.
#[derive(Debug, Clone)]
pub struct KemKeyPair {
    /// The secret half; stays where it was generated.
    pub secret: KemSecretKey,
    /// The public half; registered with the server or published in a report.
    pub public: KemPublicKey,
}

impl KemKeyPair {
    /// Generates a key pair of `suite`.
    pub fn generate<R: CryptoRng + ?Sized>(suite: KemSuite, rng: &mut R) -> Result<Self> {
        with_kem!(suite, K => {
            let (dk, ek) = K::generate(rng)?;
            Ok(Self {
                secret: KemSecretKey { suite, bytes: K::encode_decapsulation_key(&dk)? },
                public: KemPublicKey { suite, bytes: K::encode_encapsulation_key(&ek)? },
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn every_suite_round_trips_with_standard_sizes() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        for suite in KemSuite::ALL {
            let pair = KemKeyPair::generate(suite, &mut rng).unwrap();
            assert_eq!(
                pair.public.as_bytes().len(),
                suite.encapsulation_key_len(),
                "{suite}"
            );
            let (ct, ss) = pair.public.encapsulate(&mut rng).unwrap();
            assert_eq!(ct.len(), suite.ciphertext_len(), "{suite}");
            assert_eq!(ss.len(), suite.shared_secret_len(), "{suite}");
            assert_eq!(pair.secret.decapsulate(&ct).unwrap(), ss, "{suite}");

            // Implicit rejection: a flipped ciphertext decapsulates to another secret.
            let mut bad = ct.clone();
            bad[0] ^= 1;
            match pair.secret.decapsulate(&bad) {
                Ok(other) => assert_ne!(other, ss, "{suite}"),
                Err(e) => assert_eq!(e, ProtocolError::Decapsulation, "{suite}"),
            }
            // Wrong lengths are typed errors, not panics.
            assert!(matches!(
                pair.secret.decapsulate(&ct[1..]),
                Err(ProtocolError::InvalidLength { .. })
            ));
            assert!(matches!(
                KemPublicKey::from_bytes(suite, pair.public.as_bytes()[1..].to_vec()),
                Err(ProtocolError::InvalidLength { .. })
            ));
            // A secret key corrupted in its embedded public key is refused at load.
            if matches!(suite, KemSuite::MlKem768 | KemSuite::MlKem1024) {
                let mut corrupt = pair.secret.to_secret_bytes().expose().to_vec();
                let k = (corrupt.len() - 96) / 768;
                corrupt[384 * k + 5] ^= 1;
                assert_eq!(
                    KemSecretKey::from_bytes(suite, SecretBytes::new(corrupt)).unwrap_err(),
                    ProtocolError::InvalidKey("ml-kem decapsulation key")
                );
            }
            // Secret keys survive their encoding.
            let reloaded =
                KemSecretKey::from_bytes(suite, pair.secret.to_secret_bytes().clone()).unwrap();
            assert_eq!(reloaded.decapsulate(&ct).unwrap(), ss);
            assert!(
                !format!("{:?}", pair.secret)
                    .contains(&hex::encode(&pair.secret.to_secret_bytes().expose()[..8]))
            );
        }
    }
}
