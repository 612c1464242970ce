//! Update envelopes under attack: a wrong enclave key, an altered update or
//! metadata, swapped signatures and another device's signature are all
//! rejected, by the host (outer signature) or by the enclave (inner).

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

use qflare_protocol::envelope::{self, UpdateEnvelope, UpdateMetadata};
use qflare_protocol::identity::DeviceId;
use qflare_protocol::kem::KemKeyPair;
use qflare_protocol::sig::SigningKey;
use qflare_protocol::tensor::{Tensor, TensorMap};
use qflare_protocol::{KemSuite, ProtocolError, SignatureSuite};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct World {
    rng: ChaCha20Rng,
    alice: SigningKey,
    bob: SigningKey,
    enclave: KemKeyPair,
    other_enclave: KemKeyPair,
    update: Vec<u8>,
}

fn world() -> World {
    let mut rng = ChaCha20Rng::seed_from_u64(2024);
    let mut update = TensorMap::new();
    update
        .insert(
            "fc.weight",
            Tensor::new(vec![4, 8], (0..32).map(|i| i as f32 * 0.01).collect()).unwrap(),
        )
        .unwrap();
    World {
        alice: SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap(),
        bob: SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap(),
        enclave: KemKeyPair::generate(KemSuite::MlKem768, &mut rng).unwrap(),
        other_enclave: KemKeyPair::generate(KemSuite::MlKem768, &mut rng).unwrap(),
        update: update.to_safetensors(),
        rng,
    }
}

fn meta(device: DeviceId) -> UpdateMetadata {
    UpdateMetadata {
        round_id: 4,
        device_id: device,
        model_version: 3,
        example_count: 600,
    }
}

fn open(
    w: &World,
    env: &UpdateEnvelope,
    signer: &SigningKey,
) -> Result<envelope::OpenedUpdate, ProtocolError> {
    envelope::open(
        env,
        &w.enclave.secret,
        &w.enclave.public,
        signer.verifying_key(),
    )
}

#[test]
fn honest_envelope_opens() {
    let mut w = world();
    let alice = DeviceId::random(&mut w.rng);
    let env = envelope::seal(
        &meta(alice),
        &w.update,
        &w.alice,
        &w.enclave.public,
        &mut w.rng,
    )
    .unwrap();
    envelope::verify_outer(&env, w.alice.verifying_key()).unwrap();
    let opened = open(&w, &env, &w.alice).unwrap();
    assert_eq!(opened.metadata, meta(alice));
    assert_eq!(&opened.update[..], &w.update[..]);
}

#[test]
fn sealed_to_another_enclave_key() {
    let mut w = world();
    let alice = DeviceId::random(&mut w.rng);
    let env = envelope::seal(
        &meta(alice),
        &w.update,
        &w.alice,
        &w.other_enclave.public,
        &mut w.rng,
    )
    .unwrap();
    // The host cannot tell, the enclave can.
    envelope::verify_outer(&env, w.alice.verifying_key()).unwrap();
    assert_eq!(
        open(&w, &env, &w.alice).unwrap_err(),
        ProtocolError::Aead("envelope payload")
    );
}

#[test]
fn altered_update_or_metadata() {
    let mut w = world();
    let alice = DeviceId::random(&mut w.rng);
    let env = envelope::seal(
        &meta(alice),
        &w.update,
        &w.alice,
        &w.enclave.public,
        &mut w.rng,
    )
    .unwrap();

    let mut payload = env.clone();
    let mid = payload.sealed_payload.len() / 2;
    payload.sealed_payload[mid] ^= 1;
    let mut round = env.clone();
    round.round_id += 1;
    let mut version = env.clone();
    version.model_version -= 1;
    let mut device = env.clone();
    device.device_id = DeviceId::random(&mut w.rng);
    let mut ciphertext = env.clone();
    ciphertext.kem_ciphertext[0] ^= 1;
    for altered in [payload, round, version, device, ciphertext] {
        assert_eq!(
            envelope::verify_outer(&altered, w.alice.verifying_key()).unwrap_err(),
            ProtocolError::BadSignature("envelope outer signature")
        );
        assert!(open(&w, &altered, &w.alice).is_err());
    }
}

#[test]
fn metadata_rewritten_and_outer_resigned_by_the_same_device_fails_inside() {
    // Even the device itself cannot move an update to another round after
    // sealing: the inner signature and the AEAD bind the round.
    let mut w = world();
    let alice = DeviceId::random(&mut w.rng);
    let env = envelope::seal(
        &meta(alice),
        &w.update,
        &w.alice,
        &w.enclave.public,
        &mut w.rng,
    )
    .unwrap();
    let mut moved = env.clone();
    moved.round_id = 5;
    // Re-sign the moved envelope's outer layer with a valid signature over its new header.
    moved.outer_signature = sign_outer_like(&w.alice, &moved);
    envelope::verify_outer(&moved, w.alice.verifying_key()).unwrap();
    assert!(open(&w, &moved, &w.alice).is_err());
}

/// Produces a valid outer signature for an arbitrary envelope, as a device
/// (or anyone holding its key) could.
fn sign_outer_like(key: &SigningKey, env: &UpdateEnvelope) -> Vec<u8> {
    use qflare_protocol::transcript::{Domain, Transcript};
    let mut t = Transcript::new(Domain::UpdateOuter);
    t.append_u64("version", u64::from(env.version))
        .append_u64("round_id", env.round_id)
        .append("device_id", env.device_id.as_bytes())
        .append_u64("model_version", env.model_version)
        .append("kem_suite", env.kem_suite.as_str().as_bytes())
        .append("kem_ciphertext", &env.kem_ciphertext)
        .append("sealed_payload", &env.sealed_payload);
    key.sign(t.hash().as_bytes()).unwrap()
}

#[test]
fn swapped_signatures_fail() {
    let mut w = world();
    let alice = DeviceId::random(&mut w.rng);
    let a = envelope::seal(
        &meta(alice),
        &w.update,
        &w.alice,
        &w.enclave.public,
        &mut w.rng,
    )
    .unwrap();
    let b = envelope::seal(
        &meta(alice),
        &w.update,
        &w.alice,
        &w.enclave.public,
        &mut w.rng,
    )
    .unwrap();
    let mut swapped = a.clone();
    swapped.outer_signature = b.outer_signature.clone();
    assert!(envelope::verify_outer(&swapped, w.alice.verifying_key()).is_err());
    // Swap payloads (each carrying its own inner signature) between envelopes.
    let mut crossed = a.clone();
    crossed.sealed_payload = b.sealed_payload.clone();
    crossed.outer_signature = sign_outer_like(&w.alice, &crossed);
    envelope::verify_outer(&crossed, w.alice.verifying_key()).unwrap();
    assert!(
        open(&w, &crossed, &w.alice).is_err(),
        "payload bound to its own encapsulation"
    );
}

#[test]
fn another_devices_signature_fails() {
    let mut w = world();
    let alice = DeviceId::random(&mut w.rng);
    // Bob builds an envelope claiming to be Alice.
    let forged = envelope::seal(
        &meta(alice),
        &w.update,
        &w.bob,
        &w.enclave.public,
        &mut w.rng,
    )
    .unwrap();
    assert_eq!(
        envelope::verify_outer(&forged, w.alice.verifying_key()).unwrap_err(),
        ProtocolError::BadSignature("envelope outer signature")
    );
    // Bob re-signs only the outer layer of his own envelope while Alice's
    // name is on it: the host is fooled only if it uses Bob's key, and the
    // enclave, using Alice's registered key, refuses.
    assert!(open(&w, &forged, &w.alice).is_err());
    // Outer by Alice, inner by Bob: the inner check fails inside the enclave.
    let mut mixed = forged.clone();
    mixed.outer_signature = sign_outer_like(&w.alice, &mixed);
    envelope::verify_outer(&mixed, w.alice.verifying_key()).unwrap();
    assert_eq!(
        open(&w, &mixed, &w.alice).unwrap_err(),
        ProtocolError::BadSignature("update inner signature")
    );
}

mod binary_encoding {
    use proptest::prelude::*;
    use qflare_protocol::envelope::{self, UpdateEnvelope};
    use qflare_protocol::identity::DeviceId;
    use qflare_protocol::{KemSuite, ProtocolError};

    fn any_envelope() -> impl Strategy<Value = UpdateEnvelope> {
        (
            any::<u16>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            any::<u64>(),
            prop::sample::select(KemSuite::ALL.to_vec()),
            prop::collection::vec(any::<u8>(), 0..2048),
            prop::collection::vec(any::<u8>(), 0..4096),
            prop::collection::vec(any::<u8>(), 0..1024),
        )
            .prop_map(
                |(version, round_id, id, model_version, kem_suite, ct, payload, sig)| {
                    UpdateEnvelope {
                        version,
                        round_id,
                        device_id: DeviceId::from_bytes(id),
                        model_version,
                        kem_suite,
                        kem_ciphertext: ct,
                        sealed_payload: payload,
                        outer_signature: sig,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn every_envelope_round_trips_through_both_encodings(env in any_envelope()) {
            let binary = env.to_bytes();
            prop_assert_eq!(&envelope::decode(&binary, usize::MAX).unwrap(), &env);
            let json = serde_json::to_vec(&env).unwrap();
            prop_assert_eq!(&envelope::decode(&json, usize::MAX).unwrap(), &env);
            prop_assert!(binary.len() <= json.len());
        }

        #[test]
        fn arbitrary_bytes_after_the_magic_never_panic(tail in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = envelope::BINARY_MAGIC.to_vec();
            bytes.extend_from_slice(&tail);
            match envelope::decode(&bytes, usize::MAX) {
                Ok(env) => prop_assert_eq!(env.to_bytes(), bytes),
                Err(ProtocolError::Malformed { .. } | ProtocolError::UnknownSuite { .. }) => {}
                Err(other) => prop_assert!(false, "unexpected error {:?}", other),
            }
        }
    }
}
