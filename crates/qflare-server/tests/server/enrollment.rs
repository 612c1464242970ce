//! Enrollment: every suite, and every way a token or a proof can be bad.

use qflare_protocol::enrollment;
use qflare_protocol::identity::{DeviceKeys, EnrollmentToken};
use qflare_protocol::{KemSuite, SignatureSuite};

use crate::harness::{Setup, TestServer, error_of, postgres_store, random_schema, tempdir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_then_session_for_every_kem_suite() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    for suite in KemSuite::ALL {
        let token = server.create_token(600).await;
        let device_dir = dir.path().join(suite.as_str());
        let identity = server
            .enroll(&device_dir, &token.token, suite)
            .await
            .unwrap();
        assert_eq!(identity.keys.kem.public.suite(), suite);
        let stored = server
            .state
            .store
            .get_device(&identity.device_id.to_hex())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.keys.kem_suite, suite.as_str());
        assert_eq!(
            stored.keys.kem_public_key,
            identity.keys.kem.public.as_bytes()
        );

        // The identity on disk is owner-only and loads back.
        let reloaded = qflare_edge::Identity::load(&device_dir).unwrap();
        let transport = qflare_edge::transport_for(&reloaded).unwrap();
        let mut session = qflare_edge::open_session(&reloaded, &transport)
            .await
            .unwrap();
        let pong = session.ping().await.unwrap();
        assert_eq!(pong["device_id"], identity.device_id.to_hex());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_expired_revoked_and_guessed_tokens_are_refused() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;

    let token = server.create_token(600).await;
    server
        .enroll(&dir.path().join("first"), &token.token, KemSuite::MlKem768)
        .await
        .unwrap();
    let reused = server
        .enroll(&dir.path().join("second"), &token.token, KemSuite::MlKem768)
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Some("invalid_token"), "{reused}");

    let expiring = server.create_token(60).await;
    server.clock.advance(61);
    let expired = server
        .enroll(
            &dir.path().join("third"),
            &expiring.token,
            KemSuite::MlKem768,
        )
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Some("invalid_token"));

    let revoked = server.create_token(600).await;
    let answer = server
        .admin_post(
            &format!("/v1/admin/tokens/{}/revoke", revoked.id),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(answer.status(), 200);
    let refused = server
        .enroll(
            &dir.path().join("fourth"),
            &revoked.token,
            KemSuite::MlKem768,
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("invalid_token"));

    let guessed = EnrollmentToken::generate(&mut rand::rng()).reveal();
    let refused = server
        .enroll(&dir.path().join("fifth"), &guessed, KemSuite::MlKem768)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("invalid_token"));

    // A refused enrollment leaves no identity behind and no device stored.
    assert!(!dir.path().join("second/identity.json").exists());
    assert_eq!(server.state.store.list_devices().await.unwrap().len(), 1);
    // Each refusal is in the ledger with its real reason.
    let entries = server.state.store.audit_entries(0, 100).await.unwrap();
    let reasons: Vec<String> = entries
        .iter()
        .filter(|e| e.kind == "enrollment_refused")
        .map(|e| e.detail_json.clone())
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    for reason in ["already used", "expired", "revoked", "unknown"] {
        assert!(
            reasons.iter().any(|r| r.contains(reason)),
            "{reason} missing in {reasons:?}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_signed_by_another_key_is_refused_and_keeps_the_token() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let token = server.create_token(600).await;
    let parsed = EnrollmentToken::parse(&token.token).unwrap();
    let mut rng = rand::rng();
    let victim =
        DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng).unwrap();
    let thief =
        DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng).unwrap();
    let mut request =
        enrollment::build_request(&parsed, "victim", &victim, &server.fingerprint).unwrap();
    request.proof = enrollment::build_request(&parsed, "victim", &thief, &server.fingerprint)
        .unwrap()
        .proof;
    let response = server
        .post_raw(
            "/v1/enroll",
            serde_json::to_vec(&request).unwrap(),
            &[("content-type", "application/json".into())],
        )
        .await;
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error.code.as_str()),
        (401, "authentication_failed")
    );
    // The token was not consumed by the forgery: the real device can still use it.
    server
        .enroll(&dir.path().join("real"), &token.token, KemSuite::MlKem768)
        .await
        .unwrap();
}

async fn fifty_concurrent(servers: &[&TestServer]) -> (usize, usize) {
    let token = servers[0].create_token(600).await;
    let dir = tempdir();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let server = servers[i % servers.len()];
        let url = server.url.clone();
        let fingerprint = server.fingerprint;
        let token = token.token.clone();
        let path = dir.path().join(format!("device-{i}"));
        tasks.push(tokio::spawn(async move {
            qflare_edge::enroll(
                qflare_edge::EnrollOptions {
                    server_url: url,
                    token: EnrollmentToken::parse(&token).unwrap(),
                    fingerprint,
                    device_name: format!("racer-{i}"),
                    kem_suite: Some(KemSuite::MlKem768),
                    signature_suite: None,
                    alternate_urls: Vec::new(),
                },
                &path,
            )
            .await
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(err) => {
                assert_eq!(err.code(), Some("invalid_token"), "{err}");
                refused += 1;
            }
        }
    }
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_enrollments_one_token_sqlite() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    assert_eq!(fifty_concurrent(&[&server]).await, (1, 49));
    assert_eq!(server.state.store.list_devices().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_enrollments_one_token_postgres() {
    let schema = random_schema("srv_enroll");
    let Some(store) = postgres_store(&schema).await else {
        eprintln!("skipped: QFLARE_TEST_POSTGRES_URL not set");
        return;
    };
    let dir = tempdir();
    let mut setup = Setup::new(&dir.path().join("state"));
    setup.store = Some(store.clone());
    let server = TestServer::start(setup).await;
    let outcome = fifty_concurrent(&[&server]).await;
    let devices = store.list_devices().await.unwrap().len();
    server.stop().await;
    drop_schema(&schema).await;
    assert_eq!(outcome, (1, 49));
    assert_eq!(devices, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_enrollments_two_servers_one_postgres() {
    let schema = random_schema("srv_replicas");
    let (Some(store_a), Some(store_b)) =
        (postgres_store(&schema).await, postgres_store(&schema).await)
    else {
        eprintln!("skipped: QFLARE_TEST_POSTGRES_URL not set");
        return;
    };
    // Two replicas share one identity (state directory) and one database,
    // through two independent connection pools.
    let dir = tempdir();
    let state = dir.path().join("state");
    let mut a = Setup::new(&state);
    a.store = Some(store_a);
    let mut b = Setup::new(&state);
    b.store = Some(store_b.clone());
    let first = TestServer::start(a).await;
    let second = TestServer::start(b).await;
    assert!(first.fingerprint.matches(&second.fingerprint));
    let outcome = fifty_concurrent(&[&first, &second]).await;
    let devices = store_b.list_devices().await.unwrap().len();
    first.stop().await;
    second.stop().await;
    drop_schema(&schema).await;
    assert_eq!(outcome, (1, 49));
    assert_eq!(devices, 1);
}

pub async fn drop_schema(schema: &str) {
    if let Ok(url) = std::env::var("QFLARE_TEST_POSTGRES_URL") {
        qflare_store::drop_postgres_schema(&url, schema)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_keeps_its_devices() {
    let dir = tempdir();
    let state = dir.path().join("state");
    let first = TestServer::start(Setup::new(&state)).await;
    let identity = first.enrolled(&dir.path().join("device")).await;
    let fingerprint = first.fingerprint;
    first.stop().await;

    // Same state directory and SQLite file, new process state.
    let second = TestServer::start(Setup::new(&state)).await;
    assert!(
        second.fingerprint.matches(&fingerprint),
        "the identity survives a restart"
    );
    // The device's pinned address changed (new port); its pins did not.
    let mut reloaded = qflare_edge::Identity::load(&dir.path().join("device")).unwrap();
    reloaded.server_url = second.url.clone();
    let transport = qflare_edge::transport_for(&reloaded).unwrap();
    let mut session = qflare_edge::open_session(&reloaded, &transport)
        .await
        .unwrap();
    assert_eq!(
        session.ping().await.unwrap()["device_id"],
        identity.device_id.to_hex()
    );
    second.stop().await;
}
