//! QFLARE's persistent state, behind one object-safe [`Store`] trait.
//!
//! The store owns everything the server must not forget across a restart and must share between
//! replicas: enrolled devices and their public keys, single-use enrollment tokens (only their
//! hashes), handshake sessions, federated-learning rounds with their participants and sealed update
//! envelopes, the global models with the devices' federated evaluations of them, and the
//! hash-chained audit ledger with its signed checkpoints; and, for replicas, which one coordinates
//! (a lease with an expiry) and the administrator's last start or pause of training.
//!
//! It is deliberately ignorant of cryptography. Keys, hashes, sealed blobs and signatures are opaque
//! `String`s and byte vectors, timestamps are `i64` Unix seconds handed in by the caller, and the
//! audit chain's hash function is a closure the server passes to [`Store::append_audit`]. What the
//! store *does* guarantee is the atomicity the protocol's security rests on: a token is consumed at
//! most once, a session's record sequence number only moves forward, a submission lands only while
//! its round is open, a round changes state by compare-and-set, and the audit chain has no gaps or
//! forks — all of it also when several server processes share one PostgreSQL database.
//!
//! How the parts fit:
//! - [`open`] / [`open_postgres_in_schema`] pick a backend from the URL, connect, run the embedded
//!   migrations and hand back an `Arc<dyn Store>`.
//! - `records` defines the plain data types crossing the trait, `error` the one error enum
//!   ([`StoreError`]) into which every backend failure is mapped, so no `sqlx` type leaks out.
//! - `sqlite` ([`SqliteStore`]) and `postgres` ([`PostgresStore`]) implement the trait, each with its
//!   own SQL; `row` holds the column decoding and integer-range checks they share.
//! - `coordination` holds the lease and training-control SQL, the same for both backends.
//! - `migrate` runs the sqlx migrations embedded from `migrations/sqlite` and `migrations/postgres`,
//!   and adopts a database created before them (schema version 1 in `qflare_schema_version`).
//! - [`conformance`] is one behavioural test suite, written against the trait, that
//!   `tests/conformance.rs` runs against both backends and that other crates may reuse.

#![forbid(unsafe_code)]

mod coordination;
mod error;
mod migrate;
mod postgres;
mod records;
mod row;
mod sqlite;

#[doc(hidden)]
pub mod conformance;

use std::sync::Arc;

pub use error::{StoreError, TokenRejection};
pub use postgres::{PostgresStore, drop_postgres_schema};
pub use records::{
    AuditDraft, AuditEntry, CheckpointRecord, CoordinatorLease, DeviceKeys, DeviceRecord,
    EvaluationRecord, EvaluationSummary, ModelRecord, ModelSummary, NewDevice, ParticipantRecord,
    RoundRecord, RoundState, SessionRecord, SessionState, SubmissionOutcome, TokenRecord,
    TrainingControl, VerdictRecord,
};
pub use sqlite::SqliteStore;

/// The hash of the (non-existent) entry before the first audit entry: 64 `'0'` characters. The
/// store treats hashes as opaque text; the server's entries hash to 96 hex characters (SHA-384).
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The audit chain's link function: `link(seq, prev_hash, draft)` returns the hash of the entry at
/// `seq`. The server supplies it (a SHA-384 transcript over the entry), so the store needs no
/// cryptography.
pub type AuditLink = dyn Fn(u64, &str, &AuditDraft) -> String + Send + Sync;

/// Opens the store at `url` and brings its schema up to date.
///
/// Accepted forms:
/// - `sqlite://path/to/file.db` (relative) or `sqlite:///abs/path.db`: the file and its parent
///   directory are created if missing, and the file is restricted to its owner (mode 0600);
/// - `sqlite::memory:`: a private in-memory database, for tests;
/// - `postgres://…` or `postgresql://…`: tables live in the connection's default `search_path`.
///
/// Any other scheme is a [`StoreError::Config`].
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url, None).await?))
    } else {
        Err(StoreError::Config(
            "store URL must start with sqlite:, postgres:// or postgresql://".to_owned(),
        ))
    }
}

/// Opens a PostgreSQL store whose tables live in `schema`, creating the schema if it is missing.
///
/// Every pooled connection gets `search_path` set to `schema`, so independent runs (tests, staging
/// next to production) can share one database without seeing each other. `schema` must be a plain
/// lower-case identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes), because it is spliced into DDL.
pub async fn open_postgres_in_schema(
    url: &str,
    schema: &str,
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(PostgresStore::open(url, Some(schema)).await?))
}

/// Everything the QFLARE server persists. Object safe; use it as `Arc<dyn Store>`.
///
/// Methods returning `bool` report whether a conditional change took effect: `false` means the
/// precondition did not hold (unknown id, wrong state, stale sequence number), which callers treat
/// as a protocol refusal, not as a storage failure.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    // --- enrollment tokens

    /// Stores a new enrollment token. A duplicate id or hash is a [`StoreError::Conflict`].
    async fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// All tokens, newest first.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Revokes an unused token. `false` if it is unknown, already used or already revoked.
    async fn revoke_token(&self, id: &str, now: i64) -> Result<bool, StoreError>;
    /// Atomically consumes the token with this hash and inserts the device, in one transaction.
    ///
    /// Of any number of concurrent callers presenting the same token — also from several processes
    /// sharing one PostgreSQL database — exactly one succeeds; the others get
    /// [`StoreError::TokenRejected`] with the reason. The new device starts at key version 1.
    async fn enroll_with_token(
        &self,
        token_hash: &str,
        now: i64,
        device: &NewDevice,
    ) -> Result<DeviceRecord, StoreError>;

    // --- devices

    /// The device with this id, if enrolled.
    async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError>;
    /// All devices, in enrollment order.
    async fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;
    /// Revokes a device and closes all its sessions. `false` if unknown or already revoked.
    async fn revoke_device(&self, id: &str, now: i64) -> Result<bool, StoreError>;
    /// Replaces a device's public keys and increments its key version, and closes every session
    /// of the device, in one transaction; the rotation counts as the device being seen at `now`.
    /// Compare-and-set on the key version: of two rotations authorised by the same old key
    /// (`expected_key_version`), at most one succeeds, also at two replicas. `false` if the device
    /// is unknown, revoked, or no longer at `expected_key_version`.
    async fn rotate_device_keys(
        &self,
        id: &str,
        expected_key_version: u32,
        keys: &DeviceKeys,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Records that the device was seen at `now` (never moves `last_seen_at` backwards).
    /// An unknown device is [`StoreError::NotFound`].
    async fn touch_device(&self, id: &str, now: i64) -> Result<(), StoreError>;

    // --- sessions

    /// Inserts a session in the `Pending` state (the record's `state` is ignored). A second hello
    /// with the same `(device_id, client_nonce)`, or a duplicate id, is a [`StoreError::Conflict`];
    /// an unknown device is [`StoreError::NotFound`].
    async fn insert_pending_session(&self, session: &SessionRecord) -> Result<(), StoreError>;
    /// The session with this id, if any.
    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// Moves a session from pending to established and replaces its sealed state, only if it is
    /// still pending and `now < confirm_deadline`. `false` otherwise (e.g. a replayed confirm).
    async fn establish_session(
        &self,
        id: &str,
        sealed_state: &[u8],
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Compare-and-set of the last accepted record sequence number: succeeds only if the session is
    /// established, `now < expires_at` and the stored `last_seq < seq`. Of concurrent callers with
    /// the same `seq`, exactly one wins.
    async fn advance_session_sequence(
        &self,
        id: &str,
        seq: u64,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Closes every open (pending or established) session of the device; returns how many.
    async fn close_device_sessions(&self, device_id: &str) -> Result<u64, StoreError>;
    /// Deletes sessions that expired (`expires_at <= now`) and pending sessions whose confirmation
    /// deadline passed; returns how many.
    async fn delete_expired_sessions(&self, now: i64) -> Result<u64, StoreError>;

    // --- rounds

    /// Inserts the round and one participant row per selected device, in one transaction. Round ids
    /// are chosen by the caller; a duplicate id (or a device selected twice) is a
    /// [`StoreError::Conflict`], an unknown device [`StoreError::NotFound`].
    async fn create_round(
        &self,
        round: &RoundRecord,
        selected: &[String],
    ) -> Result<(), StoreError>;
    /// The round with this id, if any.
    async fn get_round(&self, id: u64) -> Result<Option<RoundRecord>, StoreError>;
    /// The round with the highest id.
    async fn latest_round(&self) -> Result<Option<RoundRecord>, StoreError>;
    /// At most `limit` rounds, newest (highest id) first.
    async fn list_rounds(&self, limit: u32) -> Result<Vec<RoundRecord>, StoreError>;
    /// Compare-and-set of the round state, so that only one replica aggregates a round. Sets
    /// `closed_at = now` when `to` is terminal and `outcome_json` when given. `false` if the current
    /// state is not `from` (or the round is unknown).
    async fn transition_round(
        &self,
        id: u64,
        from: RoundState,
        to: RoundState,
        now: i64,
        outcome_json: Option<&str>,
    ) -> Result<bool, StoreError>;
    /// Re-opens an `Open` or `Aggregating` round for a retry in a new enclave boot: state `Open`,
    /// `attempt + 1`, `opened_at = now`, the new `deadline`, `closed_at` and `outcome_json`
    /// cleared, and every participant's submission cleared with its envelope and verdict — the
    /// envelopes were sealed to the keys of an enclave boot that is gone, so the devices submit
    /// again. The selected devices stay. `false` if the round is closed (completed, failed,
    /// cancelled) or unknown.
    async fn reopen_round(&self, id: u64, deadline: i64, now: i64) -> Result<bool, StoreError>;
    /// Deletes the stored envelope of every participant of every closed (completed, failed or
    /// cancelled) round, keeping the rest of the row (when it submitted, its verdict); returns
    /// how many envelopes went. A closed round's envelopes serve nothing, and kept they are
    /// what a host would replay to re-run an old round; idempotent, so a caller that crashed
    /// between closing a round and this call catches up at the next.
    async fn discard_closed_envelopes(&self) -> Result<u64, StoreError>;
    /// The round's participants, ordered by device id.
    async fn participants(&self, round_id: u64) -> Result<Vec<ParticipantRecord>, StoreError>;
    /// The round's participants without their envelopes (`envelope` is `None`), ordered by
    /// device id: what the poll path and the admin view need, without reading every stored
    /// update (each as large as the model) per request.
    async fn participant_states(&self, round_id: u64)
    -> Result<Vec<ParticipantRecord>, StoreError>;
    /// One participant of the round without its envelope, if the device was selected: one
    /// indexed row, so a device's poll and the check before an upload cost the same whatever
    /// the round's size.
    async fn participant_state(
        &self,
        round_id: u64,
        device_id: &str,
    ) -> Result<Option<ParticipantRecord>, StoreError>;
    /// Records a submission with `envelope` — what the caller keeps of the sealed update envelope
    /// (the server keeps its SHA-256: the envelope itself goes to the enclave boot it was sealed
    /// to and is useless to any other) — atomically with respect to round transitions: only if
    /// the round is `Open`, `now < deadline`, the device is a selected participant and has not
    /// submitted yet. The outcome says which condition failed first, in that order.
    async fn record_submission(
        &self,
        round_id: u64,
        device_id: &str,
        envelope: &[u8],
        now: i64,
    ) -> Result<SubmissionOutcome, StoreError>;
    /// How many participants of the round have submitted.
    async fn submission_count(&self, round_id: u64) -> Result<u64, StoreError>;
    /// Records the enclave's verdicts, all or nothing. A verdict for a device that is not a
    /// participant of the round is [`StoreError::NotFound`].
    async fn set_verdicts(
        &self,
        round_id: u64,
        verdicts: &[VerdictRecord],
    ) -> Result<(), StoreError>;

    // --- models

    /// Stores a global model. A duplicate version is a [`StoreError::Conflict`].
    async fn insert_model(&self, model: &ModelRecord) -> Result<(), StoreError>;
    /// The model with this version, if any.
    async fn get_model(&self, version: u64) -> Result<Option<ModelRecord>, StoreError>;
    /// The model with the highest version.
    async fn latest_model(&self) -> Result<Option<ModelRecord>, StoreError>;
    /// The model with the highest version, without its bytes and certificate: what a device's
    /// poll needs to know, without reading the model.
    async fn latest_model_summary(&self) -> Result<Option<ModelSummary>, StoreError>;
    /// Every model without its bytes and certificate, ascending by version.
    async fn model_history(&self) -> Result<Vec<ModelSummary>, StoreError>;
    /// Records a model's evaluation. `false` if the version is unknown.
    async fn set_model_metrics(
        &self,
        version: u64,
        accuracy: f64,
        loss: f64,
    ) -> Result<bool, StoreError>;
    /// Stores a device's evaluation of a model version, replacing any earlier one by the same device
    /// for the same version (all of its metrics, atomically). An unknown model version is
    /// [`StoreError::NotFound`].
    ///
    /// Zero `examples` or a non-finite metric value is [`StoreError::OutOfRange`], a metric name
    /// given twice [`StoreError::Conflict`]; either way nothing changes.
    async fn record_evaluation(&self, evaluation: &EvaluationRecord) -> Result<(), StoreError>;
    /// Per model version and metric, the example-weighted mean over devices, ascending by version
    /// then metric name.
    ///
    /// Metric names compare bytewise (as SQLite does; PostgreSQL with the `C` collation), so both
    /// backends return the same order.
    async fn evaluation_history(&self) -> Result<Vec<EvaluationSummary>, StoreError>;

    // --- audit ledger

    /// Appends one entry to the hash chain, in one serialized transaction: reads the head (`seq`,
    /// `hash`; an empty ledger has head seq 0 and hash [`GENESIS_HASH`]), computes
    /// `hash = link(head + 1, prev_hash, draft)`, inserts and returns the entry. Appends from
    /// concurrent tasks and from several processes sharing PostgreSQL form one gap-free chain.
    async fn append_audit(
        &self,
        draft: &AuditDraft,
        link: &AuditLink,
    ) -> Result<AuditEntry, StoreError>;
    /// At most `limit` entries with `seq > after_seq`, ascending.
    async fn audit_entries(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError>;
    /// The newest entry, if the ledger is not empty.
    async fn audit_head(&self) -> Result<Option<AuditEntry>, StoreError>;
    /// Stores a signed checkpoint of the chain head at `checkpoint.seq`. A second checkpoint at the
    /// same seq is a [`StoreError::Conflict`], one for a seq not in the ledger
    /// [`StoreError::NotFound`].
    async fn insert_checkpoint(&self, checkpoint: &CheckpointRecord) -> Result<(), StoreError>;
    /// Every checkpoint, ascending by seq.
    async fn checkpoints(&self) -> Result<Vec<CheckpointRecord>, StoreError>;

    // --- coordination between replicas

    /// Takes or renews the coordinator lease for `holder` (reached at `address`) until
    /// `expires_at`. It succeeds when nobody holds the lease, when `holder` does, or when the
    /// holder's lease expired by `now`; otherwise nothing changes. Returns the lease as it stands
    /// afterwards: the caller coordinates exactly when its `holder` is the one returned. Atomic,
    /// also between replicas: of two racing for an expired lease, one gets it.
    async fn acquire_lease(
        &self,
        holder: &str,
        address: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<CoordinatorLease, StoreError>;
    /// The lease as it stands, live or expired; `None` before anyone coordinated.
    async fn coordinator_lease(&self) -> Result<Option<CoordinatorLease>, StoreError>;
    /// Lets the lease lapse now if `holder` holds it (a clean shutdown), so that another replica
    /// need not wait for it to expire. `false` if `holder` did not hold it.
    async fn release_lease(&self, holder: &str) -> Result<bool, StoreError>;
    /// Records the administrator's start or pause of training.
    async fn set_training_control(
        &self,
        control: TrainingControl,
        now: i64,
    ) -> Result<(), StoreError>;
    /// The administrator's last start or pause; `None` if there was none (the configuration's
    /// `auto_start` decides).
    async fn training_control(&self) -> Result<Option<TrainingControl>, StoreError>;
}

/// Builds the entry that follows the head `(head_seq, head_hash)`; the caller's `link` computes
/// its hash.
pub(crate) fn next_audit_entry(
    head_seq: u64,
    head_hash: String,
    draft: &AuditDraft,
    link: &AuditLink,
) -> Result<AuditEntry, StoreError> {
    let seq = head_seq
        .checked_add(1)
        .filter(|seq| i64::try_from(*seq).is_ok())
        .ok_or(StoreError::OutOfRange("audit seq"))?;
    let hash = link(seq, &head_hash, draft);
    Ok(AuditEntry {
        seq,
        at: draft.at,
        kind: draft.kind.clone(),
        actor: draft.actor.clone(),
        subject: draft.subject.clone(),
        detail_json: draft.detail_json.clone(),
        prev_hash: head_hash,
        hash,
    })
}
