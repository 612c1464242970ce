//! PostgreSQL: handshake sessions — pending inserts, confirmation, the record sequence-number
//! compare-and-set, and closing and expiring sessions.

use super::PostgresStore;
use crate::error::{backend, write_error};
use crate::row::{self, db_int};
use crate::{SessionRecord, StoreError};

pub(super) async fn insert_pending_session(
    store: &PostgresStore,
    session: &SessionRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO sessions (id, device_id, state, client_nonce, sealed_state, created_at,
                               confirm_deadline, expires_at, last_seq)
         VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, $8)",
    )
    .bind(&session.id)
    .bind(&session.device_id)
    .bind(&session.client_nonce)
    .bind(&session.sealed_state)
    .bind(session.created_at)
    .bind(session.confirm_deadline)
    .bind(session.expires_at)
    .bind(db_int(session.last_seq, "session last_seq")?)
    .execute(&store.pool)
    .await
    .map_err(|e| write_error(e, "session id or (device, client nonce)", "device"))?;
    Ok(())
}

pub(super) async fn get_session(
    store: &PostgresStore,
    id: &str,
) -> Result<Option<SessionRecord>, StoreError> {
    let found = sqlx::query("SELECT * FROM sessions WHERE id = $1")
        .bind(id)
        .fetch_optional(&store.pool)
        .await
        .map_err(backend)?;
    found.as_ref().map(row::session).transpose()
}

pub(super) async fn establish_session(
    store: &PostgresStore,
    id: &str,
    sealed_state: &[u8],
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE sessions SET state = 'established', sealed_state = $1
         WHERE id = $2 AND state = 'pending' AND confirm_deadline > $3",
    )
    .bind(sealed_state)
    .bind(id)
    .bind(now)
    .execute(&store.pool)
    .await
    .map_err(backend)?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn advance_session_sequence(
    store: &PostgresStore,
    id: &str,
    seq: u64,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE sessions SET last_seq = $1
         WHERE id = $2 AND state = 'established' AND expires_at > $3 AND last_seq < $1",
    )
    .bind(db_int(seq, "session sequence number")?)
    .bind(id)
    .bind(now)
    .execute(&store.pool)
    .await
    .map_err(backend)?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn close_device_sessions(
    store: &PostgresStore,
    device_id: &str,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE sessions SET state = 'closed' WHERE device_id = $1 AND state <> 'closed'",
    )
    .bind(device_id)
    .execute(&store.pool)
    .await
    .map_err(backend)?;
    Ok(done.rows_affected())
}

pub(super) async fn delete_expired_sessions(
    store: &PostgresStore,
    now: i64,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM sessions
         WHERE expires_at <= $1 OR (state = 'pending' AND confirm_deadline <= $1)",
    )
    .bind(now)
    .execute(&store.pool)
    .await
    .map_err(backend)?;
    Ok(done.rows_affected())
}
