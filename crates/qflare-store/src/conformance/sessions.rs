//! Checks of handshake sessions: confirmation, replays, deadlines, the sequence-number
//! compare-and-set under contention, and clean-up.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::{enroll, session};
use crate::{SessionState, Store, StoreError};

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
