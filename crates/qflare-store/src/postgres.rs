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

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres, Transaction};

use crate::error::{backend, write_error};
use crate::row::{self, Col, db_int};
use crate::{
    AuditDraft, AuditEntry, AuditLink, CheckpointRecord, DeviceKeys, DeviceRecord, GENESIS_HASH,
    ModelRecord, ModelSummary, NewDevice, ParticipantRecord, RoundRecord, RoundState,
    SessionRecord, Store, StoreError, SubmissionOutcome, TokenRecord, VerdictRecord,
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
        .execute(&self.pool)
        .await
        .map_err(|e| write_error(e, "token id or hash", "token"))?;
        Ok(())
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at DESC, id DESC")
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        row::all(&rows, row::token)
    }

    async fn revoke_token(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE tokens SET revoked_at = $1
             WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn enroll_with_token(
        &self,
        token_hash: &str,
        now: i64,
        device: &NewDevice,
    ) -> Result<DeviceRecord, StoreError> {
        let mut tx = self.write_tx().await?;
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

    async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let found = sqlx::query("SELECT * FROM devices WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        found.as_ref().map(row::device).transpose()
    }

    async fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM devices ORDER BY enrolled_at, id")
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        row::all(&rows, row::device)
    }

    async fn revoke_device(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
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
        sqlx::query(
            "UPDATE sessions SET state = 'closed' WHERE device_id = $1 AND state <> 'closed'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(true)
    }

    async fn rotate_device_keys(
        &self,
        id: &str,
        keys: &DeviceKeys,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE devices
             SET kem_suite = $1, kem_public_key = $2, signature_suite = $3, verifying_key = $4,
                 key_version = key_version + 1, last_seen_at = GREATEST(last_seen_at, $5)
             WHERE id = $6 AND revoked_at IS NULL",
        )
        .bind(&keys.kem_suite)
        .bind(&keys.kem_public_key)
        .bind(&keys.signature_suite)
        .bind(&keys.verifying_key)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn touch_device(&self, id: &str, now: i64) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE devices SET last_seen_at = GREATEST(last_seen_at, $1) WHERE id = $2",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("device"));
        }
        Ok(())
    }

    async fn insert_pending_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
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
        .execute(&self.pool)
        .await
        .map_err(|e| write_error(e, "session id or (device, client nonce)", "device"))?;
        Ok(())
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let found = sqlx::query("SELECT * FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        found.as_ref().map(row::session).transpose()
    }

    async fn establish_session(
        &self,
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
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn advance_session_sequence(
        &self,
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
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn close_device_sessions(&self, device_id: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE sessions SET state = 'closed' WHERE device_id = $1 AND state <> 'closed'",
        )
        .bind(device_id)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected())
    }

    async fn delete_expired_sessions(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM sessions
             WHERE expires_at <= $1 OR (state = 'pending' AND confirm_deadline <= $1)",
        )
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected())
    }

    async fn create_round(
        &self,
        round: &RoundRecord,
        selected: &[String],
    ) -> Result<(), StoreError> {
        let round_id = db_int(round.id, "round id")?;
        let mut tx = self.write_tx().await?;
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

    async fn get_round(&self, id: u64) -> Result<Option<RoundRecord>, StoreError> {
        let found = sqlx::query("SELECT * FROM rounds WHERE id = $1")
            .bind(db_int(id, "round id")?)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        found.as_ref().map(row::round).transpose()
    }

    async fn latest_round(&self) -> Result<Option<RoundRecord>, StoreError> {
        let found = sqlx::query("SELECT * FROM rounds ORDER BY id DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        found.as_ref().map(row::round).transpose()
    }

    async fn list_rounds(&self, limit: u32) -> Result<Vec<RoundRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM rounds ORDER BY id DESC LIMIT $1")
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        row::all(&rows, row::round)
    }

    async fn transition_round(
        &self,
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
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn reopen_round(&self, id: u64, deadline: i64, now: i64) -> Result<bool, StoreError> {
        let id = db_int(id, "round id")?;
        let mut tx = self.write_tx().await?;
        let reopened = sqlx::query(
            "UPDATE rounds
             SET state = 'open', attempt = attempt + 1, opened_at = $1, deadline = $2,
                 closed_at = NULL, outcome_json = NULL
             WHERE id = $3 AND state IN ('failed', 'aggregating')",
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
        sqlx::query("UPDATE participants SET verdict = NULL, reason = NULL WHERE round_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(true)
    }

    async fn participants(&self, round_id: u64) -> Result<Vec<ParticipantRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM participants WHERE round_id = $1 ORDER BY device_id")
            .bind(db_int(round_id, "round id")?)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        row::all(&rows, row::participant)
    }

    async fn record_submission(
        &self,
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
        let mut tx = self.write_tx().await?;
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

    async fn submission_count(&self, round_id: u64) -> Result<u64, StoreError> {
        sqlx::query(
            "SELECT COUNT(*) AS n FROM participants WHERE round_id = $1 AND submitted_at IS NOT NULL",
        )
        .bind(db_int(round_id, "round id")?)
        .fetch_one(&self.pool)
        .await
        .map_err(backend)?
        .u64("n")
    }

    async fn set_verdicts(
        &self,
        round_id: u64,
        verdicts: &[VerdictRecord],
    ) -> Result<(), StoreError> {
        let round_id = db_int(round_id, "round id")?;
        let mut tx = self.write_tx().await?;
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

    async fn insert_model(&self, model: &ModelRecord) -> Result<(), StoreError> {
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
        .execute(&self.pool)
        .await
        .map_err(|e| write_error(e, "model version", "model"))?;
        Ok(())
    }

    async fn get_model(&self, version: u64) -> Result<Option<ModelRecord>, StoreError> {
        let found = sqlx::query("SELECT * FROM models WHERE version = $1")
            .bind(db_int(version, "model version")?)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        found.as_ref().map(row::model).transpose()
    }

    async fn latest_model(&self) -> Result<Option<ModelRecord>, StoreError> {
        let found = sqlx::query("SELECT * FROM models ORDER BY version DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        found.as_ref().map(row::model).transpose()
    }

    async fn model_history(&self) -> Result<Vec<ModelSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT version, round_id, architecture, created_at, accuracy, loss
             FROM models ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        row::all(&rows, row::model_summary)
    }

    async fn set_model_metrics(
        &self,
        version: u64,
        accuracy: f64,
        loss: f64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE models SET accuracy = $1, loss = $2 WHERE version = $3")
            .bind(accuracy)
            .bind(loss)
            .bind(db_int(version, "model version")?)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn append_audit(
        &self,
        draft: &AuditDraft,
        link: &AuditLink,
    ) -> Result<AuditEntry, StoreError> {
        // FOR UPDATE on the single head row serializes appenders across every connection and
        // process; a waiting appender then reads the head its predecessor committed, because
        // READ COMMITTED re-reads a row once its lock is granted.
        let mut tx = self.write_tx().await?;
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?
            .ok_or_else(|| StoreError::Corrupt("audit head row is missing".to_owned()))?;
        let entry = crate::next_audit_entry(head.u64("seq")?, head.text("hash")?, draft, link)?;
        insert_audit_entry(&mut tx, &entry).await?;
        tx.commit().await.map_err(backend)?;
        Ok(entry)
    }

    async fn audit_entries(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query("SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(db_int(after_seq, "audit seq")?)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        row::all(&rows, row::audit_entry)
    }

    async fn audit_head(&self) -> Result<Option<AuditEntry>, StoreError> {
        let found = sqlx::query("SELECT * FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        found.as_ref().map(row::audit_entry).transpose()
    }

    async fn insert_checkpoint(&self, checkpoint: &CheckpointRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO checkpoints (seq, head_hash, signature, signer_key, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(db_int(checkpoint.seq, "checkpoint seq")?)
        .bind(&checkpoint.head_hash)
        .bind(&checkpoint.signature)
        .bind(&checkpoint.signer_key)
        .bind(checkpoint.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| write_error(e, "checkpoint at this seq", "audit entry"))?;
        Ok(())
    }

    async fn checkpoints(&self) -> Result<Vec<CheckpointRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM checkpoints ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        row::all(&rows, row::checkpoint)
    }
}

async fn insert_audit_entry(
    tx: &mut Transaction<'static, Postgres>,
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
