//! The sealed channel under attack (property-based): replayed, reordered,
//! tampered, truncated, cross-direction, cross-session and cross-route
//! records are all rejected, and honest in-order traffic always passes.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use qflare_protocol::channel::{ClientChannel, ServerChannel};
use qflare_protocol::handshake::{ClientIdentity, ClientStart, ServerStart};
use qflare_protocol::identity::{DeviceId, DeviceKeys};
use qflare_protocol::sig::SigningKey;
use qflare_protocol::{KemSuite, ProtocolError, SignatureSuite};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use std::sync::OnceLock;

const NOW: u64 = 1_750_000_000;

/// Establishes `n` independent sessions once; proptest cases reuse their keys
/// (a fresh channel value per case keeps the sequence state independent).
fn sessions() -> &'static Vec<(Vec<u8>, Vec<u8>)> {
    static SESSIONS: OnceLock<Vec<(Vec<u8>, Vec<u8>)>> = OnceLock::new();
    SESSIONS.get_or_init(|| {
        let mut rng = ChaCha20Rng::seed_from_u64(77);
        let server = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
        let device =
            DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng).unwrap();
        let device_id = DeviceId::random(&mut rng);
        (0..2)
            .map(|_| {
                let identity = ClientIdentity {
                    device_id,
                    kem_public_key: &device.kem.public,
                    kem_secret_key: &device.kem.secret,
                    signing_key: &device.signing,
                };
                let (await_hello, hello) = ClientStart::new(identity, server.verifying_key())
                    .hello(&mut rng)
                    .unwrap();
                let (await_confirm, server_hello) = ServerStart::new(&server)
                    .respond(&hello, &device.kem.public, NOW, 3600, &mut rng)
                    .unwrap();
                let (client, confirm) = await_hello.finish(&server_hello, NOW).unwrap();
                let established = await_confirm
                    .confirm(&confirm, device.signing.verifying_key(), NOW)
                    .unwrap();
                let mut blob = established.session_id.as_bytes().to_vec();
                blob.extend_from_slice(established.secrets().export().expose());
                let mut client_blob = client.session_id.as_bytes().to_vec();
                client_blob.extend_from_slice(client.secrets().export().expose());
                (client_blob, blob)
            })
            .collect()
    })
}

fn channels(index: usize) -> (ClientChannel, ServerChannel) {
    use qflare_protocol::channel::SessionSecrets;
    use qflare_protocol::identity::SessionId;
    let (client_blob, server_blob) = &sessions()[index];
    let id = |b: &[u8]| SessionId::from_bytes(b[..16].try_into().unwrap());
    let client = ClientChannel::from_secrets(
        id(client_blob),
        NOW + 3600,
        &SessionSecrets::import(&client_blob[16..]).unwrap(),
        0,
    )
    .unwrap();
    let server = ServerChannel::from_secrets(
        id(server_blob),
        NOW + 3600,
        &SessionSecrets::import(&server_blob[16..]).unwrap(),
    )
    .unwrap();
    (client, server)
}

/// A restored channel continues the sequence instead of reusing nonces.
#[test]
fn a_restored_client_channel_continues_its_sequence() {
    use qflare_protocol::channel::SessionSecrets;
    use qflare_protocol::identity::SessionId;
    let (mut client, server) = channels(1);
    let (first, _) = seal(&mut client, "/v1/session/ping", b"{}");
    let (second, _) = seal(&mut client, "/v1/session/ping", b"{}");
    assert_eq!((first, second), (1, 2));
    assert_eq!(client.last_sent(), 2);
    let (client_blob, _) = &sessions()[1];
    let mut restored = ClientChannel::from_secrets(
        SessionId::from_bytes(client_blob[..16].try_into().unwrap()),
        NOW + 3600,
        &SessionSecrets::import(&client_blob[16..]).unwrap(),
        client.last_sent(),
    )
    .unwrap();
    let (third, mut record) = seal(&mut restored, "/v1/session/ping", b"{}");
    assert_eq!(third, 3);
    assert_eq!(
        server
            .open_request("POST", "/v1/session/ping", &mut record, 2, NOW)
            .unwrap(),
        3
    );
}

fn seal(client: &mut ClientChannel, path: &str, body: &[u8]) -> (u64, Vec<u8>) {
    let mut record = body.to_vec();
    let seq = client.seal_request("POST", path, &mut record, NOW).unwrap();
    (seq, record)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn in_order_traffic_passes_and_replays_fail(bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..512), 1..8)) {
        let (mut client, server) = channels(0);
        let mut last = 0;
        for body in &bodies {
            let (seq, record) = seal(&mut client, "/v1/updates", body);
            let mut opened = record.clone();
            let got = server.open_request("POST", "/v1/updates", &mut opened, last, NOW).unwrap();
            prop_assert_eq!(got, seq);
            prop_assert_eq!(&opened, body);
            last = got;
            // The same record again is a replay.
            let mut again = record.clone();
            let err = server.open_request("POST", "/v1/updates", &mut again, last, NOW).unwrap_err();
            prop_assert!(matches!(err, ProtocolError::Replay { .. }), "{:?}", err);
            // Responses come back under the request's number only.
            let mut reply = body.clone();
            server.seal_response(seq, "POST", "/v1/updates", &mut reply).unwrap();
            let mut wrong = reply.clone();
            prop_assert!(client.open_response(seq + 1, "POST", "/v1/updates", &mut wrong).is_err());
            client.open_response(seq, "POST", "/v1/updates", &mut reply).unwrap();
            prop_assert_eq!(&reply, body);
        }
    }

    #[test]
    fn reordered_records_fail(first in prop::collection::vec(any::<u8>(), 0..256), second in prop::collection::vec(any::<u8>(), 0..256)) {
        let (mut client, server) = channels(0);
        let (_, older) = seal(&mut client, "/v1/round", &first);
        let (newer_seq, newer) = seal(&mut client, "/v1/round", &second);
        let mut newer = newer;
        let last = server.open_request("POST", "/v1/round", &mut newer, 0, NOW).unwrap();
        prop_assert_eq!(last, newer_seq);
        let mut older = older;
        let err = server.open_request("POST", "/v1/round", &mut older, last, NOW).unwrap_err();
        prop_assert!(matches!(err, ProtocolError::Replay { .. }), "{:?}", err);
    }

    #[test]
    fn any_flipped_bit_fails(body in prop::collection::vec(any::<u8>(), 0..256), index in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (mut client, server) = channels(0);
        let (_, record) = seal(&mut client, "/v1/updates", &body);
        let mut tampered = record.clone();
        let at = index.index(tampered.len());
        tampered[at] ^= 1 << bit;
        // A flip in the sequence trailer turns into a nonce/AAD mismatch or a replay.
        prop_assert!(server.open_request("POST", "/v1/updates", &mut tampered, 0, NOW).is_err());
    }

    #[test]
    fn truncated_or_extended_records_fail(body in prop::collection::vec(any::<u8>(), 0..256), cut in 1usize..40) {
        let (mut client, server) = channels(0);
        let (_, record) = seal(&mut client, "/v1/updates", &body);
        let mut truncated = record[..record.len().saturating_sub(cut)].to_vec();
        prop_assert!(server.open_request("POST", "/v1/updates", &mut truncated, 0, NOW).is_err());
        let mut dropped_front = record[cut.min(record.len())..].to_vec();
        prop_assert!(server.open_request("POST", "/v1/updates", &mut dropped_front, 0, NOW).is_err());
        let mut extended = record.clone();
        extended.insert(0, 0);
        prop_assert!(server.open_request("POST", "/v1/updates", &mut extended, 0, NOW).is_err());
    }

    #[test]
    fn records_are_bound_to_route_session_and_direction(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let (mut client, server) = channels(0);
        let (mut other_client, other_server) = channels(1);
        let (seq, record) = seal(&mut client, "/v1/updates", &body);

        let mut wrong_path = record.clone();
        prop_assert!(server.open_request("POST", "/v1/models/current", &mut wrong_path, 0, NOW).is_err());
        let mut wrong_method = record.clone();
        prop_assert!(server.open_request("GET", "/v1/updates", &mut wrong_method, 0, NOW).is_err());
        let mut wrong_session = record.clone();
        prop_assert!(other_server.open_request("POST", "/v1/updates", &mut wrong_session, 0, NOW).is_err());
        // A request reflected back to the client as if it were a response.
        let mut reflected = record.clone();
        prop_assert!(client.open_response(seq, "POST", "/v1/updates", &mut reflected).is_err());
        // A response of another session.
        let (other_seq, _) = seal(&mut other_client, "/v1/updates", &body);
        let mut reply = body.clone();
        other_server.seal_response(other_seq, "POST", "/v1/updates", &mut reply).unwrap();
        prop_assert!(client.open_response(other_seq, "POST", "/v1/updates", &mut reply).is_err());
    }
}
