//! PostgreSQL: enrollment tokens and devices — issuing, listing and revoking tokens, the single-use
//! consumption that enrolls a device, and device lookup, key rotation, touching and revocation.

use super::PostgresStore;
use crate::error::{backend, write_error};
use crate::row::{self, Col};
use crate::{DeviceKeys, DeviceRecord, NewDevice, StoreError, TokenRecord};

pub(super) async fn create_token(
    store: &PostgresStore,
    token: &TokenRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tokens (id, hash, label, created_at, expires_at, used_at, used_by, revoked_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&token.id)
    .bind(&token.hash)
    .bind(&token.label)
    .bind(token.created_at)
    .bind(token.expires_at)
    .bind(token.used_at)
    .bind(&token.used_by)
    .bind(token.revoked_at)
    .execute(&store.pool)
    .await
    .map_err(|e| write_error(e, "token id or hash", "token"))?;
    Ok(())
}

pub(super) async fn list_tokens(store: &PostgresStore) -> Result<Vec<TokenRecord>, StoreError> {
    let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at DESC, id DESC")
        .fetch_all(&store.pool)
        .await
        .map_err(backend)?;
    row::all(&rows, row::token)
}

pub(super) async fn revoke_token(
    store: &PostgresStore,
    id: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE tokens SET revoked_at = $1
         WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(id)
    .execute(&store.pool)
    .await
    .map_err(backend)?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn enroll_with_token(
    store: &PostgresStore,
    token_hash: &str,
    now: i64,
    device: &NewDevice,
) -> Result<DeviceRecord, StoreError> {
    let mut tx = store.write_tx().await?;
    let consumed = sqlx::query(
        "UPDATE tokens SET used_at = $1, used_by = $2
         WHERE hash = $3 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $1
         RETURNING id",
    )
    .bind(now)
    .bind(&device.id)
    .bind(token_hash)
    .fetch_optional(&mut *tx)
    .await
    .map_err(backend)?;
    let Some(consumed) = consumed else {
        let token = sqlx::query("SELECT used_at, revoked_at FROM tokens WHERE hash = $1")
            .bind(token_hash)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
        return Err(row::token_rejection(token.as_ref())?);
    };
    let token_id = consumed.text("id")?;
    let keys = &device.keys;
    sqlx::query(
        "INSERT INTO devices (id, name, kem_suite, kem_public_key, signature_suite,
                              verifying_key, enrolled_at, key_version, token_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8)",
    )
    .bind(&device.id)
    .bind(&device.name)
    .bind(&keys.kem_suite)
    .bind(&keys.kem_public_key)
    .bind(&keys.signature_suite)
    .bind(&keys.verifying_key)
    .bind(now)
    .bind(&token_id)
    .execute(&mut *tx)
    .await
    .map_err(|e| write_error(e, "device id", "token"))?;
    tx.commit().await.map_err(backend)?;
    Ok(DeviceRecord {
        id: device.id.clone(),
        name: device.name.clone(),
        keys: device.keys.clone(),
        enrolled_at: now,
        revoked_at: None,
        last_seen_at: None,
        key_version: 1,
        token_id: Some(token_id),
    })
}

pub(super) async fn get_device(
    store: &PostgresStore,
    id: &str,
) -> Result<Option<DeviceRecord>, StoreError> {
    let found = sqlx::query("SELECT * FROM devices WHERE id = $1")
        .bind(id)
        .fetch_optional(&store.pool)
        .await
        .map_err(backend)?;
    found.as_ref().map(row::device).transpose()
}

pub(super) async fn list_devices(store: &PostgresStore) -> Result<Vec<DeviceRecord>, StoreError> {
    let rows = sqlx::query("SELECT * FROM devices ORDER BY enrolled_at, id")
        .fetch_all(&store.pool)
        .await
        .map_err(backend)?;
    row::all(&rows, row::device)
}

pub(super) async fn revoke_device(
    store: &PostgresStore,
    id: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let mut tx = store.write_tx().await?;
    let revoked =
        sqlx::query("UPDATE devices SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(backend)?
            .rows_affected();
    if revoked == 0 {
        return Ok(false);
    }
    close_sessions_and_commit(tx, id).await
}

pub(super) async fn rotate_device_keys(
    store: &PostgresStore,
    id: &str,
    expected_key_version: u32,
    keys: &DeviceKeys,
    now: i64,
) -> Result<bool, StoreError> {
    let mut tx = store.write_tx().await?;
    let rotated = sqlx::query(
        "UPDATE devices
         SET kem_suite = $1, kem_public_key = $2, signature_suite = $3, verifying_key = $4,
             key_version = key_version + 1, last_seen_at = GREATEST(last_seen_at, $5)
         WHERE id = $6 AND revoked_at IS NULL AND key_version = $7",
    )
    .bind(&keys.kem_suite)
    .bind(&keys.kem_public_key)
    .bind(&keys.signature_suite)
    .bind(&keys.verifying_key)
    .bind(now)
    .bind(id)
    .bind(i64::from(expected_key_version))
    .execute(&mut *tx)
    .await
    .map_err(backend)?
    .rows_affected();
    if rotated == 0 {
        return Ok(false);
    }
    // Sessions established under the old keys end with them, in the same
    // transaction: no request can be admitted under a session the rotation
    // was meant to end.
    close_sessions_and_commit(tx, id).await
}

pub(super) async fn touch_device(
    store: &PostgresStore,
    id: &str,
    now: i64,
) -> Result<(), StoreError> {
    let done =
        sqlx::query("UPDATE devices SET last_seen_at = GREATEST(last_seen_at, $1) WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&store.pool)
            .await
            .map_err(backend)?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound("device"));
    }
    Ok(())
}

/// Closes every session of device `id` and commits `tx`: the last step of a
/// revocation or a key rotation, which must end the device's sessions in
/// the same transaction as the change that ends their authority.
async fn close_sessions_and_commit(
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    id: &str,
) -> Result<bool, StoreError> {
    sqlx::query("UPDATE sessions SET state = 'closed' WHERE device_id = $1 AND state <> 'closed'")
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    tx.commit().await.map_err(backend)?;
    Ok(true)
}
