//! Byte-level adapters over the second implementations (RustCrypto `ml-kem`,
//! `ml-dsa`), shared by `kat.rs` and `interop.rs`, so both test files compare
//! our aws-lc-rs wrappers against exactly the same reference code.
//!
//! Every adapter takes and returns plain byte strings: that is the only thing
//! two implementations can share, and it is what crosses the wire.

#![allow(dead_code)] // each test crate uses a different subset

use ml_dsa::{Keypair as _, MlDsaParams, Signer as _, Verifier as _};
use ml_kem::kem::{Decapsulate as _, Encapsulate as _, Kem as _, KeyExport as _, TryKeyInit as _};
use qflare_protocol::{KemSuite, SignatureSuite};
use rand_core::CryptoRng;

/// The RustCrypto `ml-kem` reference for one ML-KEM parameter set.
pub trait RcMlKem {
    /// Our suite with the same parameters.
    const SUITE: KemSuite;
    /// FIPS 203 `ML-KEM.KeyGen_internal(d, z)` from the 64-byte seed `d || z`:
    /// `(ek, expanded dk)`; `None` if the seed does not have 64 bytes.
    fn keygen_from_seed(seed: &[u8]) -> Option<(Vec<u8>, Vec<u8>)>;
    /// A random key pair `(ek, expanded dk)`.
    fn generate<R: CryptoRng>(rng: &mut R) -> (Vec<u8>, Vec<u8>);
    /// Loads an expanded (FIPS 203 §7.1) decapsulation key; returns its `ek`,
    /// or `None` if RustCrypto rejects it (wrong length, hash mismatch).
    fn ek_of_expanded(dk: &[u8]) -> Option<Vec<u8>>;
    /// Decapsulates `ct` with an expanded key; `None` on a wrong key or ciphertext length.
    fn decapsulate(dk: &[u8], ct: &[u8]) -> Option<Vec<u8>>;
    /// Whether RustCrypto accepts `ek` (length and FIPS 203 §7.2 modulus check).
    fn accepts_ek(ek: &[u8]) -> bool;
    /// `ML-KEM.Encaps_internal(ek, m)`: `(c, K)`, or `None` if `ek` is rejected.
    fn encapsulate_deterministic(ek: &[u8], m: &[u8; 32]) -> Option<(Vec<u8>, Vec<u8>)>;
    /// Randomised encapsulation: `(c, K)`, or `None` if `ek` is rejected.
    fn encapsulate<R: CryptoRng>(ek: &[u8], rng: &mut R) -> Option<(Vec<u8>, Vec<u8>)>;
}

macro_rules! rc_ml_kem {
    ($name:ident, $P:ty, $suite:expr) => {
        /// RustCrypto reference for this parameter set.
        pub struct $name;

        #[allow(deprecated)] // the expanded dk encoding is what aws-lc-rs stores
        impl RcMlKem for $name {
            const SUITE: KemSuite = $suite;

            fn keygen_from_seed(seed: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
                let seed = ml_kem::Seed::try_from(seed).ok()?;
                let dk = ml_kem::DecapsulationKey::<$P>::from_seed(seed);
                let ek = dk.encapsulation_key().to_bytes().to_vec();
                let expanded = ml_kem::ExpandedKeyEncoding::to_expanded_bytes(&dk).to_vec();
                Some((ek, expanded))
            }

            fn generate<R: CryptoRng>(rng: &mut R) -> (Vec<u8>, Vec<u8>) {
                let (dk, ek) = <$P>::generate_keypair_from_rng(rng);
                (
                    ek.to_bytes().to_vec(),
                    ml_kem::ExpandedKeyEncoding::to_expanded_bytes(&dk).to_vec(),
                )
            }

            fn ek_of_expanded(dk: &[u8]) -> Option<Vec<u8>> {
                let bytes = ml_kem::ExpandedDecapsulationKey::<$P>::try_from(dk).ok()?;
                let dk = ml_kem::DecapsulationKey::<$P>::from_expanded(&bytes).ok()?;
                Some(dk.encapsulation_key().to_bytes().to_vec())
            }

            fn decapsulate(dk: &[u8], ct: &[u8]) -> Option<Vec<u8>> {
                let bytes = ml_kem::ExpandedDecapsulationKey::<$P>::try_from(dk).ok()?;
                let dk = ml_kem::DecapsulationKey::<$P>::from_expanded(&bytes).ok()?;
                dk.decapsulate_slice(ct).ok().map(|k| k.to_vec())
            }

            fn accepts_ek(ek: &[u8]) -> bool {
                ml_kem::EncapsulationKey::<$P>::new_from_slice(ek).is_ok()
            }

            fn encapsulate_deterministic(ek: &[u8], m: &[u8; 32]) -> Option<(Vec<u8>, Vec<u8>)> {
                let ek = ml_kem::EncapsulationKey::<$P>::new_from_slice(ek).ok()?;
                let (c, k) = ek.encapsulate_deterministic(&ml_kem::B32::from(*m));
                Some((c.to_vec(), k.to_vec()))
            }

            fn encapsulate<R: CryptoRng>(ek: &[u8], rng: &mut R) -> Option<(Vec<u8>, Vec<u8>)> {
                let ek = ml_kem::EncapsulationKey::<$P>::new_from_slice(ek).ok()?;
                let (c, k) = ek.encapsulate_with_rng(rng);
                Some((c.to_vec(), k.to_vec()))
            }
        }
    };
}

rc_ml_kem!(RcMlKem768, ml_kem::MlKem768, KemSuite::MlKem768);
rc_ml_kem!(RcMlKem1024, ml_kem::MlKem1024, KemSuite::MlKem1024);

/// The RustCrypto `ml-dsa` reference for one ML-DSA parameter set.
pub struct RcMlDsa<P>(std::marker::PhantomData<P>);

impl<P: MlDsaParams> RcMlDsa<P> {
    fn signing_key(seed: &[u8; 32]) -> ml_dsa::SigningKey<P> {
        ml_dsa::SigningKey::<P>::from_seed(&ml_dsa::Seed::from(*seed))
    }

    fn verifying_key(public: &[u8]) -> Option<ml_dsa::VerifyingKey<P>> {
        let encoded = ml_dsa::EncodedVerifyingKey::<P>::try_from(public).ok()?;
        Some(ml_dsa::VerifyingKey::<P>::decode(&encoded))
    }

    /// FIPS 204 `ML-DSA.KeyGen_internal(ξ)`: the encoded public key.
    pub fn public_from_seed(seed: &[u8; 32]) -> Vec<u8> {
        Self::signing_key(seed).verifying_key().encode().to_vec()
    }

    /// Deterministic `ML-DSA.Sign` (rnd = 0³²) with an empty context.
    pub fn sign_deterministic(seed: &[u8; 32], msg: &[u8]) -> Vec<u8> {
        let sig: ml_dsa::Signature<P> = Self::signing_key(seed).sign(msg);
        sig.encode().to_vec()
    }

    /// `ML-DSA.Sign` with an empty context and the given `rnd`
    /// (`Sign_internal(sk, 0 || 0 || M, rnd)`, FIPS 204 Algorithm 2).
    pub fn sign_with_rnd(seed: &[u8; 32], msg: &[u8], rnd: &[u8; 32]) -> Vec<u8> {
        let key = Self::signing_key(seed);
        let sig = key
            .expanded_key()
            .sign_internal(&[&[0, 0], msg], &ml_dsa::B32::from(*rnd));
        sig.encode().to_vec()
    }

    /// Hedged `ML-DSA.Sign` with an empty context, randomness from `rng`.
    pub fn sign_randomized<R: CryptoRng>(seed: &[u8; 32], msg: &[u8], rng: &mut R) -> Vec<u8> {
        let key = Self::signing_key(seed);
        let sig = key
            .expanded_key()
            .sign_randomized(msg, &[], rng)
            .expect("RustCrypto hedged signing");
        sig.encode().to_vec()
    }

    /// Deterministic signing of an externally supplied μ.
    pub fn sign_mu_deterministic(seed: &[u8; 32], mu: &[u8]) -> Option<Vec<u8>> {
        let mu = ml_dsa::common::array::Array::try_from(mu).ok()?;
        let sig = Self::signing_key(seed)
            .expanded_key()
            .sign_mu_deterministic(&mu);
        Some(sig.encode().to_vec())
    }

    /// `ML-DSA.Verify(pk, M, σ, ctx)`; false for a malformed key or signature.
    pub fn verify(public: &[u8], msg: &[u8], sig: &[u8], ctx: &[u8]) -> bool {
        let Some(key) = Self::verifying_key(public) else {
            return false;
        };
        let Ok(sig) = ml_dsa::Signature::<P>::try_from(sig) else {
            return false;
        };
        if ctx.is_empty() {
            // The `signature::Verifier` path, which is what applications use.
            key.verify(msg, &sig).is_ok()
        } else {
            key.verify_with_context(msg, ctx, &sig)
        }
    }

    /// Verification against an externally supplied μ.
    pub fn verify_mu(public: &[u8], mu: &[u8], sig: &[u8]) -> bool {
        let (Some(key), Ok(mu), Ok(sig)) = (
            Self::verifying_key(public),
            ml_dsa::common::array::Array::try_from(mu),
            ml_dsa::Signature::<P>::try_from(sig),
        ) else {
            return false;
        };
        key.verify_mu(&mu, &sig)
    }
}

/// Our suite for a RustCrypto ML-DSA parameter set.
pub trait OurSuite {
    /// The matching suite.
    const SUITE: SignatureSuite;
}

impl OurSuite for ml_dsa::MlDsa65 {
    const SUITE: SignatureSuite = SignatureSuite::MlDsa65;
}

impl OurSuite for ml_dsa::MlDsa87 {
    const SUITE: SignatureSuite = SignatureSuite::MlDsa87;
}
