//! The device loop (steps 3 and 4 of the protocol): session, round, verify
//! the enclave and the model, train, sign, seal, submit, wait.
//!
//! ```text
//!   ┌──────────────────────────────────────────────────────────────────┐
//!   │ open a session if there is none or it expires within a minute    │
//!   │ POST /v1/rounds/current {nonce}   → RoundInfo + report(nonce)    │
//!   │   waiting / not_selected / submitted → sleep poll_after, again   │
//!   │   finished → stop (or keep polling)                              │
//!   │   train:                                                         │
//!   │     verify the report against the policy and OUR nonce           │
//!   │     model: cached by version, else POST /v1/models/current and   │
//!   │       check key hash, certificate, version, architecture, layout │
//!   │     train on a blocking thread; update = trained − global        │
//!   │     seal(update) to the attested KEM key; POST /v1/updates       │
//!   └──────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Nothing from a round answer is used before its report verifies, and no
//! model is trained on before its certificate verifies under the key that
//! report vouches for: a host that alters the model, replays an old one or
//! swaps in another enclave is refused here, before any local data is touched.
//!
//! Failures are sorted by what they mean (`Disposition` in the source):
//! a revoked device stops cleanly; a closed, duplicate or late round is
//! skipped; a restarted enclave gets the *same* trained update re-sealed to
//! its new key (no retraining); an expired session is replaced; network
//! errors, 429, 5xx and a restarting enclave back off exponentially with
//! jitter ([`Backoff`]); refusals (a report, model or round that fails a
//! check) skip the round, or end the run when [`DeviceConfig::fail_on_refusal`]
//! is set; anything else ends the run with the error.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qflare_ml::{Architecture, Dataset, MlError, TrainConfig};
use qflare_protocol::attestation::{
    ATTESTATION_NONCE_LEN, AttestationPolicy, AttestationReport, VerifiedEnclave,
};
use qflare_protocol::crypto::sha256;
use qflare_protocol::envelope::{self, UpdateEnvelope, UpdateMetadata};
use qflare_protocol::federation::{
    self, ModelQuery, RoundInfo, RoundQuery, RoundStatus, SubmitReceipt,
};
use qflare_protocol::model::ModelCertificate;
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::wire::{self, limits};
use qflare_protocol::{ProtocolError, attestation};
use rand::RngExt;
use serde::Serialize;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::client::{Session, open_session, transport_for, unix_now};
use crate::error::{EdgeError, ModelRefusal};
use crate::identity::Identity;
use crate::transport::Transport;

/// The round route.
pub const ROUND_PATH: &str = "/v1/rounds/current";
/// The model route.
pub const MODEL_PATH: &str = "/v1/models/current";
/// The update route.
pub const UPDATE_PATH: &str = "/v1/updates";
/// Largest model download accepted (header and safetensors bytes).
pub const MODEL_DOWNLOAD_LIMIT: usize = 64 * 1024 * 1024;
/// Largest round answer accepted: the report plus a little JSON around it.
pub const ROUND_INFO_LIMIT: usize = limits::ATTESTATION_REPORT + 16 * 1024;
/// Largest submission receipt accepted.
pub const RECEIPT_LIMIT: usize = 4096;
/// The receipt status recorded when the server lists this device as having
/// submitted to a round whose receipt never arrived (the connection broke
/// after the server took the update).
pub const STATUS_SUBMITTED: &str = "submitted";
/// The code recorded with [`STATUS_SUBMITTED`].
pub const CODE_RECEIPT_LOST: &str = "receipt_lost";

/// Server codes that mean "this round is not for you any more; poll again"
/// (`unknown_round`: the server no longer knows it, e.g. after a restore).
const SKIP_CODES: [&str; 5] = [
    "not_selected",
    "duplicate",
    "deadline_passed",
    "round_closed",
    "unknown_round",
];
/// Server codes no amount of retrying fixes, though their HTTP status is a
/// retryable one (a server that does not coordinate training at all).
const FATAL_CODES: [&str; 1] = ["federation_disabled"];
/// Server codes that mean "the session is gone; open another".
const SESSION_CODES: [&str; 4] = [
    "expired",
    "authentication_failed",
    "replayed",
    "session_exhausted",
];

/// A hook that rewrites the update before it is sealed.
///
/// **For simulations of malicious devices only** (the demo's poisoning
/// attacks: scaled, sign-flipped or noisy updates). An honest device never
/// sets one.
pub type TamperFn = Arc<dyn Fn(TensorMap) -> TensorMap + Send + Sync>;

/// Exponential back-off with jitter for retryable failures.
///
/// Attempt `a` (from 0) waits between half and all of
/// `min(cap, initial * 2^a)` ("equal jitter"), so waits grow, never exceed
/// the cap, and devices that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first attempt's ceiling.
    pub initial: Duration,
    /// No wait is longer than this.
    pub cap: Duration,
    /// Consecutive failures tolerated before the run ends with the last
    /// error; `None` retries forever (a device in the field).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The longest wait of attempt `attempt` (from 0): `min(cap, initial * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.cap)
    }

    /// The wait before retry `attempt` (from 0): uniform in
    /// `[ceiling / 2, ceiling]`.
    pub fn delay<R: rand::Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rng.random_range(0..=spread))
    }
}

/// How a device runs.
#[derive(Clone)]
pub struct DeviceConfig {
    /// Which enclaves this device seals updates to (measurements, modes, report age).
    pub policy: AttestationPolicy,
    /// The device's private training data.
    pub data: Dataset,
    /// Stop after this many submissions (rounds that got a receipt); `None` runs on.
    pub max_rounds: Option<u64>,
    /// Stop when the server says training has finished (otherwise keep polling).
    pub stop_when_finished: bool,
    /// End the run at the first refused report, model or round instead of
    /// skipping the round (tests and demos that must see the refusal).
    pub fail_on_refusal: bool,
    /// Back-off for retryable failures.
    pub backoff: Backoff,
    /// Longest wait between polls, whatever the server asks (at least 1 s).
    pub max_poll_secs: u64,
    /// Open a new session when the current one has less than this left.
    pub session_margin_secs: u64,
    /// Refuse rounds asking for more local epochs than this (a host must not
    /// be able to pin the device's CPU indefinitely).
    pub max_local_epochs: usize,
    /// Mixed with the device id and round id into each round's shuffle seed.
    pub train_seed: u64,
    /// For simulations of malicious devices only: see [`TamperFn`].
    pub tamper: Option<TamperFn>,
}

impl fmt::Debug for DeviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("policy", &self.policy)
            .field("data", &self.data)
            .field("max_rounds", &self.max_rounds)
            .field("stop_when_finished", &self.stop_when_finished)
            .field("fail_on_refusal", &self.fail_on_refusal)
            .field("backoff", &self.backoff)
            .field("max_poll_secs", &self.max_poll_secs)
            .field("session_margin_secs", &self.session_margin_secs)
            .field("max_local_epochs", &self.max_local_epochs)
            .field("train_seed", &self.train_seed)
            .field("tamper", &self.tamper.as_ref().map(|_| "set"))
            .finish()
    }
}

impl DeviceConfig {
    /// A configuration with the defaults: run until the server finishes,
    /// skip refused rounds, retry forever, poll at most every 60 s, renew the
    /// session a minute before it expires, at most 50 local epochs.
    pub fn new(policy: AttestationPolicy, data: Dataset) -> Self {
        Self {
            policy,
            data,
            max_rounds: None,
            stop_when_finished: true,
            fail_on_refusal: false,
            backoff: Backoff::default(),
            max_poll_secs: 60,
            session_margin_secs: 60,
            max_local_epochs: 50,
            train_seed: 0,
            tamper: None,
        }
    }

    fn validate(&self) -> Result<(), EdgeError> {
        if self.policy.allowed_measurements.is_empty() {
            return Err(EdgeError::Config(
                "no enclave measurement is allowed, so no enclave can be trusted".into(),
            ));
        }
        if self.policy.allowed_modes.is_empty() {
            return Err(EdgeError::Config(
                "no attestation mode is allowed (software mode must be allowed explicitly)".into(),
            ));
        }
        if self.data.is_empty() {
            return Err(EdgeError::Config("the local data set is empty".into()));
        }
        if self.max_local_epochs == 0 {
            return Err(EdgeError::Config(
                "max_local_epochs must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Where each part of a round's time went.
///
/// Phases are summed durations, not wall-clock spans: retries add to them,
/// waits between polls do not. Handshakes are charged to the next round
/// submitted, so a round that reused an earlier session carries none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RoundTimings {
    /// Session handshakes (KEM to the long-term and ephemeral keys, the
    /// server's and device's signatures, two HTTPS round trips).
    pub session: Duration,
    /// `POST /v1/rounds/current` round trips for this round.
    pub round_query: Duration,
    /// Verifying the enclave's attestation reports (ML-DSA).
    pub attestation: Duration,
    /// `POST /v1/models/current` round trip (zero when the model was cached).
    pub download: Duration,
    /// Checking the model certificate (SHA-256 of the model, ML-DSA).
    pub model_verify: Duration,
    /// Decoding the safetensors bytes and checking the architecture.
    pub model_decode: Duration,
    /// Local SGD.
    pub training: Duration,
    /// The delta, the tamper hook if any, and safetensors encoding.
    pub update_encode: Duration,
    /// `envelope::seal`: inner signature, encapsulation, AES-GCM, outer signature.
    pub sealing: Duration,
    /// `POST /v1/updates` round trip.
    pub submission: Duration,
    /// Wall clock from the round's first `train` answer to its receipt,
    /// back-off and re-seals included.
    pub wall: Duration,
}

impl RoundTimings {
    /// The sum of the phases (without `wall`).
    pub fn total(&self) -> Duration {
        self.session
            + self.round_query
            + self.attestation
            + self.download
            + self.model_verify
            + self.model_decode
            + self.training
            + self.update_encode
            + self.sealing
            + self.submission
    }

    /// The phases that exist only for the cryptography: handshakes,
    /// report and certificate checks, and sealing. (The session channel's
    /// AES-GCM on each request and answer is inside the network phases.)
    pub fn cryptography(&self) -> Duration {
        self.session + self.attestation + self.model_verify + self.sealing
    }

    /// `cryptography / total`, in `[0, 1]` (0 for an empty record).
    pub fn cryptography_share(&self) -> f64 {
        let total = self.total().as_secs_f64();
        if total > 0.0 {
            self.cryptography().as_secs_f64() / total
        } else {
            0.0
        }
    }
}

/// Why a run ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The server said training has finished.
    Finished,
    /// [`DeviceConfig::max_rounds`] submissions were made.
    MaxRounds,
    /// The admin revoked this device.
    Revoked,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Finished => "training finished",
            Self::MaxRounds => "maximum number of rounds reached",
            Self::Revoked => "device revoked",
        })
    }
}

/// What a running device reports, for a terminal UI, a demo or a benchmark.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// A session was established.
    SessionOpened {
        /// The session id (public: it travels in a header).
        session_id: String,
        /// Unix seconds when it expires.
        expires_at: u64,
        /// How long the handshake took.
        elapsed: Duration,
    },
    /// The server answered a round query (the report was not checked yet).
    RoundSeen {
        /// The open round, if any.
        round_id: Option<u64>,
        /// What the server asks of this device.
        status: RoundStatus,
    },
    /// The enclave's report verified for this round.
    EnclaveAttested {
        /// The round.
        round_id: u64,
        /// The enclave's measurement, hex.
        measurement: String,
    },
    /// The global model verified (or was taken from the cache).
    ModelVerified {
        /// Its version.
        version: u64,
        /// Its architecture.
        architecture: Architecture,
        /// Size of the safetensors bytes.
        bytes: usize,
        /// True when it came from the cache rather than a download.
        cached: bool,
    },
    /// Local training progress (examples processed, at most every 1 %).
    Training {
        /// The round.
        round_id: u64,
        /// Examples processed so far (each epoch counts again).
        done: usize,
        /// `epochs * examples`.
        total: usize,
    },
    /// An already trained update is sealed again after a failed submission
    /// (to a restarted enclave's new key, or over a new session), not retrained.
    Resealing {
        /// The round.
        round_id: u64,
    },
    /// The server answered a submission.
    Submitted {
        /// The round.
        round_id: u64,
        /// `accepted`, `pending`, `rejected` (or [`STATUS_SUBMITTED`]).
        status: String,
        /// The enclave's reason code (or [`CODE_RECEIPT_LOST`]).
        code: String,
        /// Where the round's time went.
        timings: RoundTimings,
    },
    /// This device leaves the round and polls again (the server's code).
    Skipped {
        /// The round.
        round_id: Option<u64>,
        /// `not_selected`, `duplicate`, `deadline_passed` or `round_closed`.
        code: String,
    },
    /// A report, model or round failed a check; nothing was trained or sealed.
    Refused {
        /// The round, if known.
        round_id: Option<u64>,
        /// What failed.
        reason: String,
    },
    /// A retryable failure; the device waits `delay` and tries again.
    Retrying {
        /// Consecutive failures so far.
        attempt: u32,
        /// The wait.
        delay: Duration,
        /// What failed.
        error: String,
    },
    /// The device sleeps before polling again.
    Waiting {
        /// Seconds (the server's `poll_after_secs`, clamped).
        secs: u64,
    },
    /// The run ended.
    Stopped(StopOutcome),
}

/// How a run ended, as reported in [`DeviceEvent::Stopped`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Cleanly, for this reason.
    Stopped(StopReason),
    /// With this error (also returned by [`run_device`]).
    Failed(String),
}

/// Where events go: nowhere, a callback, or a channel.
#[derive(Clone, Default)]
pub struct Events {
    sink: Option<Arc<dyn Fn(DeviceEvent) + Send + Sync>>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.sink.is_some() {
            "Events(sink)"
        } else {
            "Events(none)"
        })
    }
}

impl Events {
    /// Drops every event.
    pub fn none() -> Self {
        Self::default()
    }

    /// Calls `f` with every event, on the thread that produced it (training
    /// progress comes from a blocking thread): keep it quick.
    pub fn from_fn(f: impl Fn(DeviceEvent) + Send + Sync + 'static) -> Self {
        Self {
            sink: Some(Arc::new(f)),
        }
    }

    /// Sends every event to the returned receiver (dropped silently once the
    /// receiver is gone).
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<DeviceEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self::from_fn(move |event| {
                let _ = tx.send(event);
            }),
            rx,
        )
    }

    /// Reports `event`.
    pub fn emit(&self, event: DeviceEvent) {
        if let Some(sink) = &self.sink {
            sink(event);
        }
    }
}

/// One round this device submitted to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRecord {
    /// The round.
    pub round_id: u64,
    /// The global model version trained from.
    pub model_version: u64,
    /// Local examples (FedAvg's weight).
    pub examples: u64,
    /// Mean training loss.
    pub mean_loss: f64,
    /// The receipt's status.
    pub status: String,
    /// The receipt's code.
    pub code: String,
    /// Where the time went.
    pub timings: RoundTimings,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// Why it stopped.
    pub stop: StopReason,
    /// Every submission, in order.
    pub rounds: Vec<RoundRecord>,
    /// Sessions opened.
    pub sessions_opened: u32,
    /// Models downloaded and verified.
    pub models_downloaded: u32,
    /// Reports, models or rounds refused.
    pub refusals: u32,
    /// Trained updates sealed again after a failed submission (a restarted
    /// enclave's new key, a lost session or connection), without retraining.
    pub reseals: u32,
    /// Rounds skipped on the server's word.
    pub skipped: u32,
    /// Retries after retryable failures.
    pub retries: u32,
}

/// Checks a round answer's report: policy (mode, measurement, age), our
/// nonce, and the enclave's signature.
pub fn verify_round_report(
    report: &AttestationReport,
    policy: &AttestationPolicy,
    nonce: &[u8; ATTESTATION_NONCE_LEN],
    now: u64,
) -> Result<VerifiedEnclave, EdgeError> {
    attestation::verify_report(report, policy, Some(nonce), now).map_err(EdgeError::Attestation)
}

/// Checks a model download against the attested enclave and the round:
/// the enclave key hash, the certificate (digest and signature), the model
/// version and the architecture. Returns the certificate and the model bytes.
pub fn verify_model_certificate<'a>(
    download: &'a [u8],
    enclave: &VerifiedEnclave,
    model_version: u64,
    architecture: Architecture,
) -> Result<(ModelCertificate, &'a [u8]), EdgeError> {
    let refuse = EdgeError::ModelRefused;
    let (header, model) = federation::decode_model_download(download)
        .map_err(|e| refuse(ModelRefusal::Malformed(e)))?;
    // Both values are public; a plain comparison leaks nothing.
    if header.enclave_key_sha256 != sha256(enclave.verifying_key.as_bytes()) {
        return Err(refuse(ModelRefusal::EnclaveKeyMismatch));
    }
    qflare_protocol::model::verify(&header.certificate, model, &enclave.verifying_key)
        .map_err(|e| refuse(ModelRefusal::Certificate(e)))?;
    let certificate = header.certificate;
    if certificate.model_version != model_version {
        return Err(refuse(ModelRefusal::VersionMismatch {
            expected: model_version,
            received: certificate.model_version,
        }));
    }
    if certificate.architecture != architecture.id() {
        return Err(refuse(ModelRefusal::ArchitectureMismatch {
            expected: architecture.id().to_owned(),
            received: certificate.architecture,
        }));
    }
    Ok((certificate, model))
}

/// Decodes certified model bytes and checks they are exactly
/// `architecture`'s tensors, with finite values.
pub fn decode_model(model: &[u8], architecture: Architecture) -> Result<TensorMap, EdgeError> {
    let refuse = |reason: String| EdgeError::ModelRefused(ModelRefusal::Layout(reason));
    let weights =
        TensorMap::from_safetensors(model, limits::TENSORS).map_err(|e| refuse(e.to_string()))?;
    architecture
        .validate(&weights)
        .map_err(|e| refuse(e.to_string()))?;
    Ok(weights)
}

/// [`verify_model_certificate`] then [`decode_model`].
pub fn verify_model_download(
    download: &[u8],
    enclave: &VerifiedEnclave,
    model_version: u64,
    architecture: Architecture,
) -> Result<(ModelCertificate, TensorMap), EdgeError> {
    let (certificate, model) =
        verify_model_certificate(download, enclave, model_version, architecture)?;
    Ok((certificate, decode_model(model, architecture)?))
}

/// What a failure means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// The device was revoked: stop cleanly.
    Revoked,
    /// Leave this round, poll again.
    SkipRound,
    /// The enclave restarted: back off, re-attest, re-seal the same update.
    Reseal,
    /// The session is gone: open another.
    Reconnect,
    /// A report, model or round failed a check.
    Refusal,
    /// Transient: back off and try again.
    Retry,
    /// End the run.
    Fatal,
}

fn classify(err: &EdgeError, in_handshake: bool) -> Disposition {
    let transient =
        err.is_retryable() || matches!(err, EdgeError::Server { status, .. } if *status == 500);
    match err {
        EdgeError::Server { code, .. } if code == "device_revoked" => Disposition::Revoked,
        EdgeError::Server { code, .. } if FATAL_CODES.contains(&code.as_str()) => {
            Disposition::Fatal
        }
        // A handshake the server refuses for any other reason will not
        // succeed by reconnecting (unknown device, bad signature, pin).
        _ if in_handshake => {
            if transient {
                Disposition::Retry
            } else {
                Disposition::Fatal
            }
        }
        EdgeError::Server { code, .. } if SKIP_CODES.contains(&code.as_str()) => {
            Disposition::SkipRound
        }
        EdgeError::Server { code, .. } if code == "enclave_restarting" => Disposition::Reseal,
        EdgeError::Server { code, .. } if SESSION_CODES.contains(&code.as_str()) => {
            Disposition::Reconnect
        }
        EdgeError::Protocol(ProtocolError::Expired { .. } | ProtocolError::SequenceExhausted) => {
            Disposition::Reconnect
        }
        EdgeError::Attestation(_)
        | EdgeError::ModelRefused(_)
        | EdgeError::RoundRefused(_)
        | EdgeError::Ml(MlError::Diverged { .. }) => Disposition::Refusal,
        _ if transient => Disposition::Retry,
        _ => Disposition::Fatal,
    }
}

/// A refusal that may be a benign race rather than an attack: the server
/// moved to a newer model between the round answer and the download.
fn is_benign_refusal(err: &EdgeError) -> bool {
    matches!(
        err,
        EdgeError::ModelRefused(ModelRefusal::VersionMismatch { expected, received })
            if received > expected
    )
}

/// The shuffle seed of one round: a function of the device, the round and
/// the configured seed, so devices differ and reruns repeat.
fn round_seed(identity: &Identity, round_id: u64, seed: u64) -> u64 {
    let mut input = Vec::with_capacity(64);
    input.extend_from_slice(b"qflare edge shuffle");
    input.extend_from_slice(identity.device_id.as_bytes());
    input.extend_from_slice(&round_id.to_be_bytes());
    input.extend_from_slice(&seed.to_be_bytes());
    let digest = sha256(&input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The verified global model, kept so polling does not download it again.
struct CachedModel {
    version: u64,
    architecture: Architecture,
    bytes: usize,
    weights: Arc<TensorMap>,
}

/// A trained update waiting for (or being re-sealed after) submission.
struct PendingUpdate {
    round_id: u64,
    model_version: u64,
    examples: u64,
    mean_loss: f64,
    /// The safetensors bytes of the delta: derived from private data, so
    /// wiped on drop.
    bytes: Zeroizing<Vec<u8>>,
    /// The last submission was answered `enclave_restarting`: the server
    /// holds nothing the new enclave can open, whatever the round status
    /// says, so the update waits for the next `train` answer to be re-sealed.
    awaiting_reseal: bool,
}

/// Timing of the round being worked on.
struct RoundClock {
    round_id: u64,
    started: Instant,
    timings: RoundTimings,
}

enum Next {
    /// Ask again at once.
    Now,
    /// Sleep this many seconds, then ask again.
    Poll(u64),
    /// End the run.
    Stop(StopReason),
}

/// The three sealed calls and the session they run in, as the loop sees
/// them: the real implementation is [`HttpLink`]; tests drive the loop
/// through a scripted one.
pub(crate) trait Link {
    /// True when a session is open with more than `margin_secs` left.
    fn has_session(&self, margin_secs: u64) -> bool;
    /// Forgets the session (the server ended it).
    fn drop_session(&mut self);
    /// Opens a session; returns its id and expiry.
    async fn open_session(&mut self) -> Result<(String, u64), EdgeError>;
    /// `POST /v1/rounds/current`.
    async fn round(&mut self, query: &RoundQuery) -> Result<RoundInfo, EdgeError>;
    /// `POST /v1/models/current`: the raw download.
    async fn model(&mut self) -> Result<Vec<u8>, EdgeError>;
    /// `POST /v1/updates`.
    async fn submit(&mut self, envelope: &UpdateEnvelope) -> Result<SubmitReceipt, EdgeError>;
}

/// The loop's link over the pinned HTTPS transport.
pub(crate) struct HttpLink<'a> {
    identity: &'a Identity,
    transport: Transport,
    session: Option<Session>,
}

impl HttpLink<'_> {
    fn live(&mut self) -> Result<&mut Session, EdgeError> {
        // The loop opens a session before every call; reaching here without
        // one is treated like an expired session (open another).
        self.session
            .as_mut()
            .ok_or(EdgeError::Protocol(ProtocolError::Expired {
                expires_at: 0,
                now: unix_now(),
            }))
    }
}

impl Link for HttpLink<'_> {
    fn has_session(&self, margin_secs: u64) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| !s.expires_within(margin_secs))
    }

    fn drop_session(&mut self) {
        self.session = None;
    }

    async fn open_session(&mut self) -> Result<(String, u64), EdgeError> {
        self.session = None;
        let session = open_session(self.identity, &self.transport).await?;
        let opened = (session.session_id(), session.expires_at());
        self.session = Some(session);
        Ok(opened)
    }

    async fn round(&mut self, query: &RoundQuery) -> Result<RoundInfo, EdgeError> {
        self.live()?.call(ROUND_PATH, query, ROUND_INFO_LIMIT).await
    }

    async fn model(&mut self) -> Result<Vec<u8>, EdgeError> {
        self.live()?
            .call_raw(
                MODEL_PATH,
                wire::encode(&ModelQuery::default())?,
                MODEL_DOWNLOAD_LIMIT,
            )
            .await
    }

    async fn submit(&mut self, envelope: &UpdateEnvelope) -> Result<SubmitReceipt, EdgeError> {
        self.live()?
            .call(UPDATE_PATH, envelope, RECEIPT_LIMIT)
            .await
    }
}

struct Runner<'a, L> {
    identity: &'a Identity,
    link: L,
    config: DeviceConfig,
    data: Arc<Dataset>,
    events: Events,
    in_handshake: bool,
    model: Option<CachedModel>,
    pending: Option<PendingUpdate>,
    clock: Option<RoundClock>,
    /// The round the last `train` answer named (what a skip code refers to).
    working_round: Option<u64>,
    /// Rounds submitted to or skipped: never worked on again.
    done_rounds: BTreeSet<u64>,
    /// Handshake time not yet charged to a round.
    handshakes: Duration,
    failures: u32,
    summary: RunSummary,
}

/// Runs the device until the server finishes training, `max_rounds`
/// submissions were made, the device is revoked (all `Ok`), or an error
/// that retrying cannot fix (`Err`). Every step is reported to `events`.
///
/// Cancel it by dropping the future; a training step already running on the
/// blocking pool finishes on its own and its result is discarded.
pub async fn run_device(
    identity: &Identity,
    config: DeviceConfig,
    events: Events,
) -> Result<RunSummary, EdgeError> {
    let transport = match transport_for(identity) {
        Ok(transport) => transport,
        Err(err) => {
            events.emit(DeviceEvent::Stopped(StopOutcome::Failed(err.to_string())));
            return Err(err);
        }
    };
    let link = HttpLink {
        identity,
        transport,
        session: None,
    };
    drive(identity, link, config, events).await
}

/// The loop over any [`Link`]; reports how it ended.
pub(crate) async fn drive<L: Link>(
    identity: &Identity,
    link: L,
    config: DeviceConfig,
    events: Events,
) -> Result<RunSummary, EdgeError> {
    let result = drive_inner(identity, link, config, events.clone()).await;
    match &result {
        Ok(summary) => events.emit(DeviceEvent::Stopped(StopOutcome::Stopped(summary.stop))),
        Err(err) => events.emit(DeviceEvent::Stopped(StopOutcome::Failed(err.to_string()))),
    }
    result
}

async fn drive_inner<L: Link>(
    identity: &Identity,
    link: L,
    mut config: DeviceConfig,
    events: Events,
) -> Result<RunSummary, EdgeError> {
    config.validate()?;
    // Move the data (possibly hundreds of MB) behind an Arc for the
    // blocking training threads, leaving an empty set in its place.
    let empty = config.data.head(0);
    let data = Arc::new(std::mem::replace(&mut config.data, empty));
    let runner = Runner {
        identity,
        link,
        config,
        data,
        events,
        in_handshake: false,
        model: None,
        pending: None,
        clock: None,
        working_round: None,
        done_rounds: BTreeSet::new(),
        handshakes: Duration::ZERO,
        failures: 0,
        summary: RunSummary {
            stop: StopReason::Finished,
            rounds: Vec::new(),
            sessions_opened: 0,
            models_downloaded: 0,
            refusals: 0,
            reseals: 0,
            skipped: 0,
            retries: 0,
        },
    };
    runner.run().await
}

impl<L: Link> Runner<'_, L> {
    async fn run(mut self) -> Result<RunSummary, EdgeError> {
        if self.config.max_rounds == Some(0) {
            return Ok(self.finish(StopReason::MaxRounds));
        }
        loop {
            let err = match self.step().await {
                Ok(Next::Now) => {
                    self.failures = 0;
                    continue;
                }
                Ok(Next::Poll(secs)) => {
                    self.failures = 0;
                    self.wait(secs).await;
                    continue;
                }
                Ok(Next::Stop(reason)) => return Ok(self.finish(reason)),
                Err(err) => err,
            };
            let disposition = classify(&err, self.in_handshake);
            self.in_handshake = false;
            match disposition {
                Disposition::Revoked => {
                    tracing::warn!("this device has been revoked; stopping");
                    return Ok(self.finish(StopReason::Revoked));
                }
                Disposition::SkipRound => {
                    let round_id = self.working_round.take();
                    tracing::info!(
                        ?round_id,
                        code = err.code().unwrap_or(""),
                        "skipping the round"
                    );
                    if let Some(round_id) = round_id {
                        self.done_rounds.insert(round_id);
                    }
                    self.pending = None;
                    self.clock = None;
                    self.summary.skipped += 1;
                    self.events.emit(DeviceEvent::Skipped {
                        round_id,
                        code: err.code().unwrap_or("").to_owned(),
                    });
                    // The next round answer says how long to wait.
                    self.failures = 0;
                }
                Disposition::Reseal => {
                    // Keep the trained update; the next `train` answer carries
                    // the new enclave's report and the update is sealed again.
                    tracing::info!("the enclave is restarting; will re-attest and re-seal");
                    if let Some(pending) = self.pending.as_mut() {
                        pending.awaiting_reseal = true;
                    }
                    self.back_off(err).await?;
                }
                Disposition::Reconnect => {
                    tracing::info!(error = %err, "session ended; opening another");
                    self.link.drop_session();
                    if self.failures == 0 {
                        self.failures = 1;
                    } else {
                        self.back_off(err).await?;
                    }
                }
                Disposition::Refusal => self.refused(err).await?,
                Disposition::Retry => self.back_off(err).await?,
                Disposition::Fatal => return Err(err),
            }
        }
    }

    fn finish(mut self, reason: StopReason) -> RunSummary {
        self.summary.stop = reason;
        self.summary
    }

    async fn wait(&self, secs: u64) {
        self.events.emit(DeviceEvent::Waiting { secs });
        // Up to 10 % of jitter (at most 1 s) so devices told the same
        // interval spread out instead of polling in lockstep.
        let jitter_ms = rand::rng().random_range(0..=secs.min(10) * 100);
        tokio::time::sleep(Duration::from_secs(secs) + Duration::from_millis(jitter_ms)).await;
    }

    async fn back_off(&mut self, err: EdgeError) -> Result<(), EdgeError> {
        self.failures = self.failures.saturating_add(1);
        if self
            .config
            .backoff
            .max_attempts
            .is_some_and(|max| self.failures > max)
        {
            return Err(err);
        }
        let delay = self
            .config
            .backoff
            .delay(self.failures - 1, &mut rand::rng());
        self.summary.retries += 1;
        tracing::warn!(error = %err, attempt = self.failures, delay_ms = delay.as_millis() as u64, "retrying");
        self.events.emit(DeviceEvent::Retrying {
            attempt: self.failures,
            delay,
            error: err.to_string(),
        });
        tokio::time::sleep(delay).await;
        Ok(())
    }

    async fn refused(&mut self, err: EdgeError) -> Result<(), EdgeError> {
        let round_id = self.working_round;
        tracing::warn!(?round_id, error = %err, "refused; nothing was trained or sealed");
        self.summary.refusals += 1;
        self.events.emit(DeviceEvent::Refused {
            round_id,
            reason: err.to_string(),
        });
        let benign = is_benign_refusal(&err);
        if self.config.fail_on_refusal && !benign {
            return Err(err);
        }
        if !benign && let Some(round_id) = self.working_round.take() {
            self.done_rounds.insert(round_id);
            self.pending = None;
            self.clock = None;
        }
        // Back off so a host that keeps failing checks is not hammered.
        self.back_off(err).await
    }

    /// Makes sure a session is open with time to spare, opening one if not.
    async fn ensure_session(&mut self) -> Result<(), EdgeError> {
        if self.link.has_session(self.config.session_margin_secs) {
            return Ok(());
        }
        self.in_handshake = true;
        let started = Instant::now();
        let (session_id, expires_at) = self.link.open_session().await?;
        let elapsed = started.elapsed();
        self.in_handshake = false;
        self.handshakes += elapsed;
        self.summary.sessions_opened += 1;
        tracing::debug!(session = %session_id, ?elapsed, "session opened");
        self.events.emit(DeviceEvent::SessionOpened {
            session_id,
            expires_at,
            elapsed,
        });
        Ok(())
    }

    fn timings(&mut self, round_id: u64) -> &mut RoundTimings {
        let clock = match self.clock.take() {
            Some(clock) if clock.round_id == round_id => clock,
            _ => RoundClock {
                round_id,
                started: Instant::now(),
                timings: RoundTimings::default(),
            },
        };
        &mut self.clock.insert(clock).timings
    }

    async fn step(&mut self) -> Result<Next, EdgeError> {
        let nonce: [u8; ATTESTATION_NONCE_LEN] = rand::random();
        let query = RoundQuery { nonce: Some(nonce) };
        let started = Instant::now();
        self.ensure_session().await?;
        let info = self.link.round(&query).await?;
        let query_time = started.elapsed();
        self.events.emit(DeviceEvent::RoundSeen {
            round_id: info.round_id,
            status: info.status,
        });
        let poll = info
            .poll_after_secs
            .clamp(1, self.config.max_poll_secs.max(1));
        match info.status {
            RoundStatus::Finished => {
                self.pending = None;
                self.clock = None;
                if self.config.stop_when_finished {
                    Ok(Next::Stop(StopReason::Finished))
                } else {
                    Ok(Next::Poll(poll))
                }
            }
            RoundStatus::Waiting => Ok(Next::Poll(poll)),
            RoundStatus::NotSelected => {
                if self.pending.as_ref().map(|p| Some(p.round_id)) == Some(info.round_id) {
                    self.pending = None;
                    self.clock = None;
                }
                Ok(Next::Poll(poll))
            }
            RoundStatus::Submitted => {
                self.receipt_lost(info.round_id);
                Ok(Next::Poll(poll))
            }
            RoundStatus::Train => self.train_round(info, &nonce, query_time).await,
        }
    }

    /// The server lists us as submitted to a round whose receipt we never
    /// got (the connection broke after it took the update): record it.
    /// Not after `enclave_restarting`, though: then what the server stored
    /// was sealed to the dead enclave's key, so the update is kept until the
    /// server asks for it again (or the round moves on).
    fn receipt_lost(&mut self, round_id: Option<u64>) {
        let Some(pending) = self
            .pending
            .take_if(|p| Some(p.round_id) == round_id && !p.awaiting_reseal)
        else {
            if self.pending.is_some() {
                tracing::warn!(
                    ?round_id,
                    "the server lists this device as submitted, but the enclave restarted before \
                     taking the update; keeping it to re-seal when the server asks again"
                );
            }
            return;
        };
        let receipt = SubmitReceipt {
            round_id: pending.round_id,
            status: STATUS_SUBMITTED.to_owned(),
            code: CODE_RECEIPT_LOST.to_owned(),
        };
        self.record(&pending, receipt);
    }

    async fn train_round(
        &mut self,
        info: RoundInfo,
        nonce: &[u8; ATTESTATION_NONCE_LEN],
        query_time: Duration,
    ) -> Result<Next, EdgeError> {
        let poll = info
            .poll_after_secs
            .clamp(1, self.config.max_poll_secs.max(1));
        self.working_round = info.round_id;
        let round_id = info
            .round_id
            .ok_or_else(|| EdgeError::RoundRefused("a train answer without a round id".into()))?;
        if self.done_rounds.contains(&round_id) {
            // Submitted or skipped already; the server has not caught up.
            return Ok(Next::Poll(poll));
        }
        let missing =
            |field: &str| EdgeError::RoundRefused(format!("a train answer without {field}"));
        let model_version = info
            .model_version
            .ok_or_else(|| missing("a model version"))?;
        let architecture: Architecture = info
            .architecture
            .as_deref()
            .ok_or_else(|| missing("an architecture"))?
            .parse()
            .map_err(|e: MlError| EdgeError::RoundRefused(e.to_string()))?;
        let plan = info.training.ok_or_else(|| missing("a training plan"))?;
        let report = info
            .report
            .ok_or_else(|| missing("an attestation report"))?;
        self.timings(round_id).round_query += query_time;

        let started = Instant::now();
        let enclave = verify_round_report(&report, &self.config.policy, nonce, unix_now())?;
        self.timings(round_id).attestation += started.elapsed();
        self.events.emit(DeviceEvent::EnclaveAttested {
            round_id,
            measurement: hex::encode(enclave.measurement),
        });

        // An update refused only because the enclave restarted is re-sealed,
        // not retrained, also when the server retries under a new round id:
        // it was trained from the same model version, and the inner
        // signature binds the round it is sealed for.
        let reusable = self.pending.as_ref().is_some_and(|p| {
            p.model_version == model_version && (p.round_id == round_id || p.awaiting_reseal)
        });
        if reusable {
            if let Some(pending) = self.pending.as_mut() {
                pending.round_id = round_id;
            }
            self.summary.reseals += 1;
            self.events.emit(DeviceEvent::Resealing { round_id });
        } else {
            self.pending = None;
            if plan.epochs > self.config.max_local_epochs {
                return Err(EdgeError::RoundRefused(format!(
                    "the round asks for {} local epochs, this device allows at most {}",
                    plan.epochs, self.config.max_local_epochs
                )));
            }
            let global = self
                .global_model(round_id, model_version, architecture, &enclave)
                .await?;
            let train_config = TrainConfig {
                learning_rate: plan.learning_rate,
                batch_size: plan.batch_size,
                epochs: plan.epochs,
                seed: round_seed(self.identity, round_id, self.config.train_seed),
            };
            // A plan TrainConfig cannot train with is the server's fault, not ours.
            train_config
                .validate()
                .map_err(|e| EdgeError::RoundRefused(e.to_string()))?;
            self.pending = Some(
                self.train(round_id, model_version, architecture, global, train_config)
                    .await?,
            );
        }
        self.submit(round_id, &enclave).await
    }

    /// The verified model of `version`, from the cache or downloaded.
    async fn global_model(
        &mut self,
        round_id: u64,
        version: u64,
        architecture: Architecture,
        enclave: &VerifiedEnclave,
    ) -> Result<Arc<TensorMap>, EdgeError> {
        if let Some(cached) = &self.model
            && cached.version == version
            && cached.architecture == architecture
        {
            let weights = cached.weights.clone();
            self.events.emit(DeviceEvent::ModelVerified {
                version,
                architecture,
                bytes: cached.bytes,
                cached: true,
            });
            return Ok(weights);
        }
        let started = Instant::now();
        self.ensure_session().await?;
        let download = self.link.model().await?;
        self.timings(round_id).download += started.elapsed();

        let started = Instant::now();
        let (_, model) = verify_model_certificate(&download, enclave, version, architecture)?;
        self.timings(round_id).model_verify += started.elapsed();
        let started = Instant::now();
        let weights = Arc::new(decode_model(model, architecture)?);
        self.timings(round_id).model_decode += started.elapsed();

        self.summary.models_downloaded += 1;
        tracing::info!(version, %architecture, bytes = model.len(), "global model verified");
        self.events.emit(DeviceEvent::ModelVerified {
            version,
            architecture,
            bytes: model.len(),
            cached: false,
        });
        self.model = Some(CachedModel {
            version,
            architecture,
            bytes: model.len(),
            weights: weights.clone(),
        });
        Ok(weights)
    }

    /// Trains on a blocking thread (burn's kernels run on the process-wide
    /// compute pool) and encodes the delta.
    async fn train(
        &mut self,
        round_id: u64,
        model_version: u64,
        architecture: Architecture,
        global: Arc<TensorMap>,
        config: TrainConfig,
    ) -> Result<PendingUpdate, EdgeError> {
        let data = self.data.clone();
        let events = self.events.clone();
        let tamper = self.config.tamper.clone();
        let job = move || -> Result<_, MlError> {
            let last_percent = std::cell::Cell::new(usize::MAX);
            let progress = |done: usize, total: usize| {
                let percent = done * 100 / total.max(1);
                if percent != last_percent.get() {
                    last_percent.set(percent);
                    events.emit(DeviceEvent::Training {
                        round_id,
                        done,
                        total,
                    });
                }
            };
            let started = Instant::now();
            let outcome = qflare_ml::train(architecture, &global, &data, &config, Some(&progress))?;
            let training = started.elapsed();
            let started = Instant::now();
            let mut update = qflare_ml::delta(&outcome.weights, &global)?;
            if let Some(tamper) = tamper {
                update = tamper(update);
            }
            let bytes = Zeroizing::new(update.to_safetensors());
            Ok((
                outcome.examples,
                outcome.mean_loss,
                bytes,
                training,
                started.elapsed(),
            ))
        };
        let (examples, mean_loss, bytes, training, encode) =
            match tokio::task::spawn_blocking(job).await {
                Ok(result) => result?,
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(err) => return Err(EdgeError::Ml(MlError::Backend(err.to_string()))),
            };
        let timings = self.timings(round_id);
        timings.training += training;
        timings.update_encode += encode;
        Ok(PendingUpdate {
            round_id,
            model_version,
            examples: u64::try_from(examples).unwrap_or(u64::MAX),
            mean_loss,
            bytes,
            awaiting_reseal: false,
        })
    }

    /// Seals the pending update to the attested enclave and submits it.
    async fn submit(
        &mut self,
        round_id: u64,
        enclave: &VerifiedEnclave,
    ) -> Result<Next, EdgeError> {
        let pending = self
            .pending
            .as_ref()
            .ok_or_else(|| EdgeError::Config("internal: submit without a trained update".into()))?;
        let metadata = UpdateMetadata {
            round_id,
            device_id: self.identity.device_id,
            model_version: pending.model_version,
            example_count: pending.examples,
        };
        let started = Instant::now();
        let sealed = envelope::seal(
            &metadata,
            &pending.bytes,
            &self.identity.keys.signing,
            &enclave.kem_public_key,
            &mut rand::rng(),
        )?;
        self.timings(round_id).sealing += started.elapsed();

        let started = Instant::now();
        self.ensure_session().await?;
        let receipt = self.link.submit(&sealed).await?;
        self.timings(round_id).submission += started.elapsed();
        if receipt.round_id != round_id {
            return Err(EdgeError::Protocol(ProtocolError::Mismatch(
                "the receipt's round",
            )));
        }
        if let Some(pending) = self.pending.take() {
            self.record(&pending, receipt);
        }
        let submitted = self.summary.rounds.len() as u64;
        if self.config.max_rounds.is_some_and(|max| submitted >= max) {
            return Ok(Next::Stop(StopReason::MaxRounds));
        }
        Ok(Next::Now)
    }

    fn record(&mut self, pending: &PendingUpdate, receipt: SubmitReceipt) {
        let round_id = pending.round_id;
        let mut timings = self
            .clock
            .take()
            .filter(|c| c.round_id == round_id)
            .map(|c| RoundTimings {
                wall: c.started.elapsed(),
                ..c.timings
            })
            .unwrap_or_default();
        timings.session += std::mem::take(&mut self.handshakes);
        self.done_rounds.insert(round_id);
        self.working_round = None;
        tracing::info!(
            round_id,
            status = %receipt.status,
            code = %receipt.code,
            examples = pending.examples,
            total_ms = timings.total().as_millis() as u64,
            crypto_share = timings.cryptography_share(),
            "update submitted"
        );
        self.events.emit(DeviceEvent::Submitted {
            round_id,
            status: receipt.status.clone(),
            code: receipt.code.clone(),
            timings,
        });
        self.summary.rounds.push(RoundRecord {
            round_id,
            model_version: pending.model_version,
            examples: pending.examples,
            mean_loss: pending.mean_loss,
            status: receipt.status,
            code: receipt.code,
            timings,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: u16, code: &str) -> EdgeError {
        EdgeError::Server {
            status,
            code: code.into(),
            message: String::new(),
        }
    }

    #[test]
    fn failures_are_sorted_by_meaning() {
        use Disposition::*;
        let cases = [
            (server(403, "device_revoked"), false, Revoked),
            (server(403, "device_revoked"), true, Revoked),
            (server(403, "not_selected"), false, SkipRound),
            (server(409, "duplicate"), false, SkipRound),
            (server(409, "deadline_passed"), false, SkipRound),
            (server(409, "round_closed"), false, SkipRound),
            (server(503, "enclave_restarting"), false, Reseal),
            (server(503, "unavailable"), false, Retry),
            (server(429, "rate_limited"), false, Retry),
            (server(500, "internal_error"), false, Retry),
            (server(401, "expired"), false, Reconnect),
            (server(401, "authentication_failed"), false, Reconnect),
            (server(401, "authentication_failed"), true, Fatal),
            (server(429, "rate_limited"), true, Retry),
            (server(400, "malformed_request"), false, Fatal),
            (server(404, "unknown_round"), false, SkipRound),
            (server(503, "federation_disabled"), false, Fatal),
            (EdgeError::Network("reset".into()), false, Retry),
            (EdgeError::Network("reset".into()), true, Retry),
            (
                EdgeError::Protocol(ProtocolError::Expired {
                    expires_at: 1,
                    now: 2,
                }),
                false,
                Reconnect,
            ),
            (
                EdgeError::Protocol(ProtocolError::Aead("response")),
                false,
                Fatal,
            ),
            (
                EdgeError::Attestation(ProtocolError::AttestationRefused("x")),
                false,
                Refusal,
            ),
            (
                EdgeError::ModelRefused(ModelRefusal::EnclaveKeyMismatch),
                false,
                Refusal,
            ),
            (EdgeError::RoundRefused("x".into()), false, Refusal),
            (EdgeError::Tls("pin".into()), false, Fatal),
        ];
        for (err, in_handshake, expected) in cases {
            assert_eq!(classify(&err, in_handshake), expected, "{err}");
        }
    }

    #[test]
    fn only_a_newer_model_is_a_benign_refusal() {
        let newer = EdgeError::ModelRefused(ModelRefusal::VersionMismatch {
            expected: 3,
            received: 4,
        });
        let older = EdgeError::ModelRefused(ModelRefusal::VersionMismatch {
            expected: 3,
            received: 2,
        });
        assert!(is_benign_refusal(&newer));
        assert!(!is_benign_refusal(&older));
        assert!(!is_benign_refusal(&EdgeError::ModelRefused(
            ModelRefusal::EnclaveKeyMismatch
        )));
    }

    #[test]
    fn timings_add_up() {
        let ms = Duration::from_millis;
        let t = RoundTimings {
            session: ms(10),
            round_query: ms(5),
            attestation: ms(1),
            download: ms(20),
            model_verify: ms(4),
            model_decode: ms(2),
            training: ms(900),
            update_encode: ms(3),
            sealing: ms(5),
            submission: ms(50),
            wall: ms(2000),
        };
        assert_eq!(t.total(), ms(1000));
        assert_eq!(t.cryptography(), ms(20));
        assert!((t.cryptography_share() - 0.02).abs() < 1e-12);
        assert_eq!(RoundTimings::default().cryptography_share(), 0.0);
    }

    /// A scripted server: rounds, model and submissions answer from queues
    /// (the last round answer repeats), with a real enclave key pair that a
    /// restart replaces, so every envelope is opened as the enclave would.
    mod scripted {
        use std::collections::VecDeque;
        use std::sync::{Arc, Mutex};

        use qflare_ml::Architecture;
        use qflare_protocol::attestation::{AttestationMode, ReportBody, sign_report};
        use qflare_protocol::crypto::sha256;
        use qflare_protocol::envelope::{self, UpdateEnvelope, UpdateMetadata};
        use qflare_protocol::federation::{
            ModelDownload, RoundInfo, RoundQuery, RoundStatus, SubmitReceipt, TrainingPlan,
            encode_model_download,
        };
        use qflare_protocol::kem::KemKeyPair;
        use qflare_protocol::sig::{SigningKey, VerifyingKey};
        use qflare_protocol::tensor::TensorMap;
        use qflare_protocol::{KemSuite, SignatureSuite};

        use super::super::{EdgeError, Link};
        use crate::client::unix_now;

        pub const MEASUREMENT: [u8; 48] = [7; 48];

        #[derive(Clone, Copy, Debug)]
        pub enum RoundReply {
            Status(RoundStatus, Option<u64>),
            Train { round_id: u64, model_version: u64 },
            Error(u16, &'static str),
        }

        #[derive(Clone, Copy, Debug)]
        pub enum SubmitReply {
            Receipt(&'static str),
            Error(u16, &'static str),
            /// The enclave restarts with new keys; the host answers 503.
            RestartEnclave,
            /// The server takes the update, then the connection breaks.
            DropAfterAccept,
        }

        #[derive(Clone, Copy, Debug, PartialEq)]
        pub enum ModelReply {
            Honest,
            /// The host flips one byte of the weights.
            FlipByte,
        }

        pub struct Enclave {
            pub signing: SigningKey,
            pub kem: KemKeyPair,
        }

        impl Enclave {
            fn new() -> Self {
                let mut rng = rand::rng();
                Self {
                    signing: SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap(),
                    kem: KemKeyPair::generate(KemSuite::MlKem768, &mut rng).unwrap(),
                }
            }
        }

        pub struct Opened {
            pub metadata: UpdateMetadata,
            pub update: TensorMap,
            pub enclave_generation: u32,
        }

        pub struct Script {
            pub enclave: Enclave,
            pub enclave_generation: u32,
            pub rounds: VecDeque<RoundReply>,
            pub submits: VecDeque<SubmitReply>,
            pub model: ModelReply,
            pub global: TensorMap,
            pub current_version: u64,
            pub session_open: bool,
            pub sessions: u32,
            pub downloads: u32,
            pub device_key: VerifyingKey,
            pub opened: Vec<Opened>,
        }

        impl Script {
            pub fn new(device_key: VerifyingKey, rounds: &[RoundReply]) -> Self {
                Self {
                    enclave: Enclave::new(),
                    enclave_generation: 0,
                    rounds: rounds.iter().copied().collect(),
                    submits: VecDeque::new(),
                    model: ModelReply::Honest,
                    global: qflare_ml::initial_model(Architecture::Mnist2nn, 3).unwrap(),
                    current_version: 0,
                    session_open: false,
                    sessions: 0,
                    downloads: 0,
                    device_key,
                    opened: Vec::new(),
                }
            }

            fn report(&self, nonce: [u8; 32]) -> qflare_protocol::attestation::AttestationReport {
                let body = ReportBody {
                    mode: AttestationMode::Software,
                    measurement: MEASUREMENT,
                    kem_public_key: self.enclave.kem.public.clone(),
                    verifying_key: self.enclave.signing.verifying_key().clone(),
                    nonce,
                    issued_at: unix_now(),
                    evidence: Vec::new(),
                };
                sign_report(&body, &self.enclave.signing).unwrap()
            }
        }

        fn server(status: u16, code: &str) -> EdgeError {
            EdgeError::Server {
                status,
                code: code.into(),
                message: String::new(),
            }
        }

        #[derive(Clone)]
        pub struct ScriptedLink(pub Arc<Mutex<Script>>);

        impl Link for ScriptedLink {
            fn has_session(&self, _margin_secs: u64) -> bool {
                self.0.lock().unwrap().session_open
            }

            fn drop_session(&mut self) {
                self.0.lock().unwrap().session_open = false;
            }

            async fn open_session(&mut self) -> Result<(String, u64), EdgeError> {
                let mut script = self.0.lock().unwrap();
                script.session_open = true;
                script.sessions += 1;
                Ok((format!("session-{}", script.sessions), unix_now() + 3600))
            }

            async fn round(&mut self, query: &RoundQuery) -> Result<RoundInfo, EdgeError> {
                let mut script = self.0.lock().unwrap();
                let reply = if script.rounds.len() > 1 {
                    script.rounds.pop_front()
                } else {
                    script.rounds.front().copied()
                }
                .unwrap();
                let nonce = query.nonce.unwrap();
                let mut info = RoundInfo {
                    status: RoundStatus::Waiting,
                    round_id: None,
                    model_version: None,
                    architecture: None,
                    training: None,
                    deadline: None,
                    report: Some(script.report(nonce)),
                    poll_after_secs: 5,
                };
                match reply {
                    RoundReply::Error(status, code) => {
                        if code == "expired" {
                            script.session_open = false;
                        }
                        return Err(server(status, code));
                    }
                    RoundReply::Status(status, round_id) => {
                        info.status = status;
                        info.round_id = round_id;
                    }
                    RoundReply::Train {
                        round_id,
                        model_version,
                    } => {
                        script.current_version = model_version;
                        info.status = RoundStatus::Train;
                        info.round_id = Some(round_id);
                        info.model_version = Some(model_version);
                        info.architecture = Some("mnist-2nn".into());
                        info.training = Some(TrainingPlan {
                            learning_rate: 0.1,
                            batch_size: 10,
                            epochs: 1,
                        });
                        info.deadline = Some(unix_now() + 600);
                    }
                }
                Ok(info)
            }

            async fn model(&mut self) -> Result<Vec<u8>, EdgeError> {
                let mut script = self.0.lock().unwrap();
                script.downloads += 1;
                let mut model = script.global.to_safetensors();
                let certificate = qflare_protocol::model::certify(
                    "mnist-2nn",
                    script.current_version,
                    script.current_version,
                    &model,
                    &script.enclave.signing,
                )
                .unwrap();
                if script.model == ModelReply::FlipByte {
                    let last = model.len() - 1;
                    model[last] ^= 1;
                }
                let header = ModelDownload {
                    certificate,
                    enclave_key_sha256: sha256(script.enclave.signing.verifying_key().as_bytes()),
                };
                Ok(encode_model_download(&header, &model).unwrap())
            }

            async fn submit(
                &mut self,
                sealed: &UpdateEnvelope,
            ) -> Result<SubmitReceipt, EdgeError> {
                let mut script = self.0.lock().unwrap();
                let reply = script
                    .submits
                    .pop_front()
                    .unwrap_or(SubmitReply::Receipt("accepted"));
                if let SubmitReply::RestartEnclave = reply {
                    script.enclave = Enclave::new();
                    script.enclave_generation += 1;
                    return Err(server(503, "enclave_restarting"));
                }
                if let SubmitReply::Error(status, code) = reply {
                    return Err(server(status, code));
                }
                // Only the current enclave's key opens it.
                let opened = envelope::open(
                    sealed,
                    &script.enclave.kem.secret,
                    &script.enclave.kem.public,
                    &script.device_key,
                )
                .unwrap();
                let update = TensorMap::from_safetensors(&opened.update, usize::MAX).unwrap();
                let generation = script.enclave_generation;
                script.opened.push(Opened {
                    metadata: opened.metadata,
                    update,
                    enclave_generation: generation,
                });
                match reply {
                    SubmitReply::DropAfterAccept => Err(EdgeError::Network("reset".into())),
                    SubmitReply::Receipt(status) => Ok(SubmitReceipt {
                        round_id: sealed.round_id,
                        status: status.into(),
                        code: "ok".into(),
                    }),
                    _ => unreachable!(),
                }
            }
        }
    }

    mod loop_behaviour {
        use std::sync::{Arc, Mutex};

        use qflare_ml::model::{IMAGE_PIXELS, IMAGE_SIDE};
        use qflare_protocol::attestation::AttestationMode;
        use qflare_protocol::identity::{DeviceId, DeviceKeys, ServerFingerprint};
        use qflare_protocol::{KemSuite, SignatureSuite};

        use super::super::*;
        use super::scripted::{
            MEASUREMENT, ModelReply, RoundReply, Script, ScriptedLink, SubmitReply,
        };

        fn identity() -> Identity {
            let mut rng = rand::rng();
            let server =
                qflare_protocol::sig::SigningKey::generate(SignatureSuite::MlDsa65, &mut rng)
                    .unwrap();
            Identity {
                device_id: DeviceId::random(&mut rng),
                device_name: "scripted".into(),
                server_url: "https://127.0.0.1:1".into(),
                server_fingerprint: ServerFingerprint::compute(b"cert", server.verifying_key()),
                server_certificate_sha256: sha256(b"cert"),
                server_key: server.verifying_key().clone(),
                keys: DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng)
                    .unwrap(),
                key_version: 1,
            }
        }

        fn config() -> DeviceConfig {
            let n = 20;
            let mut images = vec![0.0f32; n * IMAGE_PIXELS];
            for (i, image) in images.chunks_mut(IMAGE_PIXELS).enumerate() {
                image[(i % 10) * 28 + 5] = 1.0;
            }
            let labels = (0..n).map(|i| (i % 10) as u8).collect();
            let data = Dataset::new(images, labels, IMAGE_SIDE, IMAGE_SIDE).unwrap();
            let mut config = DeviceConfig::new(
                AttestationPolicy {
                    allowed_measurements: vec![MEASUREMENT],
                    allowed_modes: vec![AttestationMode::Software],
                    max_age_secs: 600,
                },
                data,
            );
            config.backoff.max_attempts = Some(5);
            config
        }

        struct Run {
            result: Result<RunSummary, EdgeError>,
            events: Vec<DeviceEvent>,
            script: Arc<Mutex<Script>>,
        }

        impl Run {
            fn summary(&self) -> &RunSummary {
                self.result.as_ref().unwrap()
            }

            /// Training runs that completed (the last progress event of each).
            fn trainings(&self) -> usize {
                self.events
                    .iter()
                    .filter(
                        |e| matches!(e, DeviceEvent::Training { done, total, .. } if done == total),
                    )
                    .count()
            }
        }

        async fn run(
            rounds: &[RoundReply],
            setup: impl FnOnce(&mut Script, &mut DeviceConfig),
        ) -> Run {
            let identity = identity();
            let mut script = Script::new(identity.keys.signing.verifying_key().clone(), rounds);
            let mut config = config();
            setup(&mut script, &mut config);
            let script = Arc::new(Mutex::new(script));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let sink = seen.clone();
            let events = Events::from_fn(move |e| sink.lock().unwrap().push(e));
            let result = drive(&identity, ScriptedLink(script.clone()), config, events).await;
            let events = seen.lock().unwrap().clone();
            Run {
                result,
                events,
                script,
            }
        }

        const fn train(round_id: u64, model_version: u64) -> RoundReply {
            RoundReply::Train {
                round_id,
                model_version,
            }
        }

        #[tokio::test(start_paused = true)]
        async fn trains_submits_and_caches_the_model_by_version() {
            let run = run(&[train(1, 0), train(2, 0), train(3, 1)], |_, config| {
                config.max_rounds = Some(3);
            })
            .await;
            let summary = run.summary();
            assert_eq!(summary.stop, StopReason::MaxRounds);
            assert_eq!(summary.rounds.len(), 3);
            assert!(summary.rounds.iter().all(|r| r.status == "accepted"));
            assert_eq!(summary.sessions_opened, 1);
            assert_eq!(
                summary.models_downloaded, 2,
                "version 0 once, version 1 once"
            );
            assert_eq!(run.script.lock().unwrap().downloads, 2);
            assert!(run.events.iter().any(|e| matches!(
                e,
                DeviceEvent::ModelVerified {
                    version: 0,
                    cached: true,
                    ..
                }
            )));
            assert_eq!(run.trainings(), 3);
            let first = &summary.rounds[0].timings;
            assert!(first.training > Duration::ZERO && first.sealing > Duration::ZERO);
            assert!(
                first.session > Duration::ZERO,
                "the handshake is charged to round 1"
            );
            assert_eq!(summary.rounds[1].timings.session, Duration::ZERO);
            assert_eq!(summary.rounds[1].timings.download, Duration::ZERO);

            let script = run.script.lock().unwrap();
            let versions: Vec<(u64, u64, u64)> = script
                .opened
                .iter()
                .map(|o| {
                    (
                        o.metadata.round_id,
                        o.metadata.model_version,
                        o.metadata.example_count,
                    )
                })
                .collect();
            assert_eq!(versions, [(1, 0, 20), (2, 0, 20), (3, 1, 20)]);
            for opened in &script.opened {
                // The update is a delta: the 2NN's layout, finite, small, not zero.
                Architecture::Mnist2nn.validate(&opened.update).unwrap();
                let flat = opened.update.to_flat();
                assert!(flat.iter().any(|v| *v != 0.0));
                let global = script.global.to_flat();
                let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!(norm(&flat) < norm(&global));
            }
        }

        #[tokio::test(start_paused = true)]
        async fn a_tampered_model_is_refused_and_never_trained_on() {
            let rounds = [train(1, 0), RoundReply::Status(RoundStatus::Finished, None)];
            let run = run(&rounds, |script, _| script.model = ModelReply::FlipByte).await;
            let summary = run.summary();
            assert_eq!(summary.stop, StopReason::Finished);
            assert_eq!(summary.refusals, 1);
            assert!(summary.rounds.is_empty());
            assert_eq!(run.trainings(), 0);
            assert!(run.script.lock().unwrap().opened.is_empty());
            assert!(run.events.iter().any(|e| matches!(
                e,
                DeviceEvent::Refused {
                    round_id: Some(1),
                    ..
                }
            )));

            let strict = run_strict(&rounds).await;
            assert!(matches!(
                strict.result,
                Err(EdgeError::ModelRefused(ModelRefusal::Certificate(
                    ProtocolError::Mismatch("model digest")
                )))
            ));
            assert_eq!(strict.trainings(), 0);
        }

        async fn run_strict(rounds: &[RoundReply]) -> Run {
            run(rounds, |script, config| {
                script.model = ModelReply::FlipByte;
                config.fail_on_refusal = true;
            })
            .await
        }

        #[tokio::test(start_paused = true)]
        async fn an_enclave_restart_reseals_the_same_update_without_retraining() {
            let rounds = [
                train(1, 0),
                train(1, 0),
                RoundReply::Status(RoundStatus::Finished, None),
            ];
            let run = run(&rounds, |script, _| {
                script.submits = [SubmitReply::RestartEnclave].into();
            })
            .await;
            let summary = run.summary();
            assert_eq!(summary.stop, StopReason::Finished);
            assert_eq!(summary.reseals, 1);
            assert_eq!(summary.rounds.len(), 1);
            assert_eq!(run.trainings(), 1, "trained once");
            assert_eq!(summary.models_downloaded, 1);
            let script = run.script.lock().unwrap();
            assert_eq!(script.opened.len(), 1);
            assert_eq!(
                script.opened[0].enclave_generation, 1,
                "sealed to the new key"
            );
            assert!(
                run.events
                    .iter()
                    .any(|e| matches!(e, DeviceEvent::Resealing { round_id: 1 }))
            );
        }

        /// The host recorded the envelope before the enclave died, so it
        /// lists the device as submitted; the device keeps the update and
        /// re-seals it when asked again instead of calling it delivered.
        #[tokio::test(start_paused = true)]
        async fn an_update_lost_in_an_enclave_restart_is_not_taken_as_delivered() {
            let rounds = [
                train(1, 0),
                RoundReply::Status(RoundStatus::Submitted, Some(1)),
                train(1, 0),
                RoundReply::Status(RoundStatus::Finished, None),
            ];
            let run = run(&rounds, |script, _| {
                script.submits = [SubmitReply::RestartEnclave].into();
            })
            .await;
            let summary = run.summary();
            assert_eq!(summary.rounds.len(), 1);
            assert_eq!(summary.rounds[0].status, "accepted");
            assert_eq!(summary.reseals, 1);
            assert_eq!(run.trainings(), 1);
            assert_eq!(run.script.lock().unwrap().opened[0].enclave_generation, 1);
        }

        #[tokio::test(start_paused = true)]
        async fn a_revoked_device_stops_cleanly() {
            let run = run(&[RoundReply::Error(403, "device_revoked")], |_, _| {}).await;
            assert_eq!(run.summary().stop, StopReason::Revoked);
            assert!(matches!(
                run.events.last(),
                Some(DeviceEvent::Stopped(StopOutcome::Stopped(
                    StopReason::Revoked
                )))
            ));
        }

        #[tokio::test(start_paused = true)]
        async fn a_closed_round_is_skipped_and_not_retrained() {
            let rounds = [
                train(1, 0),
                train(1, 0),
                RoundReply::Status(RoundStatus::Finished, None),
            ];
            let run = run(&rounds, |script, _| {
                script.submits = [SubmitReply::Error(409, "round_closed")].into();
            })
            .await;
            let summary = run.summary();
            assert_eq!(summary.skipped, 1);
            assert!(summary.rounds.is_empty());
            assert_eq!(run.trainings(), 1);
            assert!(run.events.iter().any(|e| matches!(
                e,
                DeviceEvent::Skipped { round_id: Some(1), code } if code == "round_closed"
            )));
        }

        #[tokio::test(start_paused = true)]
        async fn an_expired_session_is_replaced() {
            let rounds = [RoundReply::Error(401, "expired"), train(1, 0)];
            let run = run(&rounds, |_, config| config.max_rounds = Some(1)).await;
            let summary = run.summary();
            assert_eq!(summary.sessions_opened, 2);
            assert_eq!(summary.rounds.len(), 1);
            assert_eq!(summary.retries, 0, "the first reconnect is immediate");
        }

        #[tokio::test(start_paused = true)]
        async fn a_lost_receipt_is_recovered_from_the_round_status() {
            let rounds = [
                train(1, 0),
                RoundReply::Status(RoundStatus::Submitted, Some(1)),
                RoundReply::Status(RoundStatus::Finished, None),
            ];
            let run = run(&rounds, |script, _| {
                script.submits = [SubmitReply::DropAfterAccept].into();
            })
            .await;
            let summary = run.summary();
            assert_eq!(summary.rounds.len(), 1);
            assert_eq!(summary.rounds[0].status, STATUS_SUBMITTED);
            assert_eq!(summary.rounds[0].code, CODE_RECEIPT_LOST);
            assert_eq!(summary.retries, 1);
            assert_eq!(run.trainings(), 1);
        }

        #[tokio::test(start_paused = true)]
        async fn the_tamper_hook_rewrites_the_sealed_update() {
            let run = run(&[train(1, 0)], |_, config| {
                config.max_rounds = Some(1);
                config.tamper = Some(Arc::new(|update: TensorMap| {
                    let flat = vec![0.25f32; update.num_parameters()];
                    update.with_flat(&flat).unwrap()
                }));
            })
            .await;
            assert_eq!(run.summary().rounds.len(), 1);
            let script = run.script.lock().unwrap();
            assert!(script.opened[0].update.to_flat().iter().all(|v| *v == 0.25));
        }

        #[tokio::test(start_paused = true)]
        async fn waiting_polls_until_a_round_opens() {
            let rounds = [
                RoundReply::Status(RoundStatus::Waiting, None),
                RoundReply::Status(RoundStatus::NotSelected, Some(1)),
                train(2, 1),
            ];
            let run = run(&rounds, |_, config| config.max_rounds = Some(1)).await;
            assert_eq!(run.summary().rounds[0].round_id, 2);
            let waits = run
                .events
                .iter()
                .filter(|e| matches!(e, DeviceEvent::Waiting { secs: 5 }))
                .count();
            assert_eq!(waits, 2);
        }
    }

    /// `run_device` must be spawnable on a multi-threaded runtime.
    #[allow(dead_code)]
    fn run_device_is_send(identity: &Identity, config: DeviceConfig) {
        fn is_send<T: Send>(_: T) {}
        is_send(run_device(identity, config, Events::none()));
    }
}
