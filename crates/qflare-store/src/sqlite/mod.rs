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

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Sqlite, SqlitePool, Transaction};

use crate::error::backend;
use crate::{
    AuditDraft, AuditEntry, AuditLink, CheckpointRecord, CoordinatorLease, DeviceKeys,
    DeviceRecord, EvaluationRecord, EvaluationSummary, GENESIS_HASH, ModelRecord, ModelSummary,
    NewDevice, ParticipantRecord, RoundRecord, RoundState, SessionRecord, Store, StoreError,
    SubmissionOutcome, TokenRecord, TrainingControl, VerdictRecord, coordination,
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
