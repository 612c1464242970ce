//! The plain data types that cross the [`Store`](crate::Store) trait.
//!
//! Types holding sealed or secret-derived material (sessions, participants with envelopes, model
//! bytes) deliberately do not implement `Serialize`, so they cannot end up in an admin API response
//! by accident.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::StoreError;

/// A single-use enrollment token, as stored: only the hash of the secret token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenRecord {
    /// Public identifier, shown to the administrator.
    pub id: String,
    /// Hash of the secret token, computed by the server.
    #[serde(skip_serializing)]
    pub hash: String,
    /// Free text naming the intended device.
    pub label: String,
    /// When the token was created.
    pub created_at: i64,
    /// The token is refused from this instant on.
    pub expires_at: i64,
    /// When an enrollment consumed the token.
    pub used_at: Option<i64>,
    /// The device that consumed the token.
    pub used_by: Option<String>,
    /// When an administrator revoked the token.
    pub revoked_at: Option<i64>,
}

/// A device's public keys and the suites they belong to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceKeys {
    /// KEM suite name, e.g. `ML-KEM-768`.
    pub kem_suite: String,
    /// The device's long-term KEM public key.
    pub kem_public_key: Vec<u8>,
    /// Signature suite name, e.g. `ML-DSA-65`.
    pub signature_suite: String,
    /// The device's signature verifying key.
    pub verifying_key: Vec<u8>,
}

/// A device about to be enrolled.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDevice {
    /// Device id chosen by the server.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// The public keys presented at enrollment.
    pub keys: DeviceKeys,
}

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRecord {
    /// Device id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Current public keys.
    pub keys: DeviceKeys,
    /// When the device enrolled.
    pub enrolled_at: i64,
    /// When the device was revoked.
    pub revoked_at: Option<i64>,
    /// When the device last made an authenticated request.
    pub last_seen_at: Option<i64>,
    /// Starts at 1 and increments with every key rotation.
    pub key_version: u32,
    /// The enrollment token the device consumed.
    pub token_id: Option<String>,
}

/// Life-cycle state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// The server answered the hello; the device has not confirmed yet.
    Pending,
    /// The device confirmed; sealed records may flow.
    Established,
    /// Closed by revocation or shutdown; nothing more is accepted.
    Closed,
}

impl SessionState {
    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Established => "established",
            Self::Closed => "closed",
        }
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(Self::Pending),
            "established" => Ok(Self::Established),
            "closed" => Ok(Self::Closed),
            other => Err(StoreError::Corrupt(format!(
                "unknown session state {other:?}"
            ))),
        }
    }
}

/// A handshake session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// Session id.
    pub id: String,
    /// The device the session belongs to.
    pub device_id: String,
    /// Life-cycle state.
    pub state: SessionState,
    /// The nonce from the device's hello; unique per device, so a replayed hello is refused.
    pub client_nonce: Vec<u8>,
    /// Session keys and transcript state, sealed by the server.
    pub sealed_state: Vec<u8>,
    /// When the hello arrived.
    pub created_at: i64,
    /// The device must confirm before this instant.
    pub confirm_deadline: i64,
    /// The session is refused from this instant on.
    pub expires_at: i64,
    /// The highest record sequence number accepted so far.
    pub last_seq: u64,
}

/// Life-cycle state of a federated-learning round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoundState {
    /// Collecting submissions.
    Open,
    /// One replica is aggregating in the enclave.
    Aggregating,
    /// A new global model was published.
    Completed,
    /// Aggregation failed (too few updates, enclave failure); may be re-opened.
    Failed,
    /// Abandoned by an administrator.
    Cancelled,
}

impl RoundState {
    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Aggregating => "aggregating",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the round is over (sets `closed_at` when entered).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

impl fmt::Display for RoundState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RoundState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "aggregating" => Ok(Self::Aggregating),
            "completed" => Ok(Self::Completed),
            "failed" => Ok(Self::Failed),
            "cancelled" => Ok(Self::Cancelled),
            other => Err(StoreError::Corrupt(format!(
                "unknown round state {other:?}"
            ))),
        }
    }
}

/// A federated-learning round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRecord {
    /// Round id, chosen by the round controller.
    pub id: u64,
    /// Life-cycle state.
    pub state: RoundState,
    /// The global model version devices train from.
    pub base_model_version: u64,
    /// Training and defense configuration, as JSON.
    pub config_json: String,
    /// Fewer accepted updates than this fail the round.
    pub min_updates: u32,
    /// Collection stops early at this many submissions.
    pub target_updates: u32,
    /// When the current attempt opened.
    pub opened_at: i64,
    /// Submissions are refused from this instant on.
    pub deadline: i64,
    /// When the round entered a terminal state.
    pub closed_at: Option<i64>,
    /// 1 for the first attempt, incremented by every re-open.
    pub attempt: u32,
    /// Aggregation outcome (model digest, counts, failure reason), as JSON.
    pub outcome_json: Option<String>,
}

/// A device selected for a round, with its submission and verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct ParticipantRecord {
    /// The round.
    pub round_id: u64,
    /// The selected device.
    pub device_id: String,
    /// When the device's envelope was stored.
    pub submitted_at: Option<i64>,
    /// The sealed update envelope, opaque to the host.
    pub envelope: Option<Vec<u8>>,
    /// The enclave's verdict, e.g. `accepted` or `rejected`.
    pub verdict: Option<String>,
    /// Why the update was rejected.
    pub reason: Option<String>,
}

/// What [`Store::record_submission`](crate::Store::record_submission) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubmissionOutcome {
    /// The envelope was stored.
    Stored,
    /// The device is not a participant of this round.
    NotSelected,
    /// The device already submitted in this round.
    AlreadySubmitted,
    /// The round is not collecting submissions.
    RoundNotOpen,
    /// The round's deadline has passed.
    DeadlinePassed,
    /// No round has this id.
    UnknownRound,
}

/// The enclave's verdict on one device's update.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerdictRecord {
    /// The device.
    pub device_id: String,
    /// The verdict, e.g. `accepted` or `rejected`.
    pub verdict: String,
    /// Why the update was rejected.
    pub reason: Option<String>,
}

/// A global model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRecord {
    /// Model version, increasing.
    pub version: u64,
    /// The round that produced it (0 for the initial model).
    pub round_id: u64,
    /// Architecture name, e.g. `mnist-2nn`.
    pub architecture: String,
    /// Serialized weights.
    pub bytes: Vec<u8>,
    /// The enclave-signed certificate over the model, as JSON.
    pub certificate_json: String,
    /// When the model was published.
    pub created_at: i64,
    /// Test accuracy, once evaluated.
    pub accuracy: Option<f64>,
    /// Test loss, once evaluated.
    pub loss: Option<f64>,
}

/// A global model without its bytes and certificate, for history views.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSummary {
    /// Model version.
    pub version: u64,
    /// The round that produced it.
    pub round_id: u64,
    /// Architecture name.
    pub architecture: String,
    /// When the model was published.
    pub created_at: i64,
    /// Test accuracy, once evaluated.
    pub accuracy: Option<f64>,
    /// Test loss, once evaluated.
    pub loss: Option<f64>,
}

/// One device's evaluation of one global model version.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationRecord {
    /// The evaluated global model version.
    pub model_version: u64,
    /// The round in which the device evaluated it.
    pub round_id: u64,
    /// The evaluating device.
    pub device_id: String,
    /// Held-out examples the device evaluated on (> 0).
    pub examples: u64,
    /// Named scalar metrics (e.g. "accuracy", "loss"); names unique, values finite.
    pub metrics: Vec<(String, f64)>,
    /// When the evaluation was reported.
    pub created_at: i64,
}

/// The example-weighted mean of one metric over every device that evaluated one model version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvaluationSummary {
    /// The evaluated global model version.
    pub model_version: u64,
    /// Metric name.
    pub metric: String,
    /// Σ value·examples / Σ examples over the reporting devices.
    pub mean: f64,
    /// Σ examples.
    pub examples: u64,
    /// How many devices reported this metric for this version.
    pub devices: u64,
}

/// An audit event before it is linked into the chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditDraft {
    /// When the event happened.
    pub at: i64,
    /// Event kind, e.g. `token.used`.
    pub kind: String,
    /// Who caused it (admin, device id, server).
    pub actor: String,
    /// What it concerns (token id, device id, round id).
    pub subject: String,
    /// Event details, as JSON.
    pub detail_json: String,
}

/// An entry of the hash-chained audit ledger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// Position in the chain, starting at 1 without gaps.
    pub seq: u64,
    /// When the event happened.
    pub at: i64,
    /// Event kind.
    pub kind: String,
    /// Who caused it.
    pub actor: String,
    /// What it concerns.
    pub subject: String,
    /// Event details, as JSON.
    pub detail_json: String,
    /// The previous entry's hash ([`GENESIS_HASH`](crate::GENESIS_HASH) for seq 1).
    pub prev_hash: String,
    /// This entry's hash, as computed by the server's link function.
    pub hash: String,
}

/// A signed checkpoint of the audit chain head.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointRecord {
    /// The seq of the head entry at signing time.
    pub seq: u64,
    /// That entry's hash.
    pub head_hash: String,
    /// The server's signature over the checkpoint.
    pub signature: Vec<u8>,
    /// The verifying key the signature checks against.
    pub signer_key: Vec<u8>,
    /// When the checkpoint was signed.
    pub created_at: i64,
}

/// Which server replica coordinates: it alone runs the round controller and the enclave, until
/// its lease expires (see [`Store::acquire_lease`](crate::Store::acquire_lease)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CoordinatorLease {
    /// The replica's instance name (unique per process start).
    pub holder: String,
    /// Where the other replicas reach it (`host:port` of its HTTPS listener).
    pub address: String,
    /// Grows by one each time the lease changes hands.
    pub epoch: u64,
    /// When this holder took the lease.
    pub acquired_at: i64,
    /// When the lease lapses unless renewed (the holder's clock).
    pub expires_at: i64,
}

impl CoordinatorLease {
    /// Whether the lease still holds at `now`.
    pub fn is_live(&self, now: i64) -> bool {
        now < self.expires_at
    }
}

/// The administrator's last word on training, which outlives the replica that heard it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainingControl {
    /// Rounds open whenever enough devices are active.
    Started,
    /// No new round opens; an open one finishes.
    Paused,
}

impl TrainingControl {
    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Paused => "paused",
        }
    }
}

impl FromStr for TrainingControl {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "started" => Ok(Self::Started),
            "paused" => Ok(Self::Paused),
            other => Err(StoreError::Corrupt(format!(
                "unknown training control {other:?}"
            ))),
        }
    }
}
