//! PostgreSQL: the global models — insertion, lookup, history, evaluation metrics and the
//! devices' federated evaluations.

use super::PostgresStore;
use crate::error::{backend, write_error};
use crate::row::{self, db_int};
use crate::{EvaluationRecord, EvaluationSummary, ModelRecord, ModelSummary, StoreError};

pub(super) async fn insert_model(
    store: &PostgresStore,
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
    store: &PostgresStore,
    version: u64,
) -> Result<Option<ModelRecord>, StoreError> {
    let found = sqlx::query("SELECT * FROM models WHERE version = $1")
        .bind(db_int(version, "model version")?)
        .fetch_optional(&store.pool)
        .await
        .map_err(backend)?;
    found.as_ref().map(row::model).transpose()
}

pub(super) async fn latest_model(store: &PostgresStore) -> Result<Option<ModelRecord>, StoreError> {
    let found = sqlx::query("SELECT * FROM models ORDER BY version DESC LIMIT 1")
        .fetch_optional(&store.pool)
        .await
        .map_err(backend)?;
    found.as_ref().map(row::model).transpose()
}

pub(super) async fn latest_model_summary(
    store: &PostgresStore,
) -> Result<Option<ModelSummary>, StoreError> {
    let row = sqlx::query(
        "SELECT version, round_id, architecture, created_at, accuracy, loss
         FROM models ORDER BY version DESC LIMIT 1",
    )
    .fetch_optional(&store.pool)
    .await
    .map_err(backend)?;
    row.as_ref().map(row::model_summary).transpose()
}

pub(super) async fn model_history(store: &PostgresStore) -> Result<Vec<ModelSummary>, StoreError> {
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
    store: &PostgresStore,
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

/// Replaces the device's rows for the version in one transaction. The model row is locked
/// `FOR NO KEY UPDATE` first: that serializes concurrent reports for the same version (two replacing
/// the same device's rows would otherwise both find nothing to delete and collide on the primary
/// key), while the foreign-key checks' `KEY SHARE` locks do not conflict with it.
pub(super) async fn record_evaluation(
    store: &PostgresStore,
    evaluation: &EvaluationRecord,
) -> Result<(), StoreError> {
    row::check_evaluation(evaluation)?;
    let version = db_int(evaluation.model_version, "model version")?;
    let round_id = db_int(evaluation.round_id, "evaluation round id")?;
    let examples = db_int(evaluation.examples, "evaluation examples")?;
    let mut tx = store.write_tx().await?;
    let known = sqlx::query("SELECT 1 FROM models WHERE version = $1 FOR NO KEY UPDATE")
        .bind(version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
    if known.is_none() {
        return Err(StoreError::NotFound("model"));
    }
    sqlx::query("DELETE FROM model_evaluations WHERE model_version = $1 AND device_id = $2")
        .bind(version)
        .bind(&evaluation.device_id)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    for (metric, value) in &evaluation.metrics {
        sqlx::query(
            "INSERT INTO model_evaluations (model_version, device_id, metric, value, examples,
                                            round_id, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(version)
        .bind(&evaluation.device_id)
        .bind(metric)
        .bind(*value)
        .bind(examples)
        .bind(round_id)
        .bind(evaluation.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| write_error(e, "evaluation metric", "model"))?;
    }
    tx.commit().await.map_err(backend)
}

pub(super) async fn evaluation_history(
    store: &PostgresStore,
) -> Result<Vec<EvaluationSummary>, StoreError> {
    let rows = sqlx::query(
        "SELECT model_version, metric,
                SUM(value * examples::DOUBLE PRECISION)
                    / SUM(examples)::DOUBLE PRECISION AS mean,
                SUM(examples)::BIGINT AS examples,
                COUNT(*) AS devices
         FROM model_evaluations
         GROUP BY model_version, metric
         ORDER BY model_version, metric COLLATE \"C\"",
    )
    .fetch_all(&store.pool)
    .await
    .map_err(backend)?;
    row::all(&rows, row::evaluation_summary)
}
