//! Checks that cut across concerns: out-of-range integers, data surviving a reopen, and corrupt
//! stored values reported as errors.

use std::future::Future;
use std::sync::Arc;

use super::{
    assert_chain, draft, enroll, is_rejection, model, new_device, round, session, test_link, token,
};
use crate::{GENESIS_HASH, Store, StoreError, TokenRejection};

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
