//! PostgreSQL: federated-learning rounds and their participants — creation, the state
//! compare-and-set, re-opening, sealed update submissions and the enclave's verdicts.

use super::PostgresStore;
use crate::error::{backend, write_error};
use crate::row::{self, Col, db_int};
use crate::{
    ParticipantRecord, RoundRecord, RoundState, StoreError, SubmissionOutcome, VerdictRecord,
};

pub(super) async fn create_round(
    store: &PostgresStore,
    round: &RoundRecord,
    selected: &[String],
) -> Result<(), StoreError> {
    let round_id = db_int(round.id, "round id")?;
    let mut tx = store.write_tx().await?;
    sqlx::query(
        "INSERT INTO rounds (id, state, base_model_version, config_json, min_updates,
                             target_updates, opened_at, deadline, closed_at, attempt, outcome_json)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(round_id)
    .bind(round.state.as_str())
    .bind(db_int(round.base_model_version, "base model version")?)
    .bind(&round.config_json)
    .bind(i64::from(round.min_updates))
    .bind(i64::from(round.target_updates))
    .bind(round.opened_at)
    .bind(round.deadline)
    .bind(round.closed_at)
    .bind(i64::from(round.attempt))
    .bind(&round.outcome_json)
    .execute(&mut *tx)
    .await
    .map_err(|e| write_error(e, "round id", "round"))?;
    for device_id in selected {
        sqlx::query("INSERT INTO participants (round_id, device_id) VALUES ($1, $2)")
            .bind(round_id)
            .bind(device_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| write_error(e, "round participant", "device"))?;
    }
    tx.commit().await.map_err(backend)
}

pub(super) async fn get_round(
    store: &PostgresStore,
    id: u64,
) -> Result<Option<RoundRecord>, StoreError> {
    let found = sqlx::query("SELECT * FROM rounds WHERE id = $1")
        .bind(db_int(id, "round id")?)
        .fetch_optional(&store.pool)
        .await
        .map_err(backend)?;
    found.as_ref().map(row::round).transpose()
}

pub(super) async fn latest_round(store: &PostgresStore) -> Result<Option<RoundRecord>, StoreError> {
    let found = sqlx::query("SELECT * FROM rounds ORDER BY id DESC LIMIT 1")
        .fetch_optional(&store.pool)
        .await
        .map_err(backend)?;
    found.as_ref().map(row::round).transpose()
}

pub(super) async fn list_rounds(
    store: &PostgresStore,
    limit: u32,
) -> Result<Vec<RoundRecord>, StoreError> {
    let rows = sqlx::query("SELECT * FROM rounds ORDER BY id DESC LIMIT $1")
        .bind(i64::from(limit))
        .fetch_all(&store.pool)
        .await
        .map_err(backend)?;
    row::all(&rows, row::round)
}

pub(super) async fn transition_round(
    store: &PostgresStore,
    id: u64,
    from: RoundState,
    to: RoundState,
    now: i64,
    outcome_json: Option<&str>,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE rounds SET state = $1, closed_at = $2, outcome_json = COALESCE($3, outcome_json)
         WHERE id = $4 AND state = $5",
    )
    .bind(to.as_str())
    .bind(to.is_terminal().then_some(now))
    .bind(outcome_json)
    .bind(db_int(id, "round id")?)
    .bind(from.as_str())
    .execute(&store.pool)
    .await
    .map_err(backend)?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn reopen_round(
    store: &PostgresStore,
    id: u64,
    deadline: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let id = db_int(id, "round id")?;
    let mut tx = store.write_tx().await?;
    let reopened = sqlx::query(
        "UPDATE rounds
         SET state = 'open', attempt = attempt + 1, opened_at = $1, deadline = $2,
             closed_at = NULL, outcome_json = NULL
         WHERE id = $3 AND state IN ('open', 'aggregating')",
    )
    .bind(now)
    .bind(deadline)
    .bind(id)
    .execute(&mut *tx)
    .await
    .map_err(backend)?
    .rows_affected();
    if reopened == 0 {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE participants
         SET submitted_at = NULL, envelope = NULL, verdict = NULL, reason = NULL
         WHERE round_id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await
    .map_err(backend)?;
    tx.commit().await.map_err(backend)?;
    Ok(true)
}

pub(super) async fn discard_closed_envelopes(store: &PostgresStore) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE participants SET envelope = NULL
         WHERE envelope IS NOT NULL
           AND round_id IN (SELECT id FROM rounds
                            WHERE state IN ('completed', 'failed', 'cancelled'))",
    )
    .execute(&store.pool)
    .await
    .map_err(backend)?;
    Ok(done.rows_affected())
}

pub(super) async fn participants(
    store: &PostgresStore,
    round_id: u64,
) -> Result<Vec<ParticipantRecord>, StoreError> {
    let rows = sqlx::query("SELECT * FROM participants WHERE round_id = $1 ORDER BY device_id")
        .bind(db_int(round_id, "round id")?)
        .fetch_all(&store.pool)
        .await
        .map_err(backend)?;
    row::all(&rows, row::participant)
}

pub(super) async fn participant_states(
    store: &PostgresStore,
    round_id: u64,
) -> Result<Vec<ParticipantRecord>, StoreError> {
    let rows = sqlx::query(
        "SELECT round_id, device_id, submitted_at, NULL::bytea AS envelope, verdict, reason
         FROM participants WHERE round_id = $1 ORDER BY device_id",
    )
    .bind(db_int(round_id, "round id")?)
    .fetch_all(&store.pool)
    .await
    .map_err(backend)?;
    row::all(&rows, row::participant)
}

pub(super) async fn participant_state(
    store: &PostgresStore,
    round_id: u64,
    device_id: &str,
) -> Result<Option<ParticipantRecord>, StoreError> {
    let row = sqlx::query(
        "SELECT round_id, device_id, submitted_at, NULL::bytea AS envelope, verdict, reason
         FROM participants WHERE round_id = $1 AND device_id = $2",
    )
    .bind(db_int(round_id, "round id")?)
    .bind(device_id)
    .fetch_optional(&store.pool)
    .await
    .map_err(backend)?;
    row.as_ref().map(row::participant).transpose()
}

pub(super) async fn record_submission(
    store: &PostgresStore,
    round_id: u64,
    device_id: &str,
    envelope: &[u8],
    now: i64,
) -> Result<SubmissionOutcome, StoreError> {
    let round_id = db_int(round_id, "round id")?;
    // FOR SHARE conflicts with the row lock of `transition_round`'s UPDATE: a transition waits
    // for in-flight submissions to commit, and a submission that waited on a transition
    // re-reads the round's new state. Either way no envelope is stored once the round has left
    // `Open`; the server's submission gate makes every stored one reach the enclave first.
    let mut tx = store.write_tx().await?;
    let round = sqlx::query("SELECT state, deadline FROM rounds WHERE id = $1 FOR SHARE")
        .bind(round_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
    let Some(round) = round else {
        return Ok(SubmissionOutcome::UnknownRound);
    };
    if round.text("state")?.parse::<RoundState>()? != RoundState::Open {
        return Ok(SubmissionOutcome::RoundNotOpen);
    }
    if now >= round.i64("deadline")? {
        return Ok(SubmissionOutcome::DeadlinePassed);
    }
    let stored = sqlx::query(
        "UPDATE participants SET submitted_at = $1, envelope = $2
         WHERE round_id = $3 AND device_id = $4 AND submitted_at IS NULL",
    )
    .bind(now)
    .bind(envelope)
    .bind(round_id)
    .bind(device_id)
    .execute(&mut *tx)
    .await
    .map_err(backend)?
    .rows_affected();
    if stored == 0 {
        let selected =
            sqlx::query("SELECT 1 FROM participants WHERE round_id = $1 AND device_id = $2")
                .bind(round_id)
                .bind(device_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?;
        return Ok(if selected.is_some() {
            SubmissionOutcome::AlreadySubmitted
        } else {
            SubmissionOutcome::NotSelected
        });
    }
    tx.commit().await.map_err(backend)?;
    Ok(SubmissionOutcome::Stored)
}

pub(super) async fn submission_count(
    store: &PostgresStore,
    round_id: u64,
) -> Result<u64, StoreError> {
    sqlx::query(
        "SELECT COUNT(*) AS n FROM participants WHERE round_id = $1 AND submitted_at IS NOT NULL",
    )
    .bind(db_int(round_id, "round id")?)
    .fetch_one(&store.pool)
    .await
    .map_err(backend)?
    .u64("n")
}

pub(super) async fn set_verdicts(
    store: &PostgresStore,
    round_id: u64,
    verdicts: &[VerdictRecord],
) -> Result<(), StoreError> {
    let round_id = db_int(round_id, "round id")?;
    let mut tx = store.write_tx().await?;
    for verdict in verdicts {
        let done = sqlx::query(
            "UPDATE participants SET verdict = $1, reason = $2
             WHERE round_id = $3 AND device_id = $4",
        )
        .bind(&verdict.verdict)
        .bind(&verdict.reason)
        .bind(round_id)
        .bind(&verdict.device_id)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("round participant"));
        }
    }
    tx.commit().await.map_err(backend)
}
