//! One behavioural test suite for every [`Store`] implementation.
//!
//! Each check takes a freshly opened, empty store and asserts real outcomes, panicking on a
//! violated expectation and returning `Err` only when a store call fails unexpectedly. They are
//! public so that `tests/conformance.rs` can run them against both backends and other crates (the
//! server's tests) can run them against whatever store they build. Checks that need to reopen a
//! store or to bypass the API take a closure for that.

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use tokio::task::JoinSet;

use crate::{
    AuditDraft, AuditEntry, CheckpointRecord, DeviceKeys, DeviceRecord, GENESIS_HASH, ModelRecord,
    ModelSummary, NewDevice, RoundRecord, RoundState, SessionRecord, SessionState, Store,
    StoreError, SubmissionOutcome, TokenRecord, TokenRejection, VerdictRecord,
};

/// A deterministic stand-in for the server's SHA-256 link function: the checks only need the
/// chain to depend on `(seq, prev_hash, draft)`, not cryptographic strength.
pub fn test_link(seq: u64, prev_hash: &str, draft: &AuditDraft) -> String {
    let mut hasher = DefaultHasher::new();
    (seq, prev_hash, &draft.kind, &draft.actor, &draft.subject).hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

fn keys(tag: u8) -> DeviceKeys {
    DeviceKeys {
        kem_suite: "ML-KEM-768".to_owned(),
        kem_public_key: vec![tag; 1184],
        signature_suite: "ML-DSA-65".to_owned(),
        verifying_key: vec![tag.wrapping_add(1); 1952],
    }
}

fn new_device(id: &str) -> NewDevice {
    NewDevice {
        id: id.to_owned(),
        name: format!("name of {id}"),
        keys: keys(id.len() as u8),
    }
}

fn token(id: &str, hash: &str, created_at: i64, expires_at: i64) -> TokenRecord {
    TokenRecord {
        id: id.to_owned(),
        hash: hash.to_owned(),
        label: format!("label of {id}"),
        created_at,
        expires_at,
        used_at: None,
        used_by: None,
        revoked_at: None,
    }
}

/// Enrolls `id` through a token of its own.
async fn enroll(store: &Arc<dyn Store>, id: &str, now: i64) -> Result<DeviceRecord, StoreError> {
    let hash = format!("hash-for-{id}");
    store
        .create_token(&token(&format!("token-for-{id}"), &hash, now, now + 3600))
        .await?;
    store.enroll_with_token(&hash, now, &new_device(id)).await
}

fn session(id: &str, device_id: &str, nonce: u8, created_at: i64) -> SessionRecord {
    SessionRecord {
        id: id.to_owned(),
        device_id: device_id.to_owned(),
        state: SessionState::Pending,
        client_nonce: vec![nonce; 32],
        sealed_state: vec![0xaa; 48],
        created_at,
        confirm_deadline: created_at + 30,
        expires_at: created_at + 900,
        last_seq: 0,
    }
}

fn round(id: u64, opened_at: i64, deadline: i64) -> RoundRecord {
    RoundRecord {
        id,
        state: RoundState::Open,
        base_model_version: id.saturating_sub(1),
        config_json: format!(r#"{{"round":{id},"local_epochs":1}}"#),
        min_updates: 1,
        target_updates: 2,
        opened_at,
        deadline,
        closed_at: None,
        attempt: 1,
        outcome_json: None,
    }
}

fn model(version: u64, created_at: i64) -> ModelRecord {
    ModelRecord {
        version,
        round_id: version.saturating_sub(1),
        architecture: "mnist-2nn".to_owned(),
        bytes: vec![version as u8; 64],
        certificate_json: format!(r#"{{"version":{version}}}"#),
        created_at,
        accuracy: None,
        loss: None,
    }
}

fn draft(at: i64, actor: &str, subject: &str) -> AuditDraft {
    AuditDraft {
        at,
        kind: "test.event".to_owned(),
        actor: actor.to_owned(),
        subject: subject.to_owned(),
        detail_json: format!(r#"{{"subject":"{subject}"}}"#),
    }
}

fn is_rejection(result: &Result<DeviceRecord, StoreError>, expected: TokenRejection) -> bool {
    matches!(result, Err(StoreError::TokenRejected(reason)) if *reason == expected)
}

/// Token creation, listing, single use and every rejection reason.
pub async fn token_lifecycle(store: Arc<dyn Store>) -> Result<(), StoreError> {
    assert_eq!(TokenRejection::AlreadyUsed.to_string(), "already used");
    let now = 1_000;
    let first = token("t1", "h1", now, now + 3600);
    store.create_token(&first).await?;
    assert!(matches!(
        store
            .create_token(&token("t1", "other", now, now + 1))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .create_token(&token("other", "h1", now, now + 1))
            .await,
        Err(StoreError::Conflict(_))
    ));
    store
        .create_token(&token("t2", "h2", now + 1, now + 3600))
        .await?;
    store
        .create_token(&token("t3", "h3", now + 2, now + 10))
        .await?;
    store
        .create_token(&token("t4", "h4", now + 3, now + 3600))
        .await?;

    let listed = store.list_tokens().await?;
    let ids: Vec<&str> = listed.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["t4", "t3", "t2", "t1"], "newest first");
    assert_eq!(listed[3], first);

    let device = store
        .enroll_with_token("h1", now + 5, &new_device("d1"))
        .await?;
    assert_eq!(device.token_id.as_deref(), Some("t1"));
    assert_eq!((device.key_version, device.enrolled_at), (1, now + 5));
    assert_eq!(device.keys, new_device("d1").keys);
    assert_eq!(store.get_device("d1").await?, Some(device));
    let used = store
        .list_tokens()
        .await?
        .into_iter()
        .find(|t| t.id == "t1");
    let used = used.expect("token t1 is still listed");
    assert_eq!(
        (used.used_at, used.used_by.as_deref()),
        (Some(now + 5), Some("d1"))
    );

    let again = store
        .enroll_with_token("h1", now + 6, &new_device("d2"))
        .await;
    assert!(
        is_rejection(&again, TokenRejection::AlreadyUsed),
        "{again:?}"
    );
    assert_eq!(
        store.get_device("d2").await?,
        None,
        "a refused enrollment adds no device"
    );

    let expired = store
        .enroll_with_token("h3", now + 12, &new_device("d3"))
        .await;
    assert!(
        is_rejection(&expired, TokenRejection::Expired),
        "{expired:?}"
    );
    let at_expiry = store
        .enroll_with_token("h3", now + 10, &new_device("d3"))
        .await;
    assert!(
        is_rejection(&at_expiry, TokenRejection::Expired),
        "expiry instant is exclusive"
    );

    assert!(store.revoke_token("t4", now + 20).await?);
    assert!(
        !store.revoke_token("t4", now + 21).await?,
        "already revoked"
    );
    let revoked = store
        .enroll_with_token("h4", now + 22, &new_device("d4"))
        .await;
    assert!(
        is_rejection(&revoked, TokenRejection::Revoked),
        "{revoked:?}"
    );

    let unknown = store
        .enroll_with_token("nope", now, &new_device("d5"))
        .await;
    assert!(
        is_rejection(&unknown, TokenRejection::Unknown),
        "{unknown:?}"
    );

    assert!(
        !store.revoke_token("t1", now + 30).await?,
        "used tokens cannot be revoked"
    );
    assert!(!store.revoke_token("missing", now + 30).await?);

    // A device-id clash must roll the token consumption back with it.
    let clash = store
        .enroll_with_token("h2", now + 40, &new_device("d1"))
        .await;
    assert!(matches!(clash, Err(StoreError::Conflict(_))), "{clash:?}");
    let t2 = store
        .list_tokens()
        .await?
        .into_iter()
        .find(|t| t.id == "t2");
    assert_eq!(
        t2.and_then(|t| t.used_at),
        None,
        "token consumption rolled back"
    );
    store
        .enroll_with_token("h2", now + 41, &new_device("d6"))
        .await?;
    Ok(())
}

async fn race_enrollment(stores: &[Arc<dyn Store>], per_store: usize) -> Result<(), StoreError> {
    stores[0]
        .create_token(&token("race", "race-hash", 0, i64::MAX))
        .await?;
    let mut tasks = JoinSet::new();
    for i in 0..per_store {
        for (s, store) in stores.iter().enumerate() {
            let store = Arc::clone(store);
            let device = new_device(&format!("racer-{s}-{i}"));
            tasks.spawn(async move { store.enroll_with_token("race-hash", 10, &device).await });
        }
    }
    let (mut enrolled, mut already_used) = (Vec::new(), 0);
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("enrollment task panicked") {
            Ok(device) => enrolled.push(device),
            Err(StoreError::TokenRejected(TokenRejection::AlreadyUsed)) => already_used += 1,
            Err(other) => panic!("unexpected enrollment error under contention: {other}"),
        }
    }
    assert_eq!(enrolled.len(), 1, "exactly one enrollment wins");
    assert_eq!(already_used, per_store * stores.len() - 1);
    for store in stores {
        assert_eq!(
            store.list_devices().await?,
            enrolled,
            "one device, seen by every store"
        );
    }
    Ok(())
}

/// 50 concurrent enrollments with one token: one succeeds, 49 are `AlreadyUsed`.
pub async fn concurrent_enrollment(store: Arc<dyn Store>) -> Result<(), StoreError> {
    race_enrollment(&[store], 50).await
}

/// The same race between two independently opened stores (two pools, as two server replicas
/// would have) over one database, 25 tasks each.
pub async fn concurrent_enrollment_across_stores(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) -> Result<(), StoreError> {
    race_enrollment(&[a, b], 25).await
}

/// Device listing, touching, key rotation and revocation (which closes sessions).
pub async fn devices(store: Arc<dyn Store>) -> Result<(), StoreError> {
    enroll(&store, "dev-b", 200).await?;
    enroll(&store, "dev-a", 100).await?;
    let ids: Vec<String> = store
        .list_devices()
        .await?
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["dev-a", "dev-b"], "enrollment order");
    assert_eq!(store.get_device("nobody").await?, None);

    store.touch_device("dev-a", 150).await?;
    store.touch_device("dev-a", 120).await?;
    let seen = store
        .get_device("dev-a")
        .await?
        .and_then(|d| d.last_seen_at);
    assert_eq!(seen, Some(150), "last_seen_at never moves backwards");
    assert!(matches!(
        store.touch_device("nobody", 1).await,
        Err(StoreError::NotFound(_))
    ));

    assert!(store.rotate_device_keys("dev-a", &keys(9), 300).await?);
    let rotated = store.get_device("dev-a").await?.expect("dev-a exists");
    assert_eq!((rotated.key_version, rotated.keys), (2, keys(9)));
    assert_eq!(rotated.last_seen_at, Some(300));
    assert!(store.rotate_device_keys("dev-a", &keys(10), 301).await?);
    let rotated = store.get_device("dev-a").await?.expect("dev-a exists");
    assert_eq!(rotated.key_version, 3);
    assert!(!store.rotate_device_keys("nobody", &keys(9), 300).await?);

    store
        .insert_pending_session(&session("a-1", "dev-a", 1, 350))
        .await?;
    store
        .insert_pending_session(&session("a-2", "dev-a", 2, 350))
        .await?;
    assert!(store.establish_session("a-2", b"sealed", 351).await?);
    store
        .insert_pending_session(&session("b-1", "dev-b", 1, 350))
        .await?;

    assert!(store.revoke_device("dev-a", 400).await?);
    assert!(!store.revoke_device("dev-a", 401).await?, "already revoked");
    assert!(!store.revoke_device("nobody", 401).await?);
    let revoked = store.get_device("dev-a").await?.expect("dev-a exists");
    assert_eq!(revoked.revoked_at, Some(400));
    for id in ["a-1", "a-2"] {
        let state = store.get_session(id).await?.map(|s| s.state);
        assert_eq!(
            state,
            Some(SessionState::Closed),
            "session {id} closed by revocation"
        );
    }
    let other = store.get_session("b-1").await?.map(|s| s.state);
    assert_eq!(
        other,
        Some(SessionState::Pending),
        "other devices' sessions untouched"
    );
    assert!(
        !store.rotate_device_keys("dev-a", &keys(11), 500).await?,
        "revoked"
    );
    assert_eq!(
        store.get_device("dev-a").await?.map(|d| d.key_version),
        Some(3)
    );
    Ok(())
}

/// Pending sessions, replayed hellos and confirms, deadlines, sequence numbers and clean-up.
pub async fn sessions(store: Arc<dyn Store>) -> Result<(), StoreError> {
    enroll(&store, "dev", 0).await?;
    let s1 = session("s1", "dev", 1, 100);
    store.insert_pending_session(&s1).await?;
    assert_eq!(store.get_session("s1").await?, Some(s1.clone()));
    assert_eq!(store.get_session("nothing").await?, None);
    assert!(matches!(
        store
            .insert_pending_session(&session("s1-replay", "dev", 1, 101))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .insert_pending_session(&session("s1", "dev", 9, 101))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .insert_pending_session(&session("s-x", "nobody", 1, 101))
            .await,
        Err(StoreError::NotFound(_))
    ));

    assert!(
        !store.advance_session_sequence("s1", 1, 105).await?,
        "pending"
    );
    assert!(store.establish_session("s1", &[7; 32], 110).await?);
    assert!(
        !store.establish_session("s1", &[8; 32], 111).await?,
        "replayed confirm"
    );
    let established = store.get_session("s1").await?.expect("s1 exists");
    assert_eq!(established.state, SessionState::Established);
    assert_eq!(established.sealed_state, vec![7; 32]);

    store
        .insert_pending_session(&session("s2", "dev", 2, 100))
        .await?;
    assert!(
        !store.establish_session("s2", &[1], 130).await?,
        "deadline is exclusive"
    );

    assert!(store.advance_session_sequence("s1", 1, 200).await?);
    assert!(
        !store.advance_session_sequence("s1", 1, 200).await?,
        "equal"
    );
    assert!(
        !store.advance_session_sequence("s1", 0, 200).await?,
        "lower"
    );
    assert!(
        store.advance_session_sequence("s1", 5, 200).await?,
        "gaps are fine"
    );
    assert!(
        !store.advance_session_sequence("s1", 3, 200).await?,
        "lower"
    );
    assert_eq!(store.get_session("s1").await?.map(|s| s.last_seq), Some(5));
    assert!(
        !store.advance_session_sequence("s1", 6, 1000).await?,
        "expired"
    );
    assert!(!store.advance_session_sequence("nothing", 6, 200).await?);

    store
        .insert_pending_session(&session("s3", "dev", 3, 100))
        .await?;
    let mut late = session("s4", "dev", 4, 1400);
    late.confirm_deadline = 2000;
    store.insert_pending_session(&late).await?;
    let mut long = session("s5", "dev", 5, 1400);
    long.expires_at = 3000;
    store.insert_pending_session(&long).await?;
    assert!(store.establish_session("s5", b"state", 1401).await?);

    assert_eq!(store.close_device_sessions("dev").await?, 5);
    assert_eq!(store.close_device_sessions("dev").await?, 0);
    assert!(
        !store.advance_session_sequence("s5", 1, 1402).await?,
        "closed"
    );
    assert!(!store.establish_session("s4", b"x", 1402).await?, "closed");

    // s1–s3 expired at 1000; s4 is within its confirmation window, s5 lives until 3000.
    assert_eq!(store.delete_expired_sessions(1500).await?, 3);
    assert_eq!(store.get_session("s1").await?, None);
    assert!(store.get_session("s4").await?.is_some());
    assert!(store.get_session("s5").await?.is_some());
    // s4 (closed, so its confirmation deadline no longer matters) expires at 2300, s5 at 3000.
    assert_eq!(store.delete_expired_sessions(3000).await?, 2);
    Ok(())
}

/// 20 concurrent advances to the same sequence number: exactly one succeeds.
pub async fn concurrent_sequence_advance(store: Arc<dyn Store>) -> Result<(), StoreError> {
    enroll(&store, "dev", 0).await?;
    store
        .insert_pending_session(&session("s", "dev", 1, 100))
        .await?;
    assert!(store.establish_session("s", b"state", 101).await?);
    for seq in [10_u64, 11] {
        let mut tasks = JoinSet::new();
        for _ in 0..20 {
            let store = Arc::clone(&store);
            tasks.spawn(async move { store.advance_session_sequence("s", seq, 200).await });
        }
        let mut winners = 0;
        while let Some(joined) = tasks.join_next().await {
            if joined.expect("advance task panicked")? {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "exactly one advance to {seq} wins");
    }
    assert_eq!(store.get_session("s").await?.map(|s| s.last_seq), Some(11));
    Ok(())
}

/// Round creation, ordering, compare-and-set transitions, verdicts and re-opening.
pub async fn rounds(store: Arc<dyn Store>) -> Result<(), StoreError> {
    for id in ["r1", "r2", "r3"] {
        enroll(&store, id, 0).await?;
    }
    assert_eq!(store.latest_round().await?, None);
    let selected = ["r2".to_owned(), "r1".to_owned()];
    let first = round(1, 10, 1000);
    store.create_round(&first, &selected).await?;
    assert!(matches!(
        store.create_round(&round(1, 11, 1000), &[]).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .create_round(&round(99, 11, 1000), &["r1".to_owned(), "ghost".to_owned()])
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.get_round(99).await?,
        None,
        "failed creation rolled back"
    );
    assert_eq!(store.get_round(1).await?, Some(first.clone()));
    let participants = store.participants(1).await?;
    let ids: Vec<&str> = participants.iter().map(|p| p.device_id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2"]);
    assert!(participants.iter().all(|p| p.round_id == 1
        && p.submitted_at.is_none()
        && p.envelope.is_none()
        && p.verdict.is_none()));

    store
        .create_round(&round(3, 20, 1000), &selected[..1])
        .await?;
    store.create_round(&round(2, 30, 1000), &[]).await?;
    assert_eq!(store.latest_round().await?.map(|r| r.id), Some(3));
    let ids: Vec<u64> = store.list_rounds(10).await?.iter().map(|r| r.id).collect();
    assert_eq!(ids, [3, 2, 1]);
    let ids: Vec<u64> = store.list_rounds(2).await?.iter().map(|r| r.id).collect();
    assert_eq!(ids, [3, 2]);

    let stored = SubmissionOutcome::Stored;
    assert_eq!(
        store.record_submission(1, "r1", b"env-1", 100).await?,
        stored
    );
    assert_eq!(
        store.record_submission(1, "r2", b"env-2", 101).await?,
        stored
    );

    use RoundState::*;
    assert!(
        !store
            .transition_round(1, Aggregating, Completed, 300, None)
            .await?
    );
    assert!(
        store
            .transition_round(1, Open, Aggregating, 300, None)
            .await?
    );
    assert!(
        !store
            .transition_round(1, Open, Aggregating, 301, None)
            .await?,
        "CAS lost"
    );
    assert!(
        !store
            .transition_round(42, Open, Aggregating, 301, None)
            .await?
    );
    let aggregating = store.get_round(1).await?.expect("round 1");
    assert_eq!(
        (aggregating.state, aggregating.closed_at),
        (Aggregating, None)
    );

    let verdicts = [
        VerdictRecord {
            device_id: "r1".to_owned(),
            verdict: "accepted".to_owned(),
            reason: None,
        },
        VerdictRecord {
            device_id: "r2".to_owned(),
            verdict: "rejected".to_owned(),
            reason: Some("norm bound".to_owned()),
        },
    ];
    store.set_verdicts(1, &verdicts).await?;
    let bogus = [
        VerdictRecord {
            device_id: "r1".to_owned(),
            verdict: "rejected".to_owned(),
            reason: None,
        },
        VerdictRecord {
            device_id: "r3".to_owned(),
            verdict: "accepted".to_owned(),
            reason: None,
        },
    ];
    assert!(matches!(
        store.set_verdicts(1, &bogus).await,
        Err(StoreError::NotFound(_))
    ));
    let participants = store.participants(1).await?;
    let seen: Vec<(Option<&str>, Option<&str>)> = participants
        .iter()
        .map(|p| (p.verdict.as_deref(), p.reason.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (Some("accepted"), None),
            (Some("rejected"), Some("norm bound"))
        ]
    );

    let outcome = r#"{"error":"enclave died"}"#;
    assert!(
        store
            .transition_round(1, Aggregating, Failed, 400, Some(outcome))
            .await?
    );
    let failed = store.get_round(1).await?.expect("round 1");
    assert_eq!((failed.state, failed.closed_at), (Failed, Some(400)));
    assert_eq!(failed.outcome_json.as_deref(), Some(outcome));

    assert!(store.reopen_round(1, 2000, 500).await?);
    let reopened = store.get_round(1).await?.expect("round 1");
    assert_eq!(
        reopened,
        RoundRecord {
            state: Open,
            attempt: 2,
            opened_at: 500,
            deadline: 2000,
            closed_at: None,
            outcome_json: None,
            ..first.clone()
        }
    );
    let participants = store.participants(1).await?;
    let envelopes: Vec<Option<&[u8]>> =
        participants.iter().map(|p| p.envelope.as_deref()).collect();
    assert_eq!(
        envelopes,
        [Some(&b"env-1"[..]), Some(&b"env-2"[..])],
        "envelopes kept"
    );
    assert!(
        participants
            .iter()
            .all(|p| p.verdict.is_none() && p.reason.is_none())
    );
    assert_eq!(store.submission_count(1).await?, 2);
    assert!(!store.reopen_round(1, 3000, 600).await?, "already open");
    assert!(!store.reopen_round(42, 3000, 600).await?);

    assert!(
        store
            .transition_round(1, Open, Aggregating, 700, None)
            .await?
    );
    assert!(
        store.reopen_round(1, 3000, 710).await?,
        "a stalled aggregation can be retried"
    );
    assert_eq!(store.get_round(1).await?.map(|r| r.attempt), Some(3));
    assert!(
        store
            .transition_round(1, Open, Aggregating, 720, None)
            .await?
    );
    let done = r#"{"model_version":1}"#;
    assert!(
        store
            .transition_round(1, Aggregating, Completed, 730, Some(done))
            .await?
    );
    let completed = store.get_round(1).await?.expect("round 1");
    assert_eq!(
        (completed.state, completed.closed_at),
        (Completed, Some(730))
    );
    assert!(
        !store.reopen_round(1, 4000, 740).await?,
        "completed rounds stay closed"
    );

    assert!(
        store
            .transition_round(2, Open, Cancelled, 800, None)
            .await?
    );
    let cancelled = store.get_round(2).await?.expect("round 2");
    assert_eq!(
        (cancelled.closed_at, cancelled.outcome_json),
        (Some(800), None)
    );
    Ok(())
}

/// Every [`SubmissionOutcome`] and the submission count.
pub async fn submissions(store: Arc<dyn Store>) -> Result<(), StoreError> {
    for id in ["p1", "p2", "p3"] {
        enroll(&store, id, 0).await?;
    }
    store
        .create_round(&round(1, 10, 1000), &["p1".to_owned(), "p2".to_owned()])
        .await?;
    assert_eq!(store.submission_count(1).await?, 0);
    let submit = |device: &'static str, envelope: &'static [u8], now: i64| {
        let store = Arc::clone(&store);
        async move { store.record_submission(1, device, envelope, now).await }
    };
    assert_eq!(
        submit("p1", b"first", 100).await?,
        SubmissionOutcome::Stored
    );
    assert_eq!(
        submit("p1", b"second", 101).await?,
        SubmissionOutcome::AlreadySubmitted
    );
    assert_eq!(
        submit("p3", b"x", 102).await?,
        SubmissionOutcome::NotSelected
    );
    assert_eq!(
        submit("ghost", b"x", 102).await?,
        SubmissionOutcome::NotSelected
    );
    assert_eq!(
        submit("p2", b"x", 1000).await?,
        SubmissionOutcome::DeadlinePassed
    );
    assert_eq!(
        store.record_submission(7, "p1", b"x", 100).await?,
        SubmissionOutcome::UnknownRound
    );
    assert_eq!(store.submission_count(1).await?, 1);
    let p1 = store
        .participants(1)
        .await?
        .into_iter()
        .find(|p| p.device_id == "p1");
    let p1 = p1.expect("p1 participates");
    assert_eq!(
        (p1.submitted_at, p1.envelope),
        (Some(100), Some(b"first".to_vec()))
    );

    assert!(
        store
            .transition_round(1, RoundState::Open, RoundState::Aggregating, 200, None)
            .await?
    );
    assert_eq!(
        submit("p2", b"late", 201).await?,
        SubmissionOutcome::RoundNotOpen
    );
    assert_eq!(store.submission_count(1).await?, 1);
    assert_eq!(store.submission_count(7).await?, 0);
    Ok(())
}

/// Model insertion, lookup, history order and metrics.
pub async fn models(store: Arc<dyn Store>) -> Result<(), StoreError> {
    assert_eq!(store.latest_model().await?, None);
    assert!(store.model_history().await?.is_empty());
    let mut second = model(2, 200);
    second.accuracy = Some(0.91);
    second.loss = Some(0.3);
    for m in [model(1, 100), second.clone(), model(5, 500), model(3, 300)] {
        store.insert_model(&m).await?;
    }
    assert!(matches!(
        store.insert_model(&model(2, 999)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.get_model(2).await?, Some(second.clone()));
    assert_eq!(store.get_model(4).await?, None);
    assert_eq!(store.latest_model().await?, Some(model(5, 500)));

    let history = store.model_history().await?;
    let versions: Vec<u64> = history.iter().map(|m| m.version).collect();
    assert_eq!(versions, [1, 2, 3, 5]);
    assert_eq!(
        history[1],
        ModelSummary {
            version: 2,
            round_id: 1,
            architecture: "mnist-2nn".to_owned(),
            created_at: 200,
            accuracy: Some(0.91),
            loss: Some(0.3),
        }
    );

    assert!(store.set_model_metrics(1, 0.875, 0.5).await?);
    assert!(!store.set_model_metrics(4, 0.9, 0.1).await?);
    let first = store.get_model(1).await?.expect("model 1");
    assert_eq!((first.accuracy, first.loss), (Some(0.875), Some(0.5)));
    assert_eq!(first.bytes, model(1, 100).bytes);
    Ok(())
}

/// 100 appends from 10 concurrent tasks form one gap-free chain; paging works.
pub async fn audit_chain(store: Arc<dyn Store>) -> Result<(), StoreError> {
    assert_eq!(store.audit_head().await?, None);
    assert!(store.audit_entries(0, 10).await?.is_empty());

    let mut tasks = JoinSet::new();
    for task in 0..10 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let mut appended = Vec::new();
            for i in 0..10 {
                let event = draft(
                    i64::from(task * 10 + i),
                    &format!("task-{task}"),
                    &format!("{i}"),
                );
                let entry = store.append_audit(&event, &test_link).await?;
                assert_eq!(entry.hash, test_link(entry.seq, &entry.prev_hash, &event));
                appended.push(entry);
            }
            Ok::<_, StoreError>(appended)
        });
    }
    let mut returned = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        for entry in joined.expect("append task panicked")? {
            assert!(
                returned.insert(entry.seq, entry).is_none(),
                "seq handed out twice"
            );
        }
    }

    let entries = store.audit_entries(0, 1000).await?;
    assert_eq!(entries.len(), 100);
    assert_chain(&entries, 0, GENESIS_HASH);
    let stored: BTreeMap<u64, AuditEntry> = entries.iter().map(|e| (e.seq, e.clone())).collect();
    assert_eq!(stored, returned, "appends returned exactly what was stored");
    for task in 0..10 {
        let actor = format!("task-{task}");
        assert_eq!(entries.iter().filter(|e| e.actor == actor).count(), 10);
    }
    assert_eq!(store.audit_head().await?.as_ref(), entries.last());

    let page: Vec<u64> = store
        .audit_entries(0, 30)
        .await?
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(page, (1..=30).collect::<Vec<_>>());
    let page: Vec<u64> = store
        .audit_entries(30, 30)
        .await?
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(page, (31..=60).collect::<Vec<_>>());
    let page: Vec<u64> = store
        .audit_entries(90, 30)
        .await?
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(page, (91..=100).collect::<Vec<_>>());
    assert!(store.audit_entries(100, 10).await?.is_empty());
    Ok(())
}

/// Asserts that `entries` continue a chain whose head was `(seq, hash)` without gaps or forks.
fn assert_chain(entries: &[AuditEntry], mut seq: u64, hash: &str) {
    let mut prev = hash.to_owned();
    for entry in entries {
        seq += 1;
        assert_eq!(entry.seq, seq, "gap-free sequence");
        assert_eq!(
            entry.prev_hash, prev,
            "entry {seq} links to its predecessor"
        );
        let recomputed = test_link(
            entry.seq,
            &entry.prev_hash,
            &draft(entry.at, &entry.actor, &entry.subject),
        );
        assert_eq!(entry.hash, recomputed, "entry {seq} hash");
        prev.clone_from(&entry.hash);
    }
}

/// Signed checkpoints round-trip in seq order; duplicates and dangling seqs are refused.
pub async fn checkpoints(store: Arc<dyn Store>) -> Result<(), StoreError> {
    assert!(store.checkpoints().await?.is_empty());
    let mut entries = Vec::new();
    for i in 0..3 {
        entries.push(
            store
                .append_audit(&draft(i, "server", "x"), &test_link)
                .await?,
        );
    }
    let checkpoint = |entry: &AuditEntry| CheckpointRecord {
        seq: entry.seq,
        head_hash: entry.hash.clone(),
        signature: vec![entry.seq as u8; 3309],
        signer_key: vec![0x5e; 1952],
        created_at: entry.at + 1,
    };
    let (second, third) = (checkpoint(&entries[1]), checkpoint(&entries[2]));
    store.insert_checkpoint(&third).await?;
    store.insert_checkpoint(&second).await?;
    assert!(matches!(
        store.insert_checkpoint(&second).await,
        Err(StoreError::Conflict(_))
    ));
    let dangling = CheckpointRecord {
        seq: 99,
        ..second.clone()
    };
    assert!(matches!(
        store.insert_checkpoint(&dangling).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.checkpoints().await?, [second, third]);
    Ok(())
}

/// `u64` values above `i64::MAX` are refused, not wrapped; `i64::MAX` itself is fine.
pub async fn out_of_range_values(store: Arc<dyn Store>) -> Result<(), StoreError> {
    let too_big = i64::MAX as u64 + 1;
    assert!(matches!(
        store.get_round(too_big).await,
        Err(StoreError::OutOfRange(_))
    ));
    assert!(matches!(
        store.insert_model(&model(too_big, 1)).await,
        Err(StoreError::OutOfRange(_))
    ));
    assert!(matches!(
        store.audit_entries(u64::MAX, 1).await,
        Err(StoreError::OutOfRange(_))
    ));
    enroll(&store, "dev", 0).await?;
    store
        .insert_pending_session(&session("s", "dev", 1, 0))
        .await?;
    assert!(store.establish_session("s", b"state", 1).await?);
    assert!(matches!(
        store.advance_session_sequence("s", too_big, 2).await,
        Err(StoreError::OutOfRange(_))
    ));
    assert!(
        store
            .advance_session_sequence("s", i64::MAX as u64, 2)
            .await?
    );
    assert_eq!(store.get_round(i64::MAX as u64).await?, None);
    Ok(())
}

/// Data survives closing and reopening the store (a server restart); `open` must return a store
/// over the same database each time, with an empty database the first time.
pub async fn persists_across_reopen<F, Fut>(open: F) -> Result<(), StoreError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Arc<dyn Store>, StoreError>>,
{
    let store = open().await?;
    let device = enroll(&store, "survivor", 100).await?;
    store
        .create_token(&token("spare", "spare-hash", 110, 9999))
        .await?;
    let first = store
        .append_audit(&draft(120, "server", "boot"), &test_link)
        .await?;
    let tokens = store.list_tokens().await?;
    drop(store);

    let store = open().await?;
    assert_eq!(store.get_device("survivor").await?, Some(device));
    assert_eq!(store.list_tokens().await?, tokens);
    assert_eq!(store.audit_head().await?, Some(first.clone()));
    let second = store
        .append_audit(&draft(130, "server", "reboot"), &test_link)
        .await?;
    assert_chain(&[first, second], 0, GENESIS_HASH);
    let reused = store
        .enroll_with_token("hash-for-survivor", 140, &new_device("copycat"))
        .await;
    assert!(
        is_rejection(&reused, TokenRejection::AlreadyUsed),
        "{reused:?}"
    );
    store
        .enroll_with_token("spare-hash", 150, &new_device("second"))
        .await?;
    Ok(())
}

fn is_corrupt<T>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::Corrupt(_)))
}

/// Values the API would never write (unknown states, negative integers) surface as
/// [`StoreError::Corrupt`] instead of a panic. `execute_raw` runs one SQL statement on the store's
/// database, bypassing the API.
pub async fn corrupt_values_are_reported<F, Fut>(
    store: Arc<dyn Store>,
    execute_raw: F,
) -> Result<(), StoreError>
where
    F: Fn(&'static str) -> Fut,
    Fut: Future<Output = Result<u64, StoreError>>,
{
    enroll(&store, "dev", 0).await?;
    store
        .create_round(&round(7, 10, 1000), &["dev".to_owned()])
        .await?;
    store
        .insert_pending_session(&session("s", "dev", 1, 0))
        .await?;
    store.insert_model(&model(1, 0)).await?;

    assert_eq!(
        execute_raw("UPDATE rounds SET state = 'exploded' WHERE id = 7").await?,
        1
    );
    assert!(is_corrupt(&store.get_round(7).await));
    assert!(is_corrupt(&store.latest_round().await));
    assert!(is_corrupt(&store.list_rounds(5).await));
    assert!(is_corrupt(
        &store.record_submission(7, "dev", b"x", 20).await
    ));

    assert_eq!(execute_raw("UPDATE sessions SET state = 'limbo'").await?, 1);
    assert!(is_corrupt(&store.get_session("s").await));

    assert_eq!(execute_raw("UPDATE models SET round_id = -5").await?, 1);
    assert!(is_corrupt(&store.get_model(1).await));
    assert!(is_corrupt(&store.model_history().await));

    assert_eq!(execute_raw("UPDATE devices SET key_version = -1").await?, 1);
    assert!(is_corrupt(&store.get_device("dev").await));
    assert!(is_corrupt(&store.list_devices().await));
    Ok(())
}
