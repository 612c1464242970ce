//! SQLite: the global models — insertion, lookup, history and evaluation metrics.

use super::SqliteStore;
use crate::error::{backend, write_error};
use crate::row::{self, db_int};
use crate::{ModelRecord, ModelSummary, StoreError};

pub(super) async fn insert_model(
    store: &SqliteStore,
    model: &ModelRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO models (version, round_id, architecture, bytes, certificate_json,
                             created_at, accuracy, loss)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(db_int(model.version, "model version")?)
    .bind(db_int(model.round_id, "model round id")?)
    .bind(&model.architecture)
    .bind(&model.bytes)
    .bind(&model.certificate_json)
    .bind(model.created_at)
    .bind(model.accuracy)
    .bind(model.loss)
    .execute(&store.pool)
    .await
    .map_err(|e| write_error(e, "model version", "model"))?;
    Ok(())
}

pub(super) async fn get_model(
    store: &SqliteStore,
    version: u64,
) -> Result<Option<ModelRecord>, StoreError> {
    let found = sqlx::query("SELECT * FROM models WHERE version = $1")
        .bind(db_int(version, "model version")?)
        .fetch_optional(&store.pool)
        .await
        .map_err(backend)?;
    found.as_ref().map(row::model).transpose()
}

pub(super) async fn latest_model(store: &SqliteStore) -> Result<Option<ModelRecord>, StoreError> {
    let found = sqlx::query("SELECT * FROM models ORDER BY version DESC LIMIT 1")
        .fetch_optional(&store.pool)
        .await
        .map_err(backend)?;
    found.as_ref().map(row::model).transpose()
}

pub(super) async fn model_history(store: &SqliteStore) -> Result<Vec<ModelSummary>, StoreError> {
    let rows = sqlx::query(
        "SELECT version, round_id, architecture, created_at, accuracy, loss
         FROM models ORDER BY version",
    )
    .fetch_all(&store.pool)
    .await
    .map_err(backend)?;
    row::all(&rows, row::model_summary)
}

pub(super) async fn set_model_metrics(
    store: &SqliteStore,
    version: u64,
    accuracy: f64,
    loss: f64,
) -> Result<bool, StoreError> {
    let done = sqlx::query("UPDATE models SET accuracy = $1, loss = $2 WHERE version = $3")
        .bind(accuracy)
        .bind(loss)
        .bind(db_int(version, "model version")?)
        .execute(&store.pool)
        .await
        .map_err(backend)?;
    Ok(done.rows_affected() == 1)
}
