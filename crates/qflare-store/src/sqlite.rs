//! The SQLite backend: the embedded default for a single server process.
//!
//! Concurrency rests on SQLite's single-writer lock. Every multi-statement write runs in a
//! `BEGIN IMMEDIATE` transaction, which takes the write lock up front: a deferred transaction that
//! reads first and writes later can fail with `SQLITE_BUSY` at the upgrade no matter how long the
//! busy timeout is, while an immediate one simply waits (up to the 5 s busy timeout) for its turn.
//! Inside such a transaction nothing can change under us, so read-then-write sequences (the audit
//! head, the submission checks) are serialized, also against other processes opening the same file.
//! Single-statement writes are atomic on their own and wait on the same lock.
//!
//! WAL mode lets readers proceed while one writer commits. The SQL uses `$n` placeholders, which
//! SQLite accepts like PostgreSQL does, so the two backends' statements read the same.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Sqlite, SqlitePool, Transaction};

use crate::error::{backend, write_error};
use crate::row::{self, Col, db_int};
use crate::{
    AuditDraft, AuditEntry, AuditLink, CheckpointRecord, DeviceKeys, DeviceRecord, GENESIS_HASH,
    ModelRecord, ModelSummary, NewDevice, ParticipantRecord, RoundRecord, RoundState,
    SessionRecord, Store, StoreError, SubmissionOutcome, TokenRecord, VerdictRecord,
};

/// How long a statement waits for another connection's (or process's) write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections in a file-backed pool. Writes are serialized by SQLite anyway; a few connections
/// let reads run beside them.
const FILE_POOL_SIZE: u32 = 4;

/// The SQLite implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens `sqlite://path`, `sqlite:///abs/path` or `sqlite::memory:` and migrates it; the same as
    /// [`crate::open`] but returning the concrete type.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let (options, pool) = if url == "sqlite::memory:" {
            // Each connection to `:memory:` would be its own database, so the pool holds exactly
            // one connection and never lets it expire.
            let options = SqliteConnectOptions::from_str(url).map_err(backend)?;
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
            (options, pool)
        } else {
            let path = file_path(url)?;
            prepare_file(&path).await?;
            let options = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
            (
                options,
                SqlitePoolOptions::new().max_connections(FILE_POOL_SIZE),
            )
        };
        let options = options.foreign_keys(true).busy_timeout(BUSY_TIMEOUT);
        let pool = pool.connect_with(options).await.map_err(backend)?;
        let store = Self { pool };
        store.migrate().await?;
        tracing::info!(backend = "sqlite", "store opened");
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

    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)
    }

    /// Applies the embedded migrations (adopting a database from before them, see
    /// [`crate::migrate`]) and seeds the audit chain's genesis head, in one immediate transaction
    /// so that processes opening the same file at once migrate one after the other.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        crate::migrate::sqlite(&mut tx).await?;
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

/// The database path inside a `sqlite:` URL.
fn file_path(url: &str) -> Result<PathBuf, StoreError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or_default();
    if rest.is_empty() || rest.contains('?') {
        return Err(StoreError::Config(
            "SQLite URL must be sqlite://path/to/file.db or sqlite::memory: (no query parameters)"
                .to_owned(),
        ));
    }
    Ok(PathBuf::from(rest))
}

/// Creates the database file and its directory owner-only before SQLite touches them: the file
/// holds device keys and sealed envelopes, and SQLite gives its `-wal` and `-shm` companions the
/// main file's permissions.
async fn prepare_file(path: &Path) -> Result<(), StoreError> {
    let path = path.to_owned();
    let io = |error: std::io::Error| StoreError::Config(format!("database file: {error}"));
    tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir).map_err(io)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&path).map_err(io)?;
        // An existing file may have been created with looser permissions; tighten it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        Ok(())
    })
    .await
    .map_err(|error| StoreError::Config(format!("database file: {error}")))?
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
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
                 key_version = key_version + 1, last_seen_at = MAX(COALESCE(last_seen_at, $5), $5)
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
            "UPDATE devices SET last_seen_at = MAX(COALESCE(last_seen_at, $1), $1) WHERE id = $2",
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
        // The immediate transaction holds the write lock from the round check to the update, so a
        // concurrent `transition_round` lands either before (we refuse) or after (it sees us).
        let mut tx = self.write_tx().await?;
        let round = sqlx::query("SELECT state, deadline FROM rounds WHERE id = $1")
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
        // BEGIN IMMEDIATE makes read-head, link, insert, move-head one serialized step.
        let mut tx = self.write_tx().await?;
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
