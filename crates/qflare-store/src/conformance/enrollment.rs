//! Checks of enrollment tokens and devices: the token lifecycle, the single-use race (within one
//! store and across two stores over one database), and device listing, keys and revocation.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::{enroll, is_rejection, keys, new_device, session, token};
use crate::{SessionState, Store, StoreError, TokenRejection};

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

    store
        .insert_pending_session(&session("a-0", "dev-a", 9, 250))
        .await?;
    assert!(store.establish_session("a-0", b"sealed", 251).await?);
    assert!(store.rotate_device_keys("dev-a", 1, &keys(9), 300).await?);
    let rotated = store.get_device("dev-a").await?.expect("dev-a exists");
    assert_eq!((rotated.key_version, rotated.keys), (2, keys(9)));
    assert_eq!(rotated.last_seen_at, Some(300));
    assert_eq!(
        store.get_session("a-0").await?.map(|s| s.state),
        Some(SessionState::Closed),
        "the rotation closed the sessions of the old keys"
    );
    // A second rotation authorised by the same old key (version 1) loses.
    assert!(!store.rotate_device_keys("dev-a", 1, &keys(12), 301).await?);
    assert_eq!(
        store.get_device("dev-a").await?.map(|d| d.keys),
        Some(keys(9))
    );
    assert!(store.rotate_device_keys("dev-a", 2, &keys(10), 301).await?);
    let rotated = store.get_device("dev-a").await?.expect("dev-a exists");
    assert_eq!(rotated.key_version, 3);
    assert!(!store.rotate_device_keys("nobody", 1, &keys(9), 300).await?);

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
        !store.rotate_device_keys("dev-a", 3, &keys(11), 500).await?,
        "revoked"
    );
    assert_eq!(
        store.get_device("dev-a").await?.map(|d| d.key_version),
        Some(3)
    );
    Ok(())
}
