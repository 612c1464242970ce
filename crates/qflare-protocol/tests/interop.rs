//! Cross-implementation interoperability of every KEM and signature suite.
//!
//! Proves that keys, ciphertexts and signatures produced by our wrappers are
//! accepted by an independent implementation and vice versa, byte for byte:
//!
//! * ML-KEM-768/1024 (ours: aws-lc-rs) ↔ RustCrypto `ml-kem`, including our
//!   exported expanded secret keys in RustCrypto's decoder, RustCrypto's in
//!   ours, and identical implicit-rejection secrets for tampered ciphertexts.
//! * ML-DSA-65/87 (ours: aws-lc-rs) ↔ RustCrypto `ml-dsa`: same seed, same
//!   public key; signatures cross-verify; flipped bits fail in both.
//! * FrodoKEM-640/976-AES (ours: `frodo-kem-rs`) ↔ RustCrypto `frodo-kem`,
//!   both directions, secret-key and public-key encodings interchangeable,
//!   and byte-identical output from identical randomness.
//! * X-Wing (`KemSuite::X25519MlKem768`, ours: aws-lc-rs ML-KEM + X25519 and
//!   our SHA3-256 combiner) ↔ RustCrypto `x-wing`, both directions, against
//!   both of its decapsulation-key flavours, with the draft's sizes.
//!
//! No external vectors: every input comes from a seeded `ChaCha20Rng`
//! (aws-lc-rs ignores the injected RNG for ML-KEM, so those keys and
//! ciphertexts are fresh on every run; everything else is reproducible).

mod common;

use common::{OurSuite, RcMlDsa, RcMlKem, RcMlKem768, RcMlKem1024};
use qflare_protocol::kem::{KemKeyPair, KemPublicKey, KemSecretKey};
use qflare_protocol::secret::SecretBytes;
use qflare_protocol::sig::SigningKey;
use qflare_protocol::{KemSuite, ProtocolError, SignatureSuite};
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha20Rng;
use x_wing::{Decapsulate as _, Decapsulator as _, Encapsulate as _, Generate as _};
use x_wing::{KeyExport as _, TryDecapsulate as _};

/// Independent key pairs per suite and direction.
const ITERATIONS: usize = 8;

/// Flips one bit of `bytes`, chosen by `i` so successive iterations touch
/// different positions (start, end and the middle of the encoding).
fn flip_bit(bytes: &[u8], i: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let positions = [0, out.len() - 1, out.len() / 2, out.len() / 3];
    let at = positions[i % positions.len()] + i / positions.len();
    out[at % bytes.len()] ^= 1 << (i % 8);
    out
}

// ------------------------------------------------------------------ ML-KEM

fn ml_kem_interop<R: RcMlKem>(seed: u64) {
    let suite = R::SUITE;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for i in 0..ITERATIONS {
        // Our key pair; RustCrypto encapsulates to our public key bytes.
        let pair = KemKeyPair::generate(suite, &mut rng).expect("generate");
        assert_eq!(pair.public.as_bytes().len(), suite.encapsulation_key_len());
        let (ct, ss) = R::encapsulate(pair.public.as_bytes(), &mut rng)
            .unwrap_or_else(|| panic!("{suite} #{i}: RustCrypto rejects our public key"));
        assert_eq!(ct.len(), suite.ciphertext_len(), "{suite} #{i}");
        assert_eq!(
            pair.secret.decapsulate(&ct).expect("decapsulate").expose(),
            ss.as_slice(),
            "{suite} #{i}: we decapsulate RustCrypto's ciphertext"
        );

        // Our exported (FIPS 203 expanded) secret key in RustCrypto's decoder:
        // same public key inside, same secrets out.
        let our_dk = pair.secret.to_secret_bytes().expose();
        assert_eq!(
            R::ek_of_expanded(our_dk).as_deref(),
            Some(pair.public.as_bytes()),
            "{suite} #{i}: RustCrypto reads our secret key"
        );
        let (our_ct, our_ss) = pair.public.encapsulate(&mut rng).expect("encapsulate");
        assert_eq!(
            R::decapsulate(our_dk, &our_ct).as_deref(),
            Some(our_ss.expose()),
            "{suite} #{i}: RustCrypto decapsulates with our secret key"
        );
        assert_eq!(
            R::decapsulate(our_dk, &ct).as_deref(),
            Some(ss.as_slice()),
            "{suite} #{i}"
        );

        // Implicit rejection (FIPS 203 Alg. 18, K̄ = J(z‖c)) is identical too.
        let tampered = flip_bit(&our_ct, i);
        let rejected = pair
            .secret
            .decapsulate(&tampered)
            .expect("implicit rejection");
        assert_ne!(
            rejected, our_ss,
            "{suite} #{i}: tampered ciphertext accepted"
        );
        assert_eq!(
            R::decapsulate(our_dk, &tampered).as_deref(),
            Some(rejected.expose()),
            "{suite} #{i}: implicit-rejection secrets differ"
        );

        // RustCrypto's key pair; we encapsulate, RustCrypto decapsulates.
        let (rc_ek, rc_dk) = R::generate(&mut rng);
        let public = KemPublicKey::from_bytes(suite, rc_ek.clone()).expect("RustCrypto ek");
        assert_eq!(public.as_bytes(), rc_ek.as_slice());
        let (ct, ss) = public.encapsulate(&mut rng).expect("encapsulate");
        assert_eq!(
            R::decapsulate(&rc_dk, &ct).as_deref(),
            Some(ss.expose()),
            "{suite} #{i}: RustCrypto decapsulates our ciphertext"
        );
        // ...and RustCrypto's expanded secret key works in ours.
        let secret = KemSecretKey::from_bytes(suite, SecretBytes::new(rc_dk)).expect("dk");
        assert_eq!(
            secret.decapsulate(&ct).expect("decapsulate"),
            ss,
            "{suite} #{i}"
        );
    }
}

#[test]
fn ml_kem_768_interoperates_with_rustcrypto() {
    ml_kem_interop::<RcMlKem768>(768);
}

#[test]
fn ml_kem_1024_interoperates_with_rustcrypto() {
    ml_kem_interop::<RcMlKem1024>(1024);
}

// ------------------------------------------------------------------ ML-DSA

fn ml_dsa_interop<P: ml_dsa::MlDsaParams + OurSuite>(seed: u64) {
    let suite: SignatureSuite = P::SUITE;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for i in 0..ITERATIONS {
        let mut xi = [0u8; 32];
        rng.fill_bytes(&mut xi);
        let ours = SigningKey::from_seed(suite, SecretBytes::from_slice(&xi)).expect("seed");
        let public = ours.verifying_key().as_bytes().to_vec();
        assert_eq!(
            public,
            RcMlDsa::<P>::public_from_seed(&xi),
            "{suite} #{i}: public keys from the same seed differ"
        );

        let mut msg = vec![0u8; 1 + i * 97];
        rng.fill_bytes(&mut msg);
        let mut other = msg.clone();
        other[0] ^= 0x80;

        // Our signature verifies with RustCrypto.
        let sig = ours.sign(&msg).expect("sign");
        assert_eq!(sig.len(), suite.signature_len());
        assert!(
            RcMlDsa::<P>::verify(&public, &msg, &sig, &[]),
            "{suite} #{i}: RustCrypto rejects our signature"
        );

        // RustCrypto's signatures (deterministic and hedged) verify with ours.
        let rc_sigs = [
            RcMlDsa::<P>::sign_deterministic(&xi, &msg),
            RcMlDsa::<P>::sign_randomized(&xi, &msg, &mut rng),
        ];
        for rc_sig in &rc_sigs {
            ours.verifying_key()
                .verify(&msg, rc_sig, "interop")
                .unwrap_or_else(|e| panic!("{suite} #{i}: we reject RustCrypto's signature: {e}"));
        }

        // A flipped bit, or another message, fails in both.
        for (j, good) in std::iter::once(&sig).chain(&rc_sigs).enumerate() {
            let bad = flip_bit(good, i + j);
            assert_eq!(
                ours.verifying_key().verify(&msg, &bad, "interop"),
                Err(ProtocolError::BadSignature("interop")),
                "{suite} #{i}/{j}: we accept a flipped bit"
            );
            assert!(
                !RcMlDsa::<P>::verify(&public, &msg, &bad, &[]),
                "{suite} #{i}/{j}: RustCrypto accepts a flipped bit"
            );
            assert!(
                ours.verifying_key()
                    .verify(&other, good, "interop")
                    .is_err()
            );
            assert!(!RcMlDsa::<P>::verify(&public, &other, good, &[]));
        }
        // A flipped bit in the public key fails in both as well.
        let bad_public = flip_bit(&public, i);
        assert!(!RcMlDsa::<P>::verify(&bad_public, &msg, &sig, &[]));
        if let Ok(key) = qflare_protocol::sig::VerifyingKey::from_bytes(suite, bad_public) {
            assert!(key.verify(&msg, &sig, "interop").is_err(), "{suite} #{i}");
        }
    }
}

#[test]
fn ml_dsa_65_interoperates_with_rustcrypto() {
    ml_dsa_interop::<ml_dsa::MlDsa65>(65);
}

#[test]
fn ml_dsa_87_interoperates_with_rustcrypto() {
    ml_dsa_interop::<ml_dsa::MlDsa87>(87);
}

// ------------------------------------------------------------------ FrodoKEM

fn frodo_decapsulate(
    alg: frodo_kem::Algorithm,
    dk: &frodo_kem::DecryptionKey,
    ct: &[u8],
) -> Vec<u8> {
    let ct = alg
        .ciphertext_from_bytes(ct)
        .expect("RustCrypto parses the ciphertext");
    let (ss, _message) = alg.decapsulate(dk, &ct).expect("RustCrypto decapsulates");
    ss.value().to_vec()
}

fn frodo_interop(suite: KemSuite, alg: frodo_kem::Algorithm, seed: u64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for i in 0..ITERATIONS {
        // Ours → RustCrypto encapsulates → we decapsulate.
        let pair = KemKeyPair::generate(suite, &mut rng).expect("generate");
        let rc_ek = alg
            .encryption_key_from_bytes(pair.public.as_bytes())
            .expect("RustCrypto accepts our public key");
        assert_eq!(rc_ek.value(), pair.public.as_bytes(), "{suite} #{i}");
        let (ct, ss) = alg
            .encapsulate_with_rng(&rc_ek, &mut rng)
            .expect("encapsulate");
        assert_eq!(ct.value().len(), suite.ciphertext_len(), "{suite} #{i}");
        assert_eq!(ss.value().len(), suite.shared_secret_len(), "{suite} #{i}");
        assert_eq!(
            pair.secret
                .decapsulate(ct.value())
                .expect("decapsulate")
                .expose(),
            ss.value(),
            "{suite} #{i}: we decapsulate RustCrypto's ciphertext"
        );

        // Our secret-key encoding loads in RustCrypto, yields our public key
        // byte for byte and decapsulates our ciphertexts.
        let rc_dk = alg
            .decryption_key_from_bytes(pair.secret.to_secret_bytes().expose())
            .expect("RustCrypto accepts our secret key");
        assert_eq!(
            alg.encryption_key_from_decryption_key(&rc_dk).value(),
            pair.public.as_bytes(),
            "{suite} #{i}: public key derived by RustCrypto from our secret key"
        );
        let (our_ct, our_ss) = pair.public.encapsulate(&mut rng).expect("encapsulate");
        assert_eq!(
            frodo_decapsulate(alg, &rc_dk, &our_ct),
            our_ss.expose(),
            "{suite} #{i}: RustCrypto decapsulates our ciphertext"
        );
        // Implicit rejection agrees as well.
        let tampered = flip_bit(&our_ct, i);
        let rejected = pair
            .secret
            .decapsulate(&tampered)
            .expect("implicit rejection");
        assert_ne!(
            rejected, our_ss,
            "{suite} #{i}: tampered ciphertext accepted"
        );
        assert_eq!(
            frodo_decapsulate(alg, &rc_dk, &tampered),
            rejected.expose(),
            "{suite} #{i}: implicit-rejection secrets differ"
        );

        // RustCrypto → we encapsulate → RustCrypto decapsulates.
        let (rc_ek, rc_dk) = alg.generate_keypair(&mut rng);
        let public =
            KemPublicKey::from_bytes(suite, rc_ek.value().to_vec()).expect("RustCrypto ek");
        assert_eq!(public.as_bytes(), rc_ek.value());
        let (ct, ss) = public.encapsulate(&mut rng).expect("encapsulate");
        assert_eq!(
            frodo_decapsulate(alg, &rc_dk, &ct),
            ss.expose(),
            "{suite} #{i}: RustCrypto decapsulates our ciphertext"
        );
        let secret = KemSecretKey::from_bytes(suite, SecretBytes::from_slice(rc_dk.value()))
            .expect("RustCrypto dk");
        assert_eq!(
            secret.decapsulate(&ct).expect("decapsulate"),
            ss,
            "{suite} #{i}"
        );

        // Same randomness in, same bytes out: both draw key-generation and
        // (μ‖salt) encapsulation randomness identically from the RNG.
        let stream = seed ^ (i as u64) << 32;
        let mut ours_rng = ChaCha20Rng::seed_from_u64(stream);
        let mut theirs_rng = ChaCha20Rng::seed_from_u64(stream);
        let ours = KemKeyPair::generate(suite, &mut ours_rng).expect("generate");
        let (rc_ek, rc_dk) = alg.generate_keypair(&mut theirs_rng);
        assert_eq!(ours.public.as_bytes(), rc_ek.value(), "{suite} #{i}: pk");
        assert_eq!(
            ours.secret.to_secret_bytes().expose(),
            rc_dk.value(),
            "{suite} #{i}: sk"
        );
        let (our_ct, our_ss) = ours.public.encapsulate(&mut ours_rng).expect("encapsulate");
        let (rc_ct, rc_ss) = alg
            .encapsulate_with_rng(&rc_ek, &mut theirs_rng)
            .expect("encapsulate");
        assert_eq!(our_ct, rc_ct.value(), "{suite} #{i}: ciphertext");
        assert_eq!(
            our_ss.expose(),
            rc_ss.value(),
            "{suite} #{i}: shared secret"
        );
    }
}

#[test]
fn frodokem_640_aes_interoperates_with_rustcrypto() {
    frodo_interop(
        KemSuite::FrodoKem640Aes,
        frodo_kem::Algorithm::FrodoKem640Aes,
        640,
    );
}

#[test]
fn frodokem_976_aes_interoperates_with_rustcrypto() {
    frodo_interop(
        KemSuite::FrodoKem976Aes,
        frodo_kem::Algorithm::FrodoKem976Aes,
        976,
    );
}

// ------------------------------------------------------------------ X-Wing

#[test]
fn x_wing_sizes_match_the_draft() {
    let suite = KemSuite::X25519MlKem768;
    assert_eq!(suite.encapsulation_key_len(), 1216);
    assert_eq!(suite.ciphertext_len(), 1120);
    assert_eq!(suite.shared_secret_len(), 32);
    assert_eq!(
        suite.encapsulation_key_len(),
        x_wing::ENCAPSULATION_KEY_SIZE
    );
    assert_eq!(suite.ciphertext_len(), x_wing::CIPHERTEXT_SIZE);
}

#[test]
fn x_wing_interoperates_with_rustcrypto() {
    let suite = KemSuite::X25519MlKem768;
    let mut rng = ChaCha20Rng::seed_from_u64(0x1216);
    for i in 0..ITERATIONS {
        // x-wing key pair → we encapsulate → x-wing decapsulates, with the
        // lenient key and with the one that rejects non-contributory X25519.
        let lenient = x_wing::DecapsulationKey::generate_from_rng(&mut rng);
        let strict = x_wing::DecapsulationKeyRejectNonContrib::from(*lenient.as_bytes());
        let ek = lenient.encapsulation_key().to_bytes();
        assert_eq!(ek.len(), 1216);
        let public = KemPublicKey::from_bytes(suite, ek.to_vec()).expect("x-wing ek");
        assert_eq!(public.as_bytes(), ek.as_slice());
        let (ct, ss) = public.encapsulate(&mut rng).expect("encapsulate");
        assert_eq!(ct.len(), 1120, "#{i}");
        assert_eq!(ss.len(), 32, "#{i}");
        let ct_x = x_wing::Ciphertext::try_from(ct.as_slice()).expect("ciphertext size");
        assert_eq!(
            lenient.decapsulate(&ct_x).as_slice(),
            ss.expose(),
            "#{i}: x-wing (lenient) decapsulates our ciphertext"
        );
        assert_eq!(
            strict
                .try_decapsulate(&ct_x)
                .expect("contributory ciphertext")
                .as_slice(),
            ss.expose(),
            "#{i}: x-wing (strict) decapsulates our ciphertext"
        );

        // Our key pair → x-wing encapsulates to our public key bytes → we decapsulate.
        let pair = KemKeyPair::generate(suite, &mut rng).expect("generate");
        assert_eq!(pair.public.as_bytes().len(), 1216);
        let their_ek = x_wing::EncapsulationKey::try_from(pair.public.as_bytes())
            .expect("x-wing accepts our public key");
        assert_eq!(their_ek.to_bytes().as_slice(), pair.public.as_bytes());
        let (their_ct, their_ss) = their_ek.encapsulate_with_rng(&mut rng);
        assert_eq!(their_ct.len(), 1120);
        assert_eq!(
            pair.secret
                .decapsulate(their_ct.as_slice())
                .expect("decapsulate")
                .expose(),
            their_ss.as_slice(),
            "#{i}: we decapsulate x-wing's ciphertext"
        );

        // A tampered ML-KEM half changes the secret on both sides alike
        // (implicit rejection, not an error).
        let tampered = flip_bit(&their_ct[..1088], i);
        let mut tampered_ct = tampered.clone();
        tampered_ct.extend_from_slice(&their_ct[1088..]);
        let ours = pair
            .secret
            .decapsulate(&tampered_ct)
            .expect("implicit rejection");
        assert_ne!(ours.expose(), their_ss.as_slice(), "#{i}");
    }
}

/// An all-zero X25519 share is a low-order point, so the X25519 output is
/// all zero. We refuse it, exactly like x-wing's `DecapsulationKeyRejectNonContrib`;
/// x-wing's lenient `DecapsulationKey` accepts it (the draft leaves this open).
#[test]
fn x_wing_non_contributory_x25519_is_rejected_like_reject_non_contrib() {
    let suite = KemSuite::X25519MlKem768;
    let mut rng = ChaCha20Rng::seed_from_u64(0x0000_c0de);

    let lenient = x_wing::DecapsulationKey::generate_from_rng(&mut rng);
    let strict = x_wing::DecapsulationKeyRejectNonContrib::from(*lenient.as_bytes());
    let public = KemPublicKey::from_bytes(suite, lenient.encapsulation_key().to_bytes().to_vec())
        .expect("x-wing ek");
    let (mut ct, _) = public.encapsulate(&mut rng).expect("encapsulate");
    ct[1088..].fill(0);
    let ct_x = x_wing::Ciphertext::try_from(ct.as_slice()).expect("ciphertext size");
    assert!(strict.try_decapsulate(&ct_x).is_err());
    let _accepted = lenient.decapsulate(&ct_x);

    let pair = KemKeyPair::generate(suite, &mut rng).expect("generate");
    let their_ek = x_wing::EncapsulationKey::try_from(pair.public.as_bytes()).expect("ek");
    let (their_ct, _) = their_ek.encapsulate_with_rng(&mut rng);
    let mut zeroed = their_ct.to_vec();
    zeroed[1088..].fill(0);
    assert_eq!(
        pair.secret.decapsulate(&zeroed),
        Err(ProtocolError::Decapsulation)
    );
}

/// An X-Wing public key whose ML-KEM half fails the FIPS 203 §7.2 modulus
/// check is refused by both implementations at parse time.
#[test]
fn x_wing_unreduced_ml_kem_key_is_rejected_by_both() {
    let suite = KemSuite::X25519MlKem768;
    let mut rng = ChaCha20Rng::seed_from_u64(0x00ff_f000);
    let pair = KemKeyPair::generate(suite, &mut rng).expect("generate");
    for (i, position) in [0usize, 600, 1150].into_iter().enumerate() {
        let mut bad = pair.public.as_bytes().to_vec();
        // Coefficient pair at `position` (a multiple of 3): first coefficient := 0xfff.
        bad[position] = 0xff;
        bad[position + 1] |= 0x0f;
        assert_eq!(
            KemPublicKey::from_bytes(suite, bad.clone()),
            Err(ProtocolError::InvalidKey("ml-kem encapsulation key")),
            "#{i}"
        );
        assert!(
            x_wing::EncapsulationKey::try_from(bad.as_slice()).is_err(),
            "#{i}"
        );
    }
}
