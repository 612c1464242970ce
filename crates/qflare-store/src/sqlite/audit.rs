//! SQLite: the hash-chained audit ledger and its signed checkpoints.

use sqlx::{Sqlite, Transaction};

use super::SqliteStore;
use crate::error::{backend, write_error};
use crate::row::{self, Col, db_int};
use crate::{AuditDraft, AuditEntry, AuditLink, CheckpointRecord, StoreError};

pub(super) async fn append_audit(
    store: &SqliteStore,
    draft: &AuditDraft,
    link: &AuditLink,
) -> Result<AuditEntry, StoreError> {
    // BEGIN IMMEDIATE makes read-head, link, insert, move-head one serialized step.
    let mut tx = store.write_tx().await?;
    let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?
        .ok_or_else(|| StoreError::Corrupt("audit head row is missing".to_owned()))?;
    let entry = crate::next_audit_entry(head.u64("seq")?, head.text("hash")?, draft, link)?;
    insert_audit_entry(&mut tx, &entry).await?;
    tx.commit().await.map_err(backend)?;
    Ok(entry)
}

pub(super) async fn audit_entries(
    store: &SqliteStore,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<AuditEntry>, StoreError> {
    let rows = sqlx::query("SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2")
        .bind(db_int(after_seq, "audit seq")?)
        .bind(i64::from(limit))
        .fetch_all(&store.pool)
        .await
        .map_err(backend)?;
    row::all(&rows, row::audit_entry)
}

pub(super) async fn audit_head(store: &SqliteStore) -> Result<Option<AuditEntry>, StoreError> {
    let found = sqlx::query("SELECT * FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&store.pool)
        .await
        .map_err(backend)?;
    found.as_ref().map(row::audit_entry).transpose()
}

pub(super) async fn insert_checkpoint(
    store: &SqliteStore,
    checkpoint: &CheckpointRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO checkpoints (seq, head_hash, signature, signer_key, created_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(db_int(checkpoint.seq, "checkpoint seq")?)
    .bind(&checkpoint.head_hash)
    .bind(&checkpoint.signature)
    .bind(&checkpoint.signer_key)
    .bind(checkpoint.created_at)
    .execute(&store.pool)
    .await
    .map_err(|e| write_error(e, "checkpoint at this seq", "audit entry"))?;
    Ok(())
}

pub(super) async fn checkpoints(store: &SqliteStore) -> Result<Vec<CheckpointRecord>, StoreError> {
    let rows = sqlx::query("SELECT * FROM checkpoints ORDER BY seq")
        .fetch_all(&store.pool)
        .await
        .map_err(backend)?;
    row::all(&rows, row::checkpoint)
}

async fn insert_audit_entry(
    tx: &mut Transaction<'static, Sqlite>,
    entry: &AuditEntry,
) -> Result<(), StoreError> {
    let seq = db_int(entry.seq, "audit seq")?;
    sqlx::query(
        "INSERT INTO audit_log (seq, at, kind, actor, subject, detail_json, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(seq)
    .bind(entry.at)
    .bind(&entry.kind)
    .bind(&entry.actor)
    .bind(&entry.subject)
    .bind(&entry.detail_json)
    .bind(&entry.prev_hash)
    .bind(&entry.hash)
    .execute(&mut **tx)
    .await
    .map_err(|e| write_error(e, "audit seq", "audit entry"))?;
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(seq)
        .bind(&entry.hash)
        .execute(&mut **tx)
        .await
        .map_err(backend)?;
    Ok(())
}
