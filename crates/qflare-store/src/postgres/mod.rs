//! The PostgreSQL backend: for several server replicas sharing one database.
//!
//! Transactions run at PostgreSQL's default READ COMMITTED level, and every race the protocol cares
//! about is decided by row locks rather than by snapshots, so it holds across processes:
//! - a conditional `UPDATE … WHERE <precondition>` locks the row; a concurrent updater of the same
//!   row waits, then re-evaluates the `WHERE` against the committed version and matches nothing.
//!   Token consumption, sequence-number advances, session confirmation and round transitions are
//!   all such single statements, so exactly one of any set of concurrent callers wins;
//! - the audit chain's head is one row locked `FOR UPDATE` for the whole append, which serializes
//!   appenders without gaps or forks (`audit_log.seq` is the primary key as a backstop);
//! - a submission holds the round row `FOR SHARE` while it checks the round and stores the
//!   envelope, so it cannot interleave with the round leaving `Open`.
//!
//! Migrations take a transaction-scoped advisory lock, so replicas starting together migrate once.
//!
//! This module owns the store type, connecting and migrating, and the [`Store`] impl, which hands
//! each method to the module for its concern: `devices` (enrollment tokens and devices),
//! `sessions`, `rounds` (rounds, participants, submissions, verdicts), `models` and `audit` (the
//! ledger and its checkpoints).

mod audit;
mod devices;
mod models;
mod rounds;
mod sessions;

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres, Transaction};

use crate::error::backend;
use crate::{
    AuditDraft, AuditEntry, AuditLink, CheckpointRecord, CoordinatorLease, DeviceKeys,
    DeviceRecord, EvaluationRecord, EvaluationSummary, GENESIS_HASH, ModelRecord, ModelSummary,
    NewDevice, ParticipantRecord, RoundRecord, RoundState, SessionRecord, Store, StoreError,
    SubmissionOutcome, TokenRecord, TrainingControl, VerdictRecord, coordination,
};

/// Connections per pool; several replicas each hold one pool, so this stays well below
/// PostgreSQL's default limit of 100.
const POOL_SIZE: u32 = 10;

/// Advisory-lock key serializing migrations ("QFLARE" in ASCII). Advisory locks are per database,
/// so stores in different schemas of one database merely take turns migrating.
const MIGRATION_LOCK: i64 = 0x5146_4c41_5245;

/// The PostgreSQL implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` and migrates; with `schema`, the tables live in that schema (created if
    /// missing) — see [`crate::open_postgres_in_schema`].
    pub async fn open(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        let mut options = connect_options(url)?;
        if let Some(schema) = schema {
            let schema = checked_schema(schema)?;
            let mut conn = PgConnection::connect_with(&options)
                .await
                .map_err(backend)?;
            // Two replicas creating the schema at once race on the catalog's unique index; the
            // loser's schema exists all the same.
            let created = sqlx::query(AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}"
            )))
            .execute(&mut conn)
            .await;
            if let Err(error) = created
                && !is_unique_violation(&error)
            {
                return Err(backend(error));
            }
            conn.close().await.map_err(backend)?;
            options = options.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await
            .map_err(backend)?;
        let store = Self { pool };
        store.migrate().await?;
        tracing::info!(
            backend = "postgres",
            schema = schema.unwrap_or("(search_path)"),
            "store opened"
        );
        Ok(store)
    }

    /// Runs one raw SQL statement and returns the number of affected rows. Only for tests that
    /// must put the database into states the API refuses to create (e.g. corrupt values).
    #[doc(hidden)]
    pub async fn execute_raw(&self, sql: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }

    async fn write_tx(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(backend)
    }

    /// Applies the embedded migrations (adopting a database from before them, see
    /// [`crate::migrate`]) and seeds the audit chain's genesis head, in one transaction that holds
    /// the migration lock, so replicas starting together migrate once.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        crate::migrate::postgres(&mut tx).await?;
        // The chain's genesis head, seeded here rather than in the SQL so the constant has one home.
        sqlx::query(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(GENESIS_HASH)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)
    }
}

/// Drops `schema` and everything in it. For tests that isolate runs with
/// [`crate::open_postgres_in_schema`]; close the stores using the schema first.
#[doc(hidden)]
pub async fn drop_postgres_schema(url: &str, schema: &str) -> Result<(), StoreError> {
    let schema = checked_schema(schema)?;
    let mut conn = PgConnection::connect_with(&connect_options(url)?)
        .await
        .map_err(backend)?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&mut conn)
    .await
    .map_err(backend)?;
    conn.close().await.map_err(backend)
}

fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    // The parser's message is kept, the URL (which may hold a password) is not echoed.
    PgConnectOptions::from_str(url)
        .map_err(|error| StoreError::Config(format!("invalid PostgreSQL URL: {error}")))
}

/// Accepts only plain lower-case identifiers: the name is spliced into DDL (identifiers cannot be
/// bound as parameters) and into `search_path`, which would fold unquoted upper case.
fn checked_schema(schema: &str) -> Result<&str, StoreError> {
    let mut chars = schema.chars();
    let valid = schema.len() <= 63
        && chars
            .next()
            .is_some_and(|first| first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(schema)
    } else {
        Err(StoreError::Config(format!(
            "PostgreSQL schema name {schema:?} must match [a-z_][a-z0-9_]* and be at most 63 bytes"
        )))
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|db| db.is_unique_violation())
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        devices::create_token(self, token).await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        devices::list_tokens(self).await
    }

    async fn revoke_token(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        devices::revoke_token(self, id, now).await
    }

    async fn enroll_with_token(
        &self,
        token_hash: &str,
        now: i64,
        device: &NewDevice,
    ) -> Result<DeviceRecord, StoreError> {
        devices::enroll_with_token(self, token_hash, now, device).await
    }

    async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        devices::get_device(self, id).await
    }

    async fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        devices::list_devices(self).await
    }

    async fn revoke_device(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        devices::revoke_device(self, id, now).await
    }

    async fn rotate_device_keys(
        &self,
        id: &str,
        expected_key_version: u32,
        keys: &DeviceKeys,
        now: i64,
    ) -> Result<bool, StoreError> {
        devices::rotate_device_keys(self, id, expected_key_version, keys, now).await
    }

    async fn touch_device(&self, id: &str, now: i64) -> Result<(), StoreError> {
        devices::touch_device(self, id, now).await
    }

    async fn insert_pending_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        sessions::insert_pending_session(self, session).await
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        sessions::get_session(self, id).await
    }

    async fn establish_session(
        &self,
        id: &str,
        sealed_state: &[u8],
        now: i64,
    ) -> Result<bool, StoreError> {
        sessions::establish_session(self, id, sealed_state, now).await
    }

    async fn advance_session_sequence(
        &self,
        id: &str,
        seq: u64,
        now: i64,
    ) -> Result<bool, StoreError> {
        sessions::advance_session_sequence(self, id, seq, now).await
    }

    async fn close_device_sessions(&self, device_id: &str) -> Result<u64, StoreError> {
        sessions::close_device_sessions(self, device_id).await
    }

    async fn delete_expired_sessions(&self, now: i64) -> Result<u64, StoreError> {
        sessions::delete_expired_sessions(self, now).await
    }

    async fn create_round(
        &self,
        round: &RoundRecord,
        selected: &[String],
    ) -> Result<(), StoreError> {
        rounds::create_round(self, round, selected).await
    }

    async fn get_round(&self, id: u64) -> Result<Option<RoundRecord>, StoreError> {
        rounds::get_round(self, id).await
    }

    async fn latest_round(&self) -> Result<Option<RoundRecord>, StoreError> {
        rounds::latest_round(self).await
    }

    async fn list_rounds(&self, limit: u32) -> Result<Vec<RoundRecord>, StoreError> {
        rounds::list_rounds(self, limit).await
    }

    async fn transition_round(
        &self,
        id: u64,
        from: RoundState,
        to: RoundState,
        now: i64,
        outcome_json: Option<&str>,
    ) -> Result<bool, StoreError> {
        rounds::transition_round(self, id, from, to, now, outcome_json).await
    }

    async fn reopen_round(&self, id: u64, deadline: i64, now: i64) -> Result<bool, StoreError> {
        rounds::reopen_round(self, id, deadline, now).await
    }

    async fn discard_closed_envelopes(&self) -> Result<u64, StoreError> {
        rounds::discard_closed_envelopes(self).await
    }

    async fn participants(&self, round_id: u64) -> Result<Vec<ParticipantRecord>, StoreError> {
        rounds::participants(self, round_id).await
    }

    async fn participant_states(
        &self,
        round_id: u64,
    ) -> Result<Vec<ParticipantRecord>, StoreError> {
        rounds::participant_states(self, round_id).await
    }

    async fn participant_state(
        &self,
        round_id: u64,
        device_id: &str,
    ) -> Result<Option<ParticipantRecord>, StoreError> {
        rounds::participant_state(self, round_id, device_id).await
    }

    async fn record_submission(
        &self,
        round_id: u64,
        device_id: &str,
        envelope: &[u8],
        now: i64,
    ) -> Result<SubmissionOutcome, StoreError> {
        rounds::record_submission(self, round_id, device_id, envelope, now).await
    }

    async fn submission_count(&self, round_id: u64) -> Result<u64, StoreError> {
        rounds::submission_count(self, round_id).await
    }

    async fn set_verdicts(
        &self,
        round_id: u64,
        verdicts: &[VerdictRecord],
    ) -> Result<(), StoreError> {
        rounds::set_verdicts(self, round_id, verdicts).await
    }

    async fn insert_model(&self, model: &ModelRecord) -> Result<(), StoreError> {
        models::insert_model(self, model).await
    }

    async fn get_model(&self, version: u64) -> Result<Option<ModelRecord>, StoreError> {
        models::get_model(self, version).await
    }

    async fn latest_model(&self) -> Result<Option<ModelRecord>, StoreError> {
        models::latest_model(self).await
    }

    async fn latest_model_summary(&self) -> Result<Option<ModelSummary>, StoreError> {
        models::latest_model_summary(self).await
    }

    async fn model_history(&self) -> Result<Vec<ModelSummary>, StoreError> {
        models::model_history(self).await
    }

    async fn set_model_metrics(
        &self,
        version: u64,
        accuracy: f64,
        loss: f64,
    ) -> Result<bool, StoreError> {
        models::set_model_metrics(self, version, accuracy, loss).await
    }

    async fn record_evaluation(&self, evaluation: &EvaluationRecord) -> Result<(), StoreError> {
        models::record_evaluation(self, evaluation).await
    }

    async fn evaluation_history(&self) -> Result<Vec<EvaluationSummary>, StoreError> {
        models::evaluation_history(self).await
    }

    async fn append_audit(
        &self,
        draft: &AuditDraft,
        link: &AuditLink,
    ) -> Result<AuditEntry, StoreError> {
        audit::append_audit(self, draft, link).await
    }

    async fn audit_entries(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        audit::audit_entries(self, after_seq, limit).await
    }

    async fn audit_head(&self) -> Result<Option<AuditEntry>, StoreError> {
        audit::audit_head(self).await
    }

    async fn insert_checkpoint(&self, checkpoint: &CheckpointRecord) -> Result<(), StoreError> {
        audit::insert_checkpoint(self, checkpoint).await
    }

    async fn checkpoints(&self) -> Result<Vec<CheckpointRecord>, StoreError> {
        audit::checkpoints(self).await
    }

    async fn acquire_lease(
        &self,
        holder: &str,
        address: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<CoordinatorLease, StoreError> {
        sqlx::query(coordination::ACQUIRE_LEASE)
            .bind(holder)
            .bind(address)
            .bind(now)
            .bind(expires_at)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        self.coordinator_lease()
            .await?
            .ok_or_else(|| StoreError::Corrupt("the coordinator lease vanished".to_owned()))
    }

    async fn coordinator_lease(&self) -> Result<Option<CoordinatorLease>, StoreError> {
        let found = sqlx::query(coordination::READ_LEASE)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        found.as_ref().map(coordination::lease).transpose()
    }

    async fn release_lease(&self, holder: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(coordination::RELEASE_LEASE)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_training_control(
        &self,
        control: TrainingControl,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(coordination::SET_TRAINING_CONTROL)
            .bind(control.as_str())
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn training_control(&self) -> Result<Option<TrainingControl>, StoreError> {
        let found: Option<String> = sqlx::query_scalar(coordination::READ_TRAINING_CONTROL)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        found.map(|text| text.parse()).transpose()
    }
}
