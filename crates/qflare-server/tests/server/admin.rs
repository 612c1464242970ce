//! The admin API: authentication, tokens, devices, the audit trail.

use qflare_server::api::{DeviceView, TokenView};
use qflare_store::Store;

use crate::harness::{Setup, TestServer, error_of, tempdir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_the_admin_token() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let url = server.admin.url("/v1/admin/tokens");

    let none = server.admin.http.get(&url).send().await.unwrap();
    let (status, error) = error_of(none).await;
    assert_eq!((status, error.code.as_str()), (401, "unauthorized"));

    let wrong = server
        .admin
        .http
        .get(&url)
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(wrong).await;
    assert_eq!((status, error.code.as_str()), (401, "unauthorized"));

    let almost = server
        .admin
        .http
        .post(&url)
        .bearer_auth(format!("{}x", crate::harness::ADMIN_TOKEN))
        .json(&serde_json::json!({ "label": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(almost.status(), 401);
    assert!(
        server.state.store.list_tokens().await.unwrap().is_empty(),
        "nothing was created"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_devices_and_audit_through_the_admin_api() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;

    // Bad requests are refused with the stable error shape.
    let (status, error) = error_of(
        server
            .admin_post("/v1/admin/tokens", serde_json::json!({ "label": "" }))
            .await,
    )
    .await;
    assert_eq!((status, error.code.as_str()), (400, "invalid_label"));
    // Labels that read differently from what they hold: a right-to-left
    // override, a zero-width space, a BOM.
    for deceptive in ["invoice\u{202E}fdp.exe", "edge\u{200B}01", "\u{FEFF}lab"] {
        let response = server
            .admin_post(
                "/v1/admin/tokens",
                serde_json::json!({ "label": deceptive }),
            )
            .await;
        let (status, error) = error_of(response).await;
        assert_eq!(
            (status, error.code.as_str()),
            (400, "invalid_label"),
            "{deceptive:?}"
        );
    }
    // An answer carrying a fresh token must not be cached, nor its type guessed.
    let response = server
        .admin_post("/v1/admin/tokens", serde_json::json!({ "label": "café 7" }))
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let (status, error) = error_of(
        server
            .admin_post(
                "/v1/admin/tokens",
                serde_json::json!({ "label": "x", "ttl_secs": 999_999_999 }),
            )
            .await,
    )
    .await;
    assert_eq!((status, error.code.as_str()), (400, "invalid_ttl"));
    let (status, error) = error_of(
        server
            .admin_post(
                "/v1/admin/tokens",
                serde_json::json!({ "label": "x", "surprise": true }),
            )
            .await,
    )
    .await;
    assert_eq!((status, error.code.as_str()), (400, "malformed_request"));

    let identity = server.enrolled(&dir.path().join("device")).await;
    let unused = server.create_token(600).await;

    let tokens: Vec<TokenView> = server
        .admin_get("/v1/admin/tokens")
        .await
        .json()
        .await
        .unwrap();
    // The two above and the one whose answer's headers were checked.
    assert_eq!(tokens.len(), 3);
    let listed = serde_json::to_string(&tokens).unwrap();
    assert!(
        !listed.contains(&unused.token),
        "token values are never listed"
    );
    assert!(
        tokens
            .iter()
            .any(|t| t.status == "used"
                && t.used_by.as_deref() == Some(&identity.device_id.to_hex()))
    );
    assert!(
        tokens
            .iter()
            .any(|t| t.id == unused.id && t.status == "active")
    );

    let devices: Vec<DeviceView> = server
        .admin_get("/v1/admin/devices")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].status, "active");
    let revoked: serde_json::Value = server
        .admin_post(
            &format!("/v1/admin/devices/{}/revoke", identity.device_id),
            serde_json::json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(revoked["revoked"], true);
    let again: serde_json::Value = server
        .admin_post(
            &format!("/v1/admin/devices/{}/revoke", identity.device_id),
            serde_json::json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["revoked"], false);

    let (status, error) = error_of(server.admin_get("/v1/admin/audit?bogus=1").await).await;
    assert_eq!((status, error.code.as_str()), (400, "malformed_request"));
    assert!(
        !error.message.contains("bogus"),
        "the parser's message is not echoed"
    );

    let audit: Vec<serde_json::Value> = server
        .admin_get("/v1/admin/audit?after=0&limit=100")
        .await
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = audit.iter().filter_map(|e| e["kind"].as_str()).collect();
    for kind in [
        "token_created",
        "token_used",
        "device_enrolled",
        "device_revoked",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let text = serde_json::to_string(&audit).unwrap();
    assert!(
        !text.contains(&unused.token),
        "the ledger never holds token values"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_verifies_and_catches_an_edited_entry() {
    let dir = tempdir();
    let state = dir.path().join("state");
    let mut setup = Setup::new(&state);
    setup.config.audit.checkpoint_every = 4;
    let server = TestServer::start(setup).await;
    for i in 0..3 {
        server
            .enrolled(&dir.path().join(format!("device-{i}")))
            .await;
    }
    let key = server.state.identity.signing_key.verifying_key().clone();
    let store = server.state.store.clone();
    let report = qflare_server::ledger::verify(store.as_ref(), std::slice::from_ref(&key))
        .await
        .unwrap();
    assert_eq!(report.first_bad, None);
    assert!(report.entries >= 9, "{report:?}");
    assert!(report.checkpoints >= 2, "{report:?}");
    server.stop().await;

    // Someone with write access to the database rewrites one event.
    let url = format!("sqlite://{}", state.join("qflare.db").display());
    let raw = qflare_store::SqliteStore::open(&url).await.unwrap();
    raw.execute_raw("UPDATE audit_log SET actor = 'admin' WHERE seq = 3")
        .await
        .unwrap();
    let report = qflare_server::ledger::verify(&raw, std::slice::from_ref(&key))
        .await
        .unwrap();
    let (seq, reason) = report.first_bad.unwrap();
    assert_eq!(seq, 3, "{reason}");
    assert!(reason.contains("edited"), "{reason}");

    // Rewriting the whole chain after it is caught by the signed checkpoint.
    let fixed = qflare_server::ledger::entry_hash;
    let entries = raw.audit_entries(0, 100).await.unwrap();
    let mut prev = qflare_server::ledger::GENESIS_HASH.to_owned();
    for entry in &entries {
        let draft = qflare_store::AuditDraft {
            at: entry.at,
            kind: entry.kind.clone(),
            actor: entry.actor.clone(),
            subject: entry.subject.clone(),
            detail_json: entry.detail_json.clone(),
        };
        let hash = fixed(entry.seq, &prev, &draft);
        raw.execute_raw(&format!(
            "UPDATE audit_log SET prev_hash = '{prev}', hash = '{hash}' WHERE seq = {}",
            entry.seq
        ))
        .await
        .unwrap();
        prev = hash;
    }
    let report = qflare_server::ledger::verify(&raw, std::slice::from_ref(&key))
        .await
        .unwrap();
    let (seq, reason) = report.first_bad.unwrap();
    assert_eq!(seq, 4, "the first checkpoint after the edit: {reason}");
    assert!(reason.contains("checkpoint"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_need_the_admin_token_and_escape_what_they_show() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let url = server.admin.url("/audit");

    let anonymous = server.admin.http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(
        anonymous.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let wrong = server
        .admin
        .http
        .get(&url)
        .basic_auth("admin", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    // A label with markup ends up in the ledger, and so on the audit page.
    let created = server
        .admin_post(
            "/v1/admin/tokens",
            serde_json::json!({ "label": "<script>alert(1)</script>" }),
        )
        .await;
    assert_eq!(created.status(), 201);
    server.enrolled(&dir.path().join("device")).await;

    for path in ["/", "/devices", "/audit"] {
        let page = server
            .admin
            .http
            .get(server.admin.url(path))
            .basic_auth("admin", Some(crate::harness::ADMIN_TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200, "{path}");
        let csp = page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        let html = page.text().await.unwrap();
        // maud writes the doctype in capitals; HTML reads it case-insensitively.
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(
            !html.contains("<script>"),
            "{path} must escape user-controlled text"
        );
        if path == "/audit" {
            assert!(html.contains("&lt;script&gt;"));
            assert!(html.contains("Chain intact"));
            assert!(html.contains("device_enrolled"));
        }
    }
    let css = server
        .admin
        .http
        .get(server.admin.url("/static/qflare.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_render_markup_from_admins_and_the_store_as_text() {
    const HOSTILE: &str = "<script>alert(1)</script>";
    const ESCAPED: &str = "&lt;script&gt;alert(1)&lt;/script&gt;";
    let dir = tempdir();
    // The test keeps a handle on the server's database to write what the API
    // would refuse (device names are `[A-Za-z0-9._-]`), as a compromised
    // database or a future code path could.
    let raw = qflare_store::SqliteStore::open(&format!(
        "sqlite://{}",
        dir.path().join("qflare.db").display()
    ))
    .await
    .unwrap();
    let mut setup = Setup::new(&dir.path().join("state"));
    setup.store = Some(std::sync::Arc::new(raw.clone()));
    let server = TestServer::start(setup).await;

    // An admin's token label lands in the audit ledger's details.
    let created = server
        .admin_post("/v1/admin/tokens", serde_json::json!({ "label": HOSTILE }))
        .await;
    assert_eq!(created.status(), 201);
    server.enrolled(&dir.path().join("device")).await;
    let renamed = raw
        .execute_raw(&format!("UPDATE devices SET name = '{HOSTILE}'"))
        .await
        .unwrap();
    assert_eq!(renamed, 1);

    let page = |path: &'static str| {
        let request = server
            .admin
            .http
            .get(server.admin.url(path))
            .basic_auth("admin", Some(crate::harness::ADMIN_TOKEN));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            response.text().await.unwrap()
        }
    };
    let devices = page("/devices").await;
    assert!(
        devices.contains(&format!("<td>{ESCAPED}</td>")),
        "the device name is text in its cell: {devices}"
    );
    let audit = page("/audit").await;
    assert!(
        audit.contains(&format!("&quot;label&quot;:&quot;{ESCAPED}&quot;")),
        "the label is text inside the escaped detail JSON: {audit}"
    );
    for html in [&devices, &audit, &page("/").await] {
        assert!(!html.contains("<script"), "{html}");
    }
    server.stop().await;
}
