//! Checks of the coordinator lease and the administrator's training control.

use std::sync::Arc;

use crate::{Store, StoreError, TrainingControl};

/// The lease: first taker gets epoch 1, renewals keep the epoch, a live lease refuses others, an
/// expired or released one passes to the next taker with the epoch one higher.
pub async fn coordinator_lease(store: Arc<dyn Store>) -> Result<(), StoreError> {
    assert_eq!(
        store.coordinator_lease().await?,
        None,
        "nobody coordinated yet"
    );

    let first = store
        .acquire_lease("replica-a", "10.0.0.1:8443", 100, 110)
        .await?;
    assert_eq!(
        (first.holder.as_str(), first.address.as_str(), first.epoch),
        ("replica-a", "10.0.0.1:8443", 1)
    );
    assert_eq!((first.acquired_at, first.expires_at), (100, 110));
    assert!(first.is_live(109) && !first.is_live(110));

    let refused = store
        .acquire_lease("replica-b", "10.0.0.2:8443", 105, 115)
        .await?;
    assert_eq!(
        refused, first,
        "a live lease is not taken, and nothing changes"
    );

    let renewed = store
        .acquire_lease("replica-a", "10.0.0.1:8443", 106, 116)
        .await?;
    assert_eq!(
        (renewed.epoch, renewed.acquired_at, renewed.expires_at),
        (1, 100, 116),
        "a renewal moves only the expiry"
    );

    let taken = store
        .acquire_lease("replica-b", "10.0.0.2:8443", 116, 126)
        .await?;
    assert_eq!(
        (taken.holder.as_str(), taken.epoch, taken.acquired_at),
        ("replica-b", 2, 116),
        "an expired lease passes on, one epoch later"
    );
    assert_eq!(store.coordinator_lease().await?, Some(taken.clone()));

    assert!(
        !store.release_lease("replica-a").await?,
        "only the holder releases"
    );
    assert!(store.release_lease("replica-b").await?);
    assert!(!store.release_lease("replica-b").await?, "released once");
    let after = store.coordinator_lease().await?.expect("the row stays");
    assert!(!after.is_live(117), "a released lease has lapsed");

    let next = store
        .acquire_lease("replica-c", "10.0.0.3:8443", 117, 127)
        .await?;
    assert_eq!((next.holder.as_str(), next.epoch), ("replica-c", 3));
    Ok(())
}

/// 20 replicas (tasks over the given stores) race for one expired lease: exactly one holds it
/// afterwards, every racer sees that one, and the epoch moved once.
pub async fn lease_race(stores: &[Arc<dyn Store>]) -> Result<(), StoreError> {
    stores[0].acquire_lease("old", "old:1", 0, 10).await?;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = stores[i % stores.len()].clone();
        tasks.push(tokio::spawn(async move {
            store
                .acquire_lease(&format!("racer-{i}"), "addr:1", 50, 60)
                .await
        }));
    }
    let mut seen = Vec::new();
    for task in tasks {
        let lease = task
            .await
            .map_err(|e| StoreError::Backend(format!("task: {e}")))??;
        seen.push(lease);
    }
    let winner = stores[0].coordinator_lease().await?.expect("a holder");
    assert_eq!(winner.epoch, 2, "the lease changed hands once");
    assert!(winner.holder.starts_with("racer-"));
    for lease in &seen {
        assert_eq!(lease, &winner, "every racer sees the one winner");
    }
    Ok(())
}

/// Start and pause are remembered, the last one wins.
pub async fn training_control(store: Arc<dyn Store>) -> Result<(), StoreError> {
    assert_eq!(store.training_control().await?, None);
    store
        .set_training_control(TrainingControl::Started, 10)
        .await?;
    assert_eq!(
        store.training_control().await?,
        Some(TrainingControl::Started)
    );
    store
        .set_training_control(TrainingControl::Paused, 11)
        .await?;
    assert_eq!(
        store.training_control().await?,
        Some(TrainingControl::Paused)
    );
    Ok(())
}
