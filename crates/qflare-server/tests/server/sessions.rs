//! Sessions: unknown and revoked devices, replayed handshake messages, and
//! sealed requests replayed, reordered or tampered with.

use qflare_edge::Identity;
use qflare_protocol::channel::ClientChannel;
use qflare_protocol::handshake::{
    ClientConfirm, ClientHello, ClientIdentity, ClientStart, ServerHello,
};
use qflare_protocol::identity::{DeviceId, DeviceKeys};
use qflare_protocol::{KemSuite, SignatureSuite};

use qflare_server::Clock;

use crate::harness::{Setup, TestServer, error_of, reqwest_from, tempdir};

const JSON: (&str, &str) = ("content-type", "application/json");

fn json_header() -> Vec<(&'static str, String)> {
    vec![(JSON.0, JSON.1.to_owned())]
}

fn client_identity(identity: &Identity) -> ClientIdentity<'_> {
    ClientIdentity {
        device_id: identity.device_id,
        kem_public_key: &identity.keys.kem.public,
        kem_secret_key: &identity.keys.kem.secret,
        signing_key: &identity.keys.signing,
    }
}

/// The handshake by hand, keeping every message for replay.
async fn handshake(
    server: &TestServer,
    identity: &Identity,
) -> (ClientHello, ClientConfirm, ClientChannel) {
    let (await_hello, hello) = ClientStart::new(client_identity(identity), &identity.server_key)
        .hello(&mut rand::rng())
        .unwrap();
    let response = server
        .post_raw(
            "/v1/sessions",
            serde_json::to_vec(&hello).unwrap(),
            &json_header(),
        )
        .await;
    assert_eq!(response.status(), 201);
    let server_hello: ServerHello = response.json().await.unwrap();
    let (established, confirm) = await_hello
        .finish(&server_hello, server.clock.now())
        .unwrap();
    let path = format!("/v1/sessions/{}/confirm", established.session_id);
    let response = server
        .post_raw(&path, serde_json::to_vec(&confirm).unwrap(), &json_header())
        .await;
    assert_eq!(response.status(), 200);
    (hello, confirm, established.into_client_channel().unwrap())
}

async fn send_sealed(
    server: &TestServer,
    channel: &ClientChannel,
    path: &str,
    record: Vec<u8>,
) -> reqwest::Response {
    server
        .post_raw(
            path,
            record,
            &[
                ("x-qflare-session", channel.session_id().to_hex()),
                ("content-type", "application/vnd.qflare.sealed".into()),
            ],
        )
        .await
}

/// Seals at the session's start time: the client side never refuses, so
/// every refusal in these tests is the server's.
fn seal(channel: &mut ClientChannel, path: &str) -> (u64, Vec<u8>) {
    let mut body = b"{}".to_vec();
    let now = channel.expires_at() - 3600;
    let seq = channel.seal_request("POST", path, &mut body, now).unwrap();
    (seq, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_revoked_devices_get_no_session() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;

    // A device that never enrolled.
    let keys = DeviceKeys::generate(
        KemSuite::MlKem768,
        SignatureSuite::MlDsa65,
        &mut rand::rng(),
    )
    .unwrap();
    let stranger = ClientIdentity {
        device_id: DeviceId::random(&mut rand::rng()),
        kem_public_key: &keys.kem.public,
        kem_secret_key: &keys.kem.secret,
        signing_key: &keys.signing,
    };
    let pinned = server.state.identity.signing_key.verifying_key().clone();
    let (_, hello) = ClientStart::new(stranger, &pinned)
        .hello(&mut rand::rng())
        .unwrap();
    let response = server
        .post_raw(
            "/v1/sessions",
            serde_json::to_vec(&hello).unwrap(),
            &json_header(),
        )
        .await;
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error.code.as_str()),
        (401, "authentication_failed")
    );

    // An enrolled device with a live session, then revoked.
    let identity = server.enrolled(&dir.path().join("device")).await;
    let (_, _, mut channel) = handshake(&server, &identity).await;
    let (_, record) = seal(&mut channel, "/v1/session/ping");
    assert_eq!(
        send_sealed(&server, &channel, "/v1/session/ping", record)
            .await
            .status(),
        200
    );

    let answer = server
        .admin_post(
            &format!("/v1/admin/devices/{}/revoke", identity.device_id),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(answer.status(), 200);
    // Its existing session is dead...
    let (_, record) = seal(&mut channel, "/v1/session/ping");
    let (status, _) =
        error_of(send_sealed(&server, &channel, "/v1/session/ping", record).await).await;
    assert!(status == 401 || status == 403, "{status}");
    // A large upload refused before its body is read still gets the answer,
    // not a connection reset halfway through writing it.
    for _ in 0..5 {
        let mut body = vec![0u8; 3 * 1024 * 1024];
        let now = channel.expires_at() - 3600;
        channel
            .seal_request("POST", "/v1/updates", &mut body, now)
            .unwrap();
        let (status, error) =
            error_of(send_sealed(&server, &channel, "/v1/updates", body).await).await;
        assert!(
            matches!(
                (status, error.code.as_str()),
                (401, "authentication_failed") | (403, "device_revoked")
            ),
            "{status} {}",
            error.code
        );
    }
    // ...and it cannot open another.
    let transport = qflare_edge::transport_for(&identity).unwrap();
    let err = qflare_edge::open_session(&identity, &transport)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("device_revoked"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_hello_and_confirm_are_refused() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let identity = server.enrolled(&dir.path().join("device")).await;
    let (hello, confirm, _) = handshake(&server, &identity).await;

    let response = server
        .post_raw(
            "/v1/sessions",
            serde_json::to_vec(&hello).unwrap(),
            &json_header(),
        )
        .await;
    let (status, error) = error_of(response).await;
    assert_eq!((status, error.code.as_str()), (409, "replayed"));

    let path = format!("/v1/sessions/{}/confirm", confirm.session_id);
    let response = server
        .post_raw(&path, serde_json::to_vec(&confirm).unwrap(), &json_header())
        .await;
    let (status, error) = error_of(response).await;
    assert_eq!((status, error.code.as_str()), (409, "replayed"));

    // A confirmation after the handshake timeout is refused.
    let (await_hello, hello) = ClientStart::new(client_identity(&identity), &identity.server_key)
        .hello(&mut rand::rng())
        .unwrap();
    let response = server
        .post_raw(
            "/v1/sessions",
            serde_json::to_vec(&hello).unwrap(),
            &json_header(),
        )
        .await;
    let server_hello: ServerHello = response.json().await.unwrap();
    let (_, late) = await_hello
        .finish(&server_hello, server.clock.now())
        .unwrap();
    server.clock.advance(120);
    let path = format!("/v1/sessions/{}/confirm", late.session_id);
    let response = server
        .post_raw(&path, serde_json::to_vec(&late).unwrap(), &json_header())
        .await;
    let (status, error) = error_of(response).await;
    assert_eq!((status, error.code.as_str()), (401, "expired"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_requests_replayed_reordered_or_tampered_are_refused() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let identity = server.enrolled(&dir.path().join("device")).await;
    let (_, _, mut channel) = handshake(&server, &identity).await;
    let path = "/v1/session/ping";

    // In order, then the same record again.
    let (seq, record) = seal(&mut channel, path);
    let response = send_sealed(&server, &channel, path, record.clone()).await;
    assert_eq!(response.status(), 200);
    let mut answer = response.bytes().await.unwrap().to_vec();
    channel
        .open_response(seq, "POST", path, &mut answer)
        .unwrap();
    let pong: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(pong["seq"], seq);
    let (status, error) = error_of(send_sealed(&server, &channel, path, record).await).await;
    assert_eq!((status, error.code.as_str()), (409, "replayed"));

    // Reordered: the later record arrives first; the earlier one is then refused.
    let (_, earlier) = seal(&mut channel, path);
    let (_, later) = seal(&mut channel, path);
    assert_eq!(
        send_sealed(&server, &channel, path, later).await.status(),
        200
    );
    let (status, error) = error_of(send_sealed(&server, &channel, path, earlier).await).await;
    assert_eq!((status, error.code.as_str()), (409, "replayed"));

    // Tampered ciphertext.
    let (_, mut tampered) = seal(&mut channel, path);
    tampered[0] ^= 0x80;
    let (status, error) = error_of(send_sealed(&server, &channel, path, tampered).await).await;
    assert_eq!(
        (status, error.code.as_str()),
        (401, "authentication_failed")
    );

    // A record sealed for another route.
    let (_, other_route) = seal(&mut channel, "/v1/devices/self/rotate-keys");
    let (status, _) = error_of(send_sealed(&server, &channel, path, other_route).await).await;
    assert_eq!(status, 401);

    // An unknown session id.
    let (_, record) = seal(&mut channel, path);
    let response = server
        .post_raw(path, record, &[("x-qflare-session", "00".repeat(16))])
        .await;
    let (status, _) = error_of(response).await;
    assert_eq!(status, 401);

    // The session expires with the clock.
    server
        .clock
        .advance(server.state.config.sessions.lifetime_secs + 1);
    // Sealed at the test's fixed time, so only the server's clock has moved.
    let (_, record) = seal(&mut channel, path);
    let (status, error) = error_of(send_sealed(&server, &channel, path, record).await).await;
    assert_eq!((status, error.code.as_str()), (401, "expired"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_replaces_the_keys_and_ends_sessions() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let device_dir = dir.path().join("device");
    let mut identity = server.enrolled(&device_dir).await;
    let old_keys_file = std::fs::read(Identity::path(&device_dir)).unwrap();
    let transport = qflare_edge::transport_for(&identity).unwrap();
    let mut session = qflare_edge::open_session(&identity, &transport)
        .await
        .unwrap();
    let version = qflare_edge::rotate_keys(&mut identity, &mut session, &device_dir)
        .await
        .unwrap();
    assert_eq!(version, 2);

    // The old session is closed; the new keys open a new one.
    assert!(session.ping().await.is_err());
    let reloaded = Identity::load(&device_dir).unwrap();
    assert_eq!(reloaded.key_version, 2);
    let mut fresh = qflare_edge::open_session(&reloaded, &transport)
        .await
        .unwrap();
    fresh.ping().await.unwrap();

    // The old keys no longer work.
    std::fs::write(Identity::path(&device_dir), old_keys_file).unwrap();
    let old = Identity::load(&device_dir).unwrap();
    assert!(qflare_edge::open_session(&old, &transport).await.is_err());
    let stored = server
        .state
        .store
        .get_device(&identity.device_id.to_hex())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.key_version, 2);
    let rotated = server.state.store.audit_entries(0, 100).await.unwrap();
    assert!(rotated.iter().any(|e| e.kind == "key_rotated"));
    server.stop().await;
}

/// Device ids are public (dashboard, ledger) and a hello is unauthenticated:
/// hellos naming a device from a stranger's address must not spend the
/// budget the device itself needs to open a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_naming_a_device_cannot_spend_its_handshake_budget() {
    let dir = tempdir();
    let mut setup = Setup::new(&dir.path().join("state"));
    setup.config.rate_limits.device = qflare_server::ratelimit::RateLimit {
        per_minute: 1,
        burst: 3,
    };
    let server = TestServer::start(setup).await;
    let identity = server.enrolled(&dir.path().join("device")).await;

    let stranger_keys = DeviceKeys::generate(
        KemSuite::MlKem768,
        SignatureSuite::MlDsa65,
        &mut rand::rng(),
    )
    .unwrap();
    let stranger = reqwest_from("127.0.0.2", false);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let impostor = ClientIdentity {
            device_id: identity.device_id,
            kem_public_key: &stranger_keys.kem.public,
            kem_secret_key: &stranger_keys.kem.secret,
            signing_key: &stranger_keys.signing,
        };
        let (_, hello) = ClientStart::new(impostor, &identity.server_key)
            .hello(&mut rand::rng())
            .unwrap();
        let response = stranger
            .post(format!("{}/v1/sessions", server.url))
            .header(JSON.0, JSON.1)
            .body(serde_json::to_vec(&hello).unwrap())
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    // The stranger exhausts its own budget for this device...
    assert_eq!(statuses, [201, 201, 201, 429, 429, 429]);
    // ...and the device, from its own address, still opens a session.
    let (_, _, mut channel) = handshake(&server, &identity).await;
    // The permanent ledger names the live session only by a hash.
    let live = channel.session_id().to_hex();
    let entries = server.state.store.audit_entries(0, 1000).await.unwrap();
    let opened: Vec<_> = entries
        .iter()
        .filter(|e| e.kind == "session_opened")
        .collect();
    assert_eq!(opened.len(), 1);
    assert!(
        opened[0].subject.starts_with("sha256:"),
        "{}",
        opened[0].subject
    );
    assert!(
        entries
            .iter()
            .all(|e| !e.subject.contains(&live) && !e.detail_json.contains(&live)),
        "a live session id is in the ledger"
    );
    let (_, record) = seal(&mut channel, "/v1/session/ping");
    assert_eq!(
        send_sealed(&server, &channel, "/v1/session/ping", record)
            .await
            .status(),
        200
    );
}

/// A confirmation that does not verify must not spend the device's budget
/// either: only a proven device pays for its own handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_confirmations_do_not_spend_the_device_budget() {
    let dir = tempdir();
    let mut setup = Setup::new(&dir.path().join("state"));
    setup.config.rate_limits.device = qflare_server::ratelimit::RateLimit {
        per_minute: 1,
        burst: 3,
    };
    let server = TestServer::start(setup).await;
    let identity = server.enrolled(&dir.path().join("device")).await;
    let stranger = reqwest_from("127.0.0.3", false);
    let stranger_keys = DeviceKeys::generate(
        KemSuite::MlKem768,
        SignatureSuite::MlDsa65,
        &mut rand::rng(),
    )
    .unwrap();
    for _ in 0..3 {
        let impostor = ClientIdentity {
            device_id: identity.device_id,
            kem_public_key: &stranger_keys.kem.public,
            kem_secret_key: &stranger_keys.kem.secret,
            signing_key: &stranger_keys.signing,
        };
        let (_, hello) = ClientStart::new(impostor, &identity.server_key)
            .hello(&mut rand::rng())
            .unwrap();
        let response = stranger
            .post(format!("{}/v1/sessions", server.url))
            .header(JSON.0, JSON.1)
            .body(serde_json::to_vec(&hello).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let server_hello: ServerHello = response.json().await.unwrap();
        let session_id = server_hello.session_id;
        // The stranger cannot verify the server's hello (it binds the
        // device's registered keys) nor sign for the device: it answers
        // with a confirmation of the right shape and nothing behind it.
        let confirm = ClientConfirm {
            version: server_hello.version,
            session_id,
            signature: vec![0x42; 3309],
            key_confirmation: [0x24; 32],
        };
        let response = stranger
            .post(format!("{}/v1/sessions/{session_id}/confirm", server.url))
            .header(JSON.0, JSON.1)
            .body(serde_json::to_vec(&confirm).unwrap())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!(status == 401 || status == 400, "{status}");
    }
    let (_, _, _channel) = handshake(&server, &identity).await;
}

/// A rotation whose answer is lost leaves the device with both key sets on
/// disk; the next start finds out which the server holds, either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_rotation_answer_is_settled_at_the_next_start() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let device_dir = dir.path().join("device");
    let mut identity = server.enrolled(&device_dir).await;
    let transport = qflare_edge::transport_for(&identity).unwrap();

    // 1. The device recorded new keys but the request never left: the
    //    server still holds the old keys, which stay.
    identity.pending_keys = Some(
        DeviceKeys::generate(
            KemSuite::MlKem768,
            SignatureSuite::MlDsa65,
            &mut rand::rng(),
        )
        .unwrap(),
    );
    identity.replace(&device_dir).unwrap();
    let settled = qflare_edge::load_identity(&device_dir).await.unwrap();
    assert_eq!(settled.key_version, 1);
    assert!(settled.pending_keys.is_none());
    assert!(Identity::load(&device_dir).unwrap().pending_keys.is_none());

    // 2. The request reached the server, which rotated, but the answer was
    //    lost: the pending keys are the server's now.
    let mut identity = settled;
    let new_keys = DeviceKeys::generate(
        KemSuite::MlKem768,
        SignatureSuite::MlDsa65,
        &mut rand::rng(),
    )
    .unwrap();
    let request = qflare_protocol::rotation::build_request(
        identity.device_id,
        &identity.keys.signing,
        &new_keys,
        server.clock.now(),
    )
    .unwrap();
    let new_kem = new_keys.kem.public.as_bytes().to_vec();
    identity.pending_keys = Some(new_keys);
    identity.replace(&device_dir).unwrap();
    let mut session = qflare_edge::open_session(&identity, &transport)
        .await
        .unwrap();
    let _lost: serde_json::Value = session
        .call("/v1/devices/self/rotate-keys", &request, 4096)
        .await
        .unwrap();
    let settled = qflare_edge::load_identity(&device_dir).await.unwrap();
    assert_eq!(settled.key_version, 2);
    assert_eq!(settled.keys.kem.public.as_bytes(), new_kem.as_slice());
    let reloaded = Identity::load(&device_dir).unwrap();
    assert!(reloaded.pending_keys.is_none());
    assert_eq!(reloaded.key_version, 2);
    let mut fresh = qflare_edge::open_session(&reloaded, &transport)
        .await
        .unwrap();
    fresh.ping().await.unwrap();
    // The session the rotation came in on was closed with the old keys.
    assert!(session.ping().await.is_err());
    server.stop().await;
}
