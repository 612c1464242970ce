//! The metadata of each frame kind (see [`crate::frame`]). Blobs are listed
//! beside each type.

use qflare_protocol::SignatureSuite;
use qflare_protocol::attestation::AttestationReport;
use qflare_protocol::identity::DeviceId;
use qflare_protocol::model::ModelCertificate;
use qflare_protocol::update_encoding::UpdateEncoding;
use qflare_protocol::wire::{b64, b64_array};
use serde::{Deserialize, Serialize};

use crate::config::{AggregationConfig, AggregatorKind};
use crate::round::{ReferenceKind, RoundStats};

/// `Attest`: no blobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    /// The verifier's fresh nonce.
    #[serde(with = "b64_array")]
    pub nonce: [u8; 32],
}

/// How the process hardened itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardening {
    /// `PR_SET_DUMPABLE` is 0: no ptrace attach by same-uid processes, no core.
    pub not_dumpable: bool,
    /// `RLIMIT_CORE` is 0.
    pub no_core_files: bool,
    /// `mlockall` succeeded: secrets never reach swap.
    pub memory_locked: bool,
    /// The seccomp allow-list is installed.
    pub seccomp: bool,
}

/// `Report`: no blobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportAnswer {
    /// The signed report.
    pub report: AttestationReport,
    /// What the process did to protect itself (self-reported, not attested).
    pub hardening: Hardening,
}

/// `InitModel`: no blobs. The enclave builds model version 0 itself, so the
/// host cannot have an arbitrary starting model certified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitModelRequest {
    /// `mnist-2nn` or `mnist-cnn`.
    pub architecture: String,
    /// Initialization seed.
    pub seed: u64,
}

/// `ImportModel`: blob 0 is the admin's initial model, a safetensors file of
/// F32, F16 or BF16 tensors. The enclave decodes it (widening halves to
/// f32), refuses non-finite values, and certifies its canonical f32 encoding
/// as version 0 under `name`, answering with that encoding as blob 0. The
/// admin, not the host, chooses a federation's starting point; the host can
/// only have it certified before any round, when the server has no model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportModelRequest {
    /// The model's name (see `qflare_protocol::model::validate_model_name`).
    /// A built-in architecture's name is allowed, and then the file must
    /// have that architecture's layout.
    pub name: String,
}

/// `Certify`: blob 0 is the model. Asks a restarted enclave to endorse the
/// current model, certified by a previous boot. The previous boot is named by
/// its attestation report, which must carry this enclave's own measurement
/// and mode; in a hardware mode its evidence roots that claim in the CPU. In
/// software mode a host able to forge reports can forge this too (see
/// docs/enclave.md); every endorsement is recorded in the audit ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertifyRequest {
    /// The previous boot's certificate of the model.
    pub certificate: ModelCertificate,
    /// The report of the boot that made that certificate.
    pub previous_report: AttestationReport,
}

/// `Model`: blob 0 is the model when the request created one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelAnswer {
    /// The enclave's certificate.
    pub certificate: ModelCertificate,
}

/// A device allowed to submit in a round, with its registered key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundDevice {
    /// The device.
    pub device_id: DeviceId,
    /// Its signature suite.
    pub signature_suite: SignatureSuite,
    /// Its registered verifying key.
    #[serde(with = "b64")]
    pub verifying_key: Vec<u8>,
}

/// `BeginRound`: blob 0 is the global model (which this enclave boot must
/// have certified); optional blob 1 is the previous global model, whose
/// difference to blob 0 is the defense's reference direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeginRoundRequest {
    /// The round.
    pub round_id: u64,
    /// The version of the global model.
    pub model_version: u64,
    /// Its architecture.
    pub architecture: String,
    /// Defense and aggregator settings.
    pub config: AggregationConfig,
    /// How devices encode their updates; any other is refused as malformed.
    #[serde(default)]
    pub update_encoding: UpdateEncoding,
    /// The selected devices.
    pub devices: Vec<RoundDevice>,
    /// Local training settings, for FLTrust's reference update on the root data.
    #[serde(default)]
    pub reference_training: Option<qflare_ml::TrainConfig>,
    /// Under central DP: the sampling rate times the devices it was applied
    /// to, the noised sum's fixed denominator.
    #[serde(default)]
    pub expected_participants: Option<f64>,
}

/// `Submit`: blob 0 is the envelope (its binary encoding, or JSON from
/// devices that predate it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The device the host checked the outer signature of.
    pub device_id: DeviceId,
}

/// One device's verdict as it crosses to the host and the ledger: who,
/// `accepted`/`pending`/`rejected`, and a code from a fixed set
/// ([`crate::verdict::is_known_code`]). Nothing measured on the update (its
/// norm, cosine, score, weight or example count) crosses the boundary: the
/// host stores and shows these fields forever, and any one of those numbers
/// says something about a device's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerVerdict {
    /// The device.
    pub device_id: DeviceId,
    /// `accepted`, `pending` or `rejected`.
    pub status: String,
    /// Stable reason code (`accepted`, `clipped`, `bad_signature`, `non_finite`, ...).
    pub code: String,
}

/// The round-level numbers the host may learn. Each is either a count it
/// could tally from the per-device codes, a setting it chose, a size that
/// follows from those counts and the model's size, or the norm of the
/// aggregated update, which it can compute from the two models it holds.
/// The aggregator's other numbers (median norm, an adaptive norm bound
/// derived from it, similarity median and spread, Σ example counts) are
/// functions of individual updates — with one or two accepted devices they
/// are that device's norm, cosine or example count — and stay inside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundSummary {
    /// The round.
    pub round_id: u64,
    /// The aggregator used.
    pub aggregator: AggregatorKind,
    /// True when updates were folded on arrival rather than buffered.
    pub streaming: bool,
    /// Updates the aggregator judged.
    pub submitted: usize,
    /// Updates aggregated.
    pub accepted: usize,
    /// Updates rejected by the aggregator.
    pub rejected: usize,
    /// Accepted updates that were clipped.
    pub clipped: usize,
    /// The reference direction of the similarity check, if it ran.
    pub similarity_reference: Option<ReferenceKind>,
    /// L2 norm of the aggregated update (new model − old model).
    pub aggregated_norm: Option<f64>,
    /// Most bytes of update data held at once.
    pub peak_buffered_bytes: u64,
    /// Bytes of the streaming accumulator (0 when buffering).
    pub accumulator_bytes: u64,
    /// Central DP's parameters for the round (public settings, nothing
    /// measured on an update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::privacy::PrivacyRoundStats>,
}

impl From<&RoundStats> for RoundSummary {
    fn from(stats: &RoundStats) -> Self {
        Self {
            round_id: stats.round_id,
            aggregator: stats.aggregator,
            streaming: stats.streaming,
            submitted: stats.submitted,
            accepted: stats.accepted,
            rejected: stats.rejected,
            clipped: stats.clipped,
            similarity_reference: stats.similarity_reference,
            aggregated_norm: stats.aggregated_norm,
            peak_buffered_bytes: stats.peak_buffered_bytes,
            accumulator_bytes: stats.accumulator_bytes,
            privacy: stats.privacy.clone(),
        }
    }
}

/// `Finalize`: no blobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinalizeRequest {}

/// `Outcome` (answer to `Finalize`): blob 0 is the new model when aggregated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeAnswer {
    /// True when a new model was produced.
    pub aggregated: bool,
    /// Its certificate.
    pub certificate: Option<ModelCertificate>,
    /// Why not, when not.
    pub error: Option<String>,
    /// Whether the round can be retried with more updates.
    pub retryable: bool,
    /// Every submission's final verdict.
    pub verdicts: Vec<LedgerVerdict>,
    /// Round-level numbers (only those the host may learn).
    pub stats: Option<RoundSummary>,
}

/// `Abort`: no blobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbortRequest {}

/// `Ack`: no blobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckAnswer {
    /// The round concerned.
    pub round_id: Option<u64>,
}

/// `Probe`: no blobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeRequest {
    /// A call the sandbox answers by killing the process, to make first;
    /// the host observes the death (`SIGSYS`) from outside. The host can
    /// always kill its child, so this gives it nothing new.
    #[serde(default)]
    pub fatal_attempt: Option<FatalAttempt>,
}

/// A system call that ends a sandboxed enclave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FatalAttempt {
    /// `socket(2)`, as binding a UDP socket makes it.
    Socket,
}

/// `ProbeResult`: the sandbox, tested from inside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeAnswer {
    /// How the process hardened itself at start-up.
    pub hardening: Hardening,
    /// Opening a file failed (as the allow-list intends).
    pub open_blocked: bool,
    /// Spawning a process failed.
    pub exec_blocked: bool,
    /// The names (never the values) of the environment variables the
    /// process was given: the host starts it with an allow-list.
    pub environment: Vec<String>,
}
