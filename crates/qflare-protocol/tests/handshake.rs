//! The session handshake under attack: for every KEM × signature suite pair
//! the honest handshake succeeds, and every single-byte change to any
//! handshake message on the wire, a wrong pinned key, an expired transcript,
//! or a mixed-up suite fails with a typed error.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

use qflare_protocol::handshake::{
    AwaitClientConfirm, ClientConfirm, ClientHello, ClientIdentity, ClientStart, ServerHello,
    ServerStart,
};
use qflare_protocol::identity::{DeviceId, DeviceKeys};
use qflare_protocol::sig::SigningKey;
use qflare_protocol::wire::{self, limits};
use qflare_protocol::{KemSuite, ProtocolError, SignatureSuite};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const NOW: u64 = 1_750_000_000;
const LIFETIME: u64 = 3600;

struct Parties {
    server: SigningKey,
    device: DeviceKeys,
    device_id: DeviceId,
}

fn parties(kem: KemSuite, sig: SignatureSuite, seed: u64) -> (Parties, ChaCha20Rng) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let server = SigningKey::generate(sig, &mut rng).unwrap();
    let device = DeviceKeys::generate(kem, sig, &mut rng).unwrap();
    let device_id = DeviceId::random(&mut rng);
    (
        Parties {
            server,
            device,
            device_id,
        },
        rng,
    )
}

impl Parties {
    fn identity(&self) -> ClientIdentity<'_> {
        ClientIdentity {
            device_id: self.device_id,
            kem_public_key: &self.device.kem.public,
            kem_secret_key: &self.device.kem.secret,
            signing_key: &self.device.signing,
        }
    }
}

/// Runs the whole handshake and a request/response through the channel.
fn honest_session(p: &Parties, rng: &mut ChaCha20Rng) {
    let identity = p.identity();
    let (await_hello, hello) = ClientStart::new(identity, p.server.verifying_key())
        .hello(rng)
        .unwrap();
    let (await_confirm, server_hello) = ServerStart::new(&p.server)
        .respond(&hello, &p.device.kem.public, NOW, LIFETIME, rng)
        .unwrap();
    let (client_session, confirm) = await_hello.finish(&server_hello, NOW + 1).unwrap();
    let server_session = await_confirm
        .confirm(&confirm, p.device.signing.verifying_key(), NOW + 2)
        .unwrap();
    assert_eq!(server_session.session_id, client_session.session_id);
    assert_eq!(server_session.device_id, p.device_id);
    assert_eq!(server_session.expires_at, NOW + LIFETIME);

    let server = server_session.server_channel().unwrap();
    let mut client = client_session.into_client_channel().unwrap();
    let mut body = b"{\"ping\":1}".to_vec();
    let seq = client
        .seal_request("POST", "/v1/session/ping", &mut body, NOW + 3)
        .unwrap();
    let accepted = server
        .open_request("POST", "/v1/session/ping", &mut body, 0, NOW + 3)
        .unwrap();
    assert_eq!(accepted, seq);
    assert_eq!(body, b"{\"ping\":1}");
    let mut reply = b"pong".to_vec();
    server
        .seal_response(seq, "POST", "/v1/session/ping", &mut reply)
        .unwrap();
    client
        .open_response(seq, "POST", "/v1/session/ping", &mut reply)
        .unwrap();
    assert_eq!(reply, b"pong");
}

#[test]
fn honest_handshake_for_every_suite_pair() {
    for (i, kem) in KemSuite::ALL.into_iter().enumerate() {
        for (j, sig) in SignatureSuite::ALL.into_iter().enumerate() {
            let (p, mut rng) = parties(kem, sig, (i * 10 + j) as u64);
            honest_session(&p, &mut rng);
        }
    }
}

/// Byte positions to flip in an encoded message: all of them for the default
/// suites, an even spread (always including both ends) for the others.
fn positions(len: usize, exhaustive: bool) -> Vec<usize> {
    if exhaustive {
        return (0..len).collect();
    }
    let step = (len / 96).max(1);
    let mut out: Vec<usize> = (0..len).step_by(step).collect();
    out.push(len - 1);
    out
}

fn flipped(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[at] ^= 0x01;
    out
}

fn tamper_every_message(kem: KemSuite, sig: SignatureSuite, exhaustive: bool) {
    let (p, mut rng) = parties(kem, sig, 1234);
    let server_vk = p.server.verifying_key().clone();
    let device_vk = p.device.signing.verifying_key().clone();

    // 1. ClientHello altered in transit: the server answers what it received,
    // but the client's transcript differs, so the server's signature fails.
    let (_, hello) = ClientStart::new(p.identity(), &server_vk)
        .hello(&mut rng)
        .unwrap();
    let hello_bytes = wire::encode(&hello).unwrap();
    for at in positions(hello_bytes.len(), exhaustive) {
        let (await_hello, hello) = ClientStart::new(p.identity(), &server_vk)
            .hello(&mut rng)
            .unwrap();
        let original = wire::encode(&hello).unwrap();
        let Ok(altered) = wire::decode::<ClientHello>(
            "client hello",
            &flipped(&original, at),
            limits::CLIENT_HELLO,
        ) else {
            continue; // refused by the decoder: a typed error already
        };
        let outcome = ServerStart::new(&p.server)
            .respond(&altered, &p.device.kem.public, NOW, LIFETIME, &mut rng)
            .and_then(|(_, server_hello)| await_hello.finish(&server_hello, NOW + 1));
        assert!(
            outcome.is_err(),
            "{kem}/{sig}: client hello byte {at} flip went unnoticed"
        );
    }

    // 2. ServerHello altered: the client refuses it.
    let (_, hello) = ClientStart::new(p.identity(), &server_vk)
        .hello(&mut rng)
        .unwrap();
    let (_, server_hello) = ServerStart::new(&p.server)
        .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
        .unwrap();
    let server_hello_len = wire::encode(&server_hello).unwrap().len();
    for at in positions(server_hello_len, exhaustive) {
        let (await_hello, hello) = ClientStart::new(p.identity(), &server_vk)
            .hello(&mut rng)
            .unwrap();
        let (_, server_hello) = ServerStart::new(&p.server)
            .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
            .unwrap();
        let encoded = wire::encode(&server_hello).unwrap();
        let Ok(altered) = wire::decode::<ServerHello>(
            "server hello",
            &flipped(&encoded, at),
            limits::SERVER_HELLO,
        ) else {
            continue;
        };
        let err = await_hello.finish(&altered, NOW + 1).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::BadSignature(_)
                    | ProtocolError::Expired { .. }
                    | ProtocolError::Malformed { .. }
                    | ProtocolError::UnsupportedVersion(_)
                    | ProtocolError::InvalidLength { .. }
                    | ProtocolError::Decapsulation
            ),
            "{kem}/{sig}: server hello byte {at}: unexpected {err:?}"
        );
    }

    // 3. ClientConfirm altered: the server refuses it.
    let confirm_len = {
        let (await_hello, hello) = ClientStart::new(p.identity(), &server_vk)
            .hello(&mut rng)
            .unwrap();
        let (_, server_hello) = ServerStart::new(&p.server)
            .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
            .unwrap();
        let (_, confirm) = await_hello.finish(&server_hello, NOW + 1).unwrap();
        wire::encode(&confirm).unwrap().len()
    };
    for at in positions(confirm_len, exhaustive) {
        let (await_hello, hello) = ClientStart::new(p.identity(), &server_vk)
            .hello(&mut rng)
            .unwrap();
        let (await_confirm, server_hello) = ServerStart::new(&p.server)
            .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
            .unwrap();
        let (_, confirm) = await_hello.finish(&server_hello, NOW + 1).unwrap();
        let encoded = wire::encode(&confirm).unwrap();
        let Ok(altered) = wire::decode::<ClientConfirm>(
            "client confirm",
            &flipped(&encoded, at),
            limits::CLIENT_CONFIRM,
        ) else {
            continue;
        };
        let err = await_confirm
            .confirm(&altered, &device_vk, NOW + 2)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::BadSignature(_)
                    | ProtocolError::KeyConfirmation
                    | ProtocolError::Mismatch(_)
                    | ProtocolError::UnsupportedVersion(_)
            ),
            "{kem}/{sig}: confirm byte {at}: unexpected {err:?}"
        );
    }
}

#[test]
fn every_byte_of_every_message_is_authenticated_default_suites() {
    tamper_every_message(KemSuite::MlKem768, SignatureSuite::MlDsa65, true);
}

#[test]
fn tampering_is_detected_for_every_other_suite_pair() {
    for kem in KemSuite::ALL {
        for sig in SignatureSuite::ALL {
            if (kem, sig) != (KemSuite::MlKem768, SignatureSuite::MlDsa65) {
                tamper_every_message(kem, sig, false);
            }
        }
    }
}

#[test]
fn wrong_pinned_server_key_is_refused() {
    let (p, mut rng) = parties(KemSuite::MlKem768, SignatureSuite::MlDsa65, 5);
    let impostor = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
    let pinned = p.server.verifying_key().clone();
    let (await_hello, hello) = ClientStart::new(p.identity(), &pinned)
        .hello(&mut rng)
        .unwrap();
    // An impostor server with its own key answers.
    let (_, server_hello) = ServerStart::new(&impostor)
        .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
        .unwrap();
    assert_eq!(
        await_hello.finish(&server_hello, NOW + 1).unwrap_err(),
        ProtocolError::BadSignature("server hello")
    );
}

#[test]
fn expired_transcripts_are_refused_on_both_sides() {
    let (p, mut rng) = parties(KemSuite::MlKem768, SignatureSuite::MlDsa65, 6);
    let pinned = p.server.verifying_key().clone();
    let (await_hello, hello) = ClientStart::new(p.identity(), &pinned)
        .hello(&mut rng)
        .unwrap();
    let (_, server_hello) = ServerStart::new(&p.server)
        .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
        .unwrap();
    assert!(matches!(
        await_hello.finish(&server_hello, NOW + LIFETIME),
        Err(ProtocolError::Expired { .. })
    ));

    // A confirmation that arrives after the handshake timeout.
    let (await_hello, hello) = ClientStart::new(p.identity(), &pinned)
        .hello(&mut rng)
        .unwrap();
    let (await_confirm, server_hello) = ServerStart::new(&p.server)
        .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
        .unwrap();
    let (_, confirm) = await_hello.finish(&server_hello, NOW).unwrap();
    let deadline = await_confirm.confirm_deadline();
    assert!(matches!(
        await_confirm.confirm(&confirm, p.device.signing.verifying_key(), deadline),
        Err(ProtocolError::Expired { .. })
    ));

    // A session used past its expiry.
    let (await_hello, hello) = ClientStart::new(p.identity(), &pinned)
        .hello(&mut rng)
        .unwrap();
    let (await_confirm, server_hello) = ServerStart::new(&p.server)
        .respond(&hello, &p.device.kem.public, NOW, 10, &mut rng)
        .unwrap();
    let (client, confirm) = await_hello.finish(&server_hello, NOW).unwrap();
    let server = await_confirm
        .confirm(&confirm, p.device.signing.verifying_key(), NOW + 1)
        .unwrap()
        .server_channel()
        .unwrap();
    let mut client = client.into_client_channel().unwrap();
    let mut body = b"late".to_vec();
    assert!(matches!(
        client.seal_request("POST", "/p", &mut body, NOW + 10),
        Err(ProtocolError::Expired { .. })
    ));
    let mut body = b"late".to_vec();
    client
        .seal_request("POST", "/p", &mut body, NOW + 9)
        .unwrap();
    assert!(matches!(
        server.open_request("POST", "/p", &mut body, 0, NOW + 10),
        Err(ProtocolError::Expired { .. })
    ));
}

#[test]
fn mixed_up_suites_are_refused() {
    let (p, mut rng) = parties(KemSuite::MlKem768, SignatureSuite::MlDsa65, 7);
    let pinned = p.server.verifying_key().clone();
    // The device's hello claims another KEM suite than it registered.
    let (_, mut hello) = ClientStart::new(p.identity(), &pinned)
        .hello(&mut rng)
        .unwrap();
    hello.kem_suite = KemSuite::MlKem1024;
    assert!(matches!(
        ServerStart::new(&p.server).respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng),
        Err(ProtocolError::SuiteMismatch { .. })
    ));
    // The server signs with ML-DSA-87 while the device pinned an ML-DSA-65 key.
    let other = SigningKey::generate(SignatureSuite::MlDsa87, &mut rng).unwrap();
    let (await_hello, hello) = ClientStart::new(p.identity(), &pinned)
        .hello(&mut rng)
        .unwrap();
    let (_, server_hello) = ServerStart::new(&other)
        .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
        .unwrap();
    assert!(matches!(
        await_hello.finish(&server_hello, NOW),
        Err(ProtocolError::BadSignature(_))
    ));
    // A hello addressed to another device's registered key.
    let stranger =
        DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng).unwrap();
    let (await_hello, hello) = ClientStart::new(p.identity(), &pinned)
        .hello(&mut rng)
        .unwrap();
    let (_, server_hello) = ServerStart::new(&p.server)
        .respond(&hello, &stranger.kem.public, NOW, LIFETIME, &mut rng)
        .unwrap();
    assert!(await_hello.finish(&server_hello, NOW).is_err());
}

#[test]
fn confirmation_by_another_device_key_is_refused() {
    let (p, mut rng) = parties(KemSuite::MlKem768, SignatureSuite::MlDsa65, 8);
    let pinned = p.server.verifying_key().clone();
    let thief = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
    let (await_hello, hello) = ClientStart::new(p.identity(), &pinned)
        .hello(&mut rng)
        .unwrap();
    let (await_confirm, server_hello) = ServerStart::new(&p.server)
        .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
        .unwrap();
    let (_, confirm) = await_hello.finish(&server_hello, NOW).unwrap();
    assert_eq!(
        await_confirm
            .confirm(&confirm, thief.verifying_key(), NOW)
            .unwrap_err(),
        ProtocolError::BadSignature("client confirmation")
    );
}

#[test]
fn a_device_without_its_kem_key_cannot_finish() {
    // The attacker stole the signing key but not the KEM key: the static
    // secret differs, so the key confirmation fails at the server.
    let (p, mut rng) = parties(KemSuite::MlKem768, SignatureSuite::MlDsa65, 9);
    let pinned = p.server.verifying_key().clone();
    let wrong_kem =
        DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng).unwrap();
    let attacker = ClientIdentity {
        device_id: p.device_id,
        kem_public_key: &p.device.kem.public,
        kem_secret_key: &wrong_kem.kem.secret,
        signing_key: &p.device.signing,
    };
    let (await_hello, hello) = ClientStart::new(attacker, &pinned).hello(&mut rng).unwrap();
    let (await_confirm, server_hello) = ServerStart::new(&p.server)
        .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
        .unwrap();
    let (_, confirm) = await_hello.finish(&server_hello, NOW).unwrap();
    assert_eq!(
        await_confirm
            .confirm(&confirm, p.device.signing.verifying_key(), NOW)
            .unwrap_err(),
        ProtocolError::KeyConfirmation
    );
}

#[test]
fn pending_state_survives_export_and_import() {
    let (p, mut rng) = parties(KemSuite::FrodoKem640Aes, SignatureSuite::MlDsa65, 10);
    let pinned = p.server.verifying_key().clone();
    let (await_hello, hello) = ClientStart::new(p.identity(), &pinned)
        .hello(&mut rng)
        .unwrap();
    let (await_confirm, server_hello) = ServerStart::new(&p.server)
        .respond(&hello, &p.device.kem.public, NOW, LIFETIME, &mut rng)
        .unwrap();
    let exported = await_confirm.export();
    assert!(!format!("{exported:?}").contains(&hex::encode(&exported.expose()[..8])));
    let restored = AwaitClientConfirm::import(exported.expose()).unwrap();
    assert_eq!(restored.session_id(), server_hello.session_id);
    let (_, confirm) = await_hello.finish(&server_hello, NOW).unwrap();
    restored
        .confirm(&confirm, p.device.signing.verifying_key(), NOW + 1)
        .unwrap();
    assert!(AwaitClientConfirm::import(&exported.expose()[1..]).is_err());
}
