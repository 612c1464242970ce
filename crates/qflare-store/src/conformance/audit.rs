//! Checks of the audit ledger: concurrent appends forming one gap-free chain, paging, and signed
//! checkpoints.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinSet;

use super::{assert_chain, draft, test_link};
use crate::{AuditEntry, CheckpointRecord, GENESIS_HASH, Store, StoreError};

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
