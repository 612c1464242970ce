//! Server key rotation end to end: `key_rotation::rotate` on the state
//! directory, a restart, an enrolled device that follows the signed
//! hand-over to the new key and certificate at its next start, a device that
//! refuses a server no hand-over leads to, and an audit ledger that verifies
//! across the change of keys.

use qflare_edge::Identity;
use qflare_protocol::crypto::sha256;
use qflare_server::Clock;

use crate::harness::{Setup, TestServer, tempdir};

/// Points the device at `server` (a restarted server listens on a new port).
fn move_to(identity_dir: &std::path::Path, server: &TestServer) -> Identity {
    let mut identity = Identity::load(identity_dir).unwrap();
    identity.server_url = server.url.clone();
    identity.replace(identity_dir).unwrap();
    identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_follow_a_rotated_server_key_and_the_ledger_still_verifies() {
    let dir = tempdir();
    let state = dir.path().join("state");
    let device_dir = dir.path().join("device");
    let before = TestServer::start(Setup::new(&state)).await;
    let enrolled = before.enrolled(&device_dir).await;
    let old_key = enrolled.server_key.clone();
    let old_fingerprint = before.fingerprint;
    let old_history = before.state.identity.key_history.clone();
    assert_eq!(old_history.len(), 1);
    before.stop().await;

    let config = Setup::new(&state).config;
    let now = qflare_server::SystemClock.now();
    let summary = qflare_server::key_rotation::rotate(&config, None, now).unwrap();
    assert_eq!(summary.chain_length, 1);
    assert!(summary.old_fingerprint.matches(&old_fingerprint));

    let after = TestServer::start(Setup::new(&state)).await;
    assert!(after.fingerprint.matches(&summary.new_fingerprint));
    assert_ne!(after.state.identity.signing_key.verifying_key(), &old_key);
    assert_eq!(after.state.identity.key_handovers.len(), 1);

    // With the old pins the device cannot even connect.
    let stale = move_to(&device_dir, &after);
    let transport = qflare_edge::transport_for(&stale).unwrap();
    assert!(qflare_edge::open_session(&stale, &transport).await.is_err());

    // At its next start it follows the hand-over and works again.
    let followed = qflare_edge::load_identity(&device_dir).await.unwrap();
    assert_eq!(
        &followed.server_key,
        after.state.identity.signing_key.verifying_key()
    );
    assert_eq!(
        followed.server_certificate_sha256,
        sha256(after.state.identity.certificate_chain[0].as_ref())
    );
    assert!(
        followed
            .server_fingerprint
            .matches(&summary.new_fingerprint)
    );
    let transport = qflare_edge::transport_for(&followed).unwrap();
    let mut session = qflare_edge::open_session(&followed, &transport)
        .await
        .unwrap();
    session.ping().await.unwrap();
    // The new pin is on disk: another start has nothing to follow.
    let reloaded = Identity::load(&device_dir).unwrap();
    assert_eq!(reloaded.server_key, followed.server_key);

    // The ledger names the rotation once, and checkpoints signed by either
    // key verify under the history the hand-over links.
    let history = after.state.identity.key_history.clone();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0], old_key);
    let store = after.state.store.clone();
    let rotations = |entries: &[qflare_store::AuditEntry]| {
        entries
            .iter()
            .filter(|e| e.kind == "server_key_rotated")
            .count()
    };
    let entries = store.audit_entries(0, 10_000).await.unwrap();
    assert_eq!(rotations(&entries), 1);
    let report = qflare_server::ledger::verify(store.as_ref(), &history)
        .await
        .unwrap();
    assert_eq!(report.first_bad, None, "{report:?}");
    assert!(report.checkpoints >= 1);
    // Under the new key alone the old checkpoints would not verify.
    let only_new = qflare_server::ledger::verify(store.as_ref(), &history[1..])
        .await
        .unwrap();
    let signed_by_old = store
        .checkpoints()
        .await
        .unwrap()
        .iter()
        .any(|c| c.signer_key == old_key.as_bytes());
    assert_eq!(only_new.first_bad.is_some(), signed_by_old);
    after.stop().await;

    // A restart records nothing new.
    let again = TestServer::start(Setup::new(&state)).await;
    let entries = again.state.store.audit_entries(0, 10_000).await.unwrap();
    assert_eq!(rotations(&entries), 1);
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_refuses_a_server_that_no_hand_over_leads_to() {
    let dir = tempdir();
    let device_dir = dir.path().join("device");
    let genuine = TestServer::start(Setup::new(&dir.path().join("genuine"))).await;
    let enrolled = genuine.enrolled(&device_dir).await;
    genuine.stop().await;

    // Another server at the device's address, with a rotation of its own:
    // its chain starts at its own first key, not at the one the device pins.
    let impostor_state = dir.path().join("impostor");
    let first = TestServer::start(Setup::new(&impostor_state)).await;
    first.stop().await;
    let config = Setup::new(&impostor_state).config;
    qflare_server::key_rotation::rotate(&config, None, qflare_server::SystemClock.now()).unwrap();
    let impostor = TestServer::start(Setup::new(&impostor_state)).await;
    move_to(&device_dir, &impostor);
    let err = qflare_edge::load_identity(&device_dir).await.unwrap_err();
    assert!(err.to_string().contains("hand-over"), "{err}");
    // The pin is untouched.
    let kept = Identity::load(&device_dir).unwrap();
    assert_eq!(kept.server_key, enrolled.server_key);
    assert_eq!(
        kept.server_certificate_sha256,
        enrolled.server_certificate_sha256
    );
    impostor.stop().await;
}
