//! The round controller (the original design's `fl_controller` and
//! `client_manager`): it owns the enclave process and the life cycle of
//! every round, and persists each step so a restarted server resumes.
//!
//! ```text
//!            ┌──────────── enough active devices, not paused, rounds left ───┐
//!            ▼                                                               │
//!  (none / Completed / Failed) ──open──▶ Open ──target reached or deadline──▶ Aggregating
//!                                        │ ▲ ▲                               │    │
//!                                        │ │ └─ resumed: the enclave or the ─┘    ├─ model ──▶ Completed
//!                                        │ │    server restarted (same id,        │
//!                                        │ │    same devices, new boot)           │
//!                                        │ └─ submissions (POST /v1/updates)      │
//!     minimum missed at the deadline, ───┴──────────────▶ Failed ◀────────────────┴─ no model
//!     or the resume refused
//! ```
//!
//! * Opening: the enclave certifies the starting model (it creates version 0
//!   itself; after an enclave restart it re-certifies the stored model with
//!   the previous boot's key), devices are selected at random among the
//!   active ones, the enclave begins the round with their registered keys.
//! * Submissions are stored (sealed) and forwarded; the enclave answers each
//!   with a provisional verdict.
//! * Closing: the enclave aggregates and signs the new model; every verdict
//!   goes to the ledger; the model is stored and evaluated on the held-out set.
//! * A round whose enclave died, or that was open (or aggregating) when the
//!   server stopped, is resumed: the same round id is begun again in the
//!   running enclave boot with the same model version and devices, the
//!   submissions sealed to the dead boot's keys are cleared (and their
//!   envelopes deleted: nothing can open them), the deadline is renewed, and
//!   the devices re-seal the updates they kept — each at most once per round
//!   — without training again (`round::resume_round`).
//! * Envelopes are deleted once their round closes, whatever the outcome.
//!
//! One replica at a time runs a controller: the coordinator
//! (`crate::coordination` decides which, and starts and stops it).
//!
//! The controller sees only what it needs ([`ControllerContext`]: the
//! configuration, the store, the audit ledger, metrics and the clock), never
//! the HTTP layer; handlers reach it through `AppState::federation`.
//! `launch` starts and pins the enclave, `model` keeps the certified current
//! model, `round` opens, closes and fails rounds.

mod launch;
mod model;
pub mod privacy;
mod round;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qflare_enclave::host::{EnclaveClient, EnclaveError};
use qflare_ml::{Architecture, Dataset, Split};
use qflare_protocol::attestation::AttestationReport;
use qflare_protocol::crypto::sha256;
use qflare_protocol::model::ModelCertificate;
use qflare_store::{RoundState, Store, TrainingControl};
use serde_json::json;
use tokio::sync::{Mutex, Notify, watch};

use crate::clock::{Clock, store_time};
use crate::config::Config;
use crate::ledger::{AuditKind, Auditor};
use crate::metrics::Metrics;

pub use launch::enclave_command;
pub use model::{RegisteredModel, StoredCertificate};

/// Why the federation could not do something.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The enclave failed or refused.
    #[error(transparent)]
    Enclave(#[from] EnclaveError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] qflare_store::StoreError),
    /// Something stored is not what it should be.
    #[error("{0}")]
    Inconsistent(String),
    /// The ML crate failed.
    #[error(transparent)]
    Ml(#[from] qflare_ml::MlError),
    /// A protocol operation failed.
    #[error(transparent)]
    Protocol(#[from] qflare_protocol::ProtocolError),
    /// A model file cannot be registered (it is refused, or one is
    /// registered already).
    #[error("{0}")]
    ModelRefused(String),
    /// Registration was asked of a federation that already has a model.
    #[error("{0}")]
    ModelExists(String),
    /// A custom model's federation has no model until an admin registers one.
    #[error("no model is registered yet: run `qflare model init --from FILE`")]
    NoModel,
    /// The round is open but not yet begun in the running enclave boot
    /// (it restarted, or the server did): it is being resumed.
    #[error("round {0} is being resumed in a new enclave boot")]
    Resuming(u64),
}

/// Everything the controller works with, and nothing of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ControllerContext {
    /// The configuration the server started with.
    pub config: Config,
    /// Persistent state.
    pub store: Arc<dyn Store>,
    /// The audit ledger.
    pub auditor: Auditor,
    /// Prometheus metrics (the round and model gauges).
    pub metrics: Arc<Metrics>,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
}

/// The current model as devices should download it: the bytes and a
/// certificate from the *running* enclave.
#[derive(Debug, Clone)]
pub struct CurrentModel {
    /// The version.
    pub version: u64,
    /// The safetensors bytes.
    pub bytes: Arc<Vec<u8>>,
    /// The running enclave's certificate of them.
    pub certificate: ModelCertificate,
    /// SHA-256 of the certifying key.
    pub enclave_key_sha256: [u8; 32],
    generation: u64,
}

#[derive(Debug, Clone)]
struct OpenRound {
    round_id: u64,
    generation: u64,
    submitted: HashSet<String>,
    not_rejected: usize,
}

#[derive(Debug, Default)]
struct Inner {
    model: Option<CurrentModel>,
    open: Option<OpenRound>,
    waiting_logged: bool,
    waiting_for_model_logged: bool,
    audited_generation: u64,
    /// Central DP's budget stopped training (logged once).
    privacy_exhausted: bool,
}

/// A snapshot for watchers (tests, the web page, the demo).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FederationStatus {
    /// The latest round id.
    pub round_id: u64,
    /// Its state.
    pub round_state: Option<RoundState>,
    /// Its attempt: grows when the round is resumed in a new enclave boot,
    /// which sends its devices back to work under the same id and state.
    pub round_attempt: u32,
    /// The latest model version.
    pub model_version: Option<u64>,
    /// The enclave's generation.
    pub enclave_generation: u64,
    /// True once `max_rounds` models have been aggregated, or central DP's
    /// budget allows no further round.
    pub finished: bool,
}

/// The round controller.
pub struct Federation {
    ctx: ControllerContext,
    enclave: EnclaveClient,
    /// The built-in architecture the enclave creates model 0 of; `None`
    /// for `custom`, where an admin registers the model.
    preset: Option<Architecture>,
    eval: Option<Dataset>,
    /// Held while model 0 is created or registered, so the two cannot race.
    model_creation: Mutex<()>,
    inner: Mutex<Inner>,
    notify: Notify,
    status: watch::Sender<FederationStatus>,
    /// Nanoseconds spent waiting on the enclave for submissions and aggregation.
    enclave_nanos: std::sync::atomic::AtomicU64,
    /// Held (shared) by each submission from recording it to the enclave's
    /// verdict, and (exclusive) while a round leaves `Open`: no recorded
    /// submission can miss the enclave's round.
    gate: tokio::sync::RwLock<()>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("enclave", &self.enclave)
            .field("preset", &self.preset)
            .finish_non_exhaustive()
    }
}

impl Federation {
    /// Starts and attests the enclave, loads the evaluation set.
    pub async fn start(ctx: ControllerContext) -> Result<Arc<Self>, FederationError> {
        let config = &ctx.config;
        let command = enclave_command(config)?;
        let policy = launch::policy(config, &command)?;
        let enclave = EnclaveClient::start(
            command,
            policy,
            Duration::from_secs(config.enclave.request_timeout_secs.max(5)),
        )
        .await?;
        let preset = if config.federation.architecture == crate::config::CUSTOM_MODEL {
            None
        } else {
            Some(
                config
                    .federation
                    .architecture
                    .parse::<Architecture>()
                    .map_err(|e| FederationError::Inconsistent(e.to_string()))?,
            )
        };
        // The server can only evaluate what it can run: a built-in architecture.
        let eval = match (&config.federation.eval_data, preset) {
            (Some(dir), Some(_)) => {
                Some(load_eval(dir.clone(), config.federation.eval_examples).await?)
            }
            (Some(_), None) => {
                tracing::warn!(
                    "federation.eval_data is ignored for a custom model: devices report \
                     federated evaluation instead"
                );
                None
            }
            (None, _) => None,
        };
        let (status, _) = watch::channel(FederationStatus::default());
        Ok(Arc::new(Self {
            ctx,
            enclave,
            preset,
            eval,
            model_creation: Mutex::new(()),
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            status,
            enclave_nanos: std::sync::atomic::AtomicU64::new(0),
            gate: tokio::sync::RwLock::new(()),
        }))
    }

    fn now(&self) -> u64 {
        self.ctx.clock.now()
    }

    fn now_i64(&self) -> i64 {
        store_time(self.now())
    }

    /// Hold this from storing a submission until the enclave has judged it.
    pub async fn submission_gate(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// Time spent in the enclave on submissions and aggregation so far.
    pub fn enclave_time(&self) -> Duration {
        Duration::from_nanos(
            self.enclave_nanos
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    async fn timed<T>(&self, work: impl Future<Output = T>) -> T {
        let start = std::time::Instant::now();
        let out = work.await;
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.enclave_nanos
            .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// The enclave handle.
    pub fn enclave(&self) -> &EnclaveClient {
        &self.enclave
    }

    /// Watches round and model progress.
    pub fn subscribe(&self) -> watch::Receiver<FederationStatus> {
        self.status.subscribe()
    }

    /// Wakes the controller (after a submission or an admin action).
    pub fn poke(&self) {
        self.notify.notify_one();
    }

    /// Records the admin's start or pause (in the store, so that it holds
    /// for whichever replica coordinates, also after a restart) and acts on
    /// it at once. A pause lets an open round finish.
    pub async fn control(&self, control: TrainingControl) -> Result<(), FederationError> {
        self.ctx
            .store
            .set_training_control(control, self.now_i64())
            .await?;
        self.poke();
        Ok(())
    }

    /// True when rounds are being started: the admin's last start or
    /// pause, else `federation.auto_start`.
    pub async fn running(&self) -> Result<bool, FederationError> {
        is_running(self.ctx.store.as_ref(), &self.ctx.config).await
    }

    /// The controller loop; returns when `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Envelopes an earlier version kept, or that a crash between closing
        // a round and deleting them left behind.
        self.discard_closed_envelopes().await;
        loop {
            if let Err(err) = self.step().await {
                tracing::warn!(%err, "round controller step failed; retrying");
            }
            tokio::select! {
                () = self.notify.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => {
                    self.enclave.shutdown().await;
                    return;
                }
            }
        }
    }

    async fn publish(&self) {
        let round = self.ctx.store.latest_round().await.ok().flatten();
        let model = self.ctx.store.latest_model_summary().await.ok().flatten();
        let finished = is_finished(&self.ctx.config, model.as_ref().map(|m| m.version))
            || self.inner.lock().await.privacy_exhausted;
        if let Some(round) = &round {
            self.ctx.metrics.current_round.set(store_time(round.id));
        }
        if let Some(model) = &model {
            self.ctx
                .metrics
                .model_version
                .set(store_time(model.version));
        }
        let now = FederationStatus {
            round_id: round.as_ref().map_or(0, |r| r.id),
            round_attempt: round.as_ref().map_or(0, |r| r.attempt),
            round_state: round.map(|r| r.state),
            model_version: model.map(|m| m.version),
            enclave_generation: self.enclave.generation(),
            finished,
        };
        // Watchers (held device polls among them) wake only on a change,
        // not on every controller step.
        self.status.send_if_modified(|status| {
            let changed = *status != now;
            *status = now;
            changed
        });
    }

    /// One decision of the controller.
    pub async fn step(&self) -> Result<(), FederationError> {
        let enclave = self.enclave.ensure_running().await?;
        let new_generation = {
            let mut inner = self.inner.lock().await;
            let new = inner.audited_generation != enclave.generation;
            inner.audited_generation = enclave.generation;
            new
        };
        if new_generation {
            self.ctx
                .auditor
                .audit(
                    AuditKind::EnclaveAttested,
                    "server",
                    &enclave.generation.to_string(),
                    json!({
                        "measurement": hex::encode(enclave.verified.measurement),
                        "mode": enclave.verified.mode.as_str(),
                        "enclave_key_sha256": hex::encode(sha256(enclave.verified.verifying_key.as_bytes())),
                        // What the enclave signed about its own process,
                        // not the unsigned summary it also sends.
                        "runtime": enclave.verified.runtime,
                        // Hardware modes: the evidence and what it showed.
                        "evidence_sha384": enclave.verified.evidence.as_ref()
                            .map(|evidence| hex::encode(evidence.evidence_sha384)),
                        "platform": enclave.verified.evidence.as_ref()
                            .map(|evidence| evidence.platform.as_str()),
                    }),
                )
                .await;
        }
        let latest = self.ctx.store.latest_round().await?;
        let now = self.now();
        match latest {
            Some(round) if round.state == RoundState::Open => {
                let known = self.inner.lock().await.open.clone();
                match known {
                    Some(open)
                        if open.round_id == round.id && open.generation == enclave.generation =>
                    {
                        let all_in = open.submitted.len() >= round.target_updates as usize;
                        if all_in || now >= unix(round.deadline) {
                            self.close_round(&round, &open, now).await?;
                        }
                    }
                    Some(open) if open.round_id == round.id => {
                        self.resume_round(&round, &enclave, "the enclave restarted", now)
                            .await?;
                    }
                    _ => {
                        self.resume_round(&round, &enclave, "the server restarted", now)
                            .await?;
                    }
                }
            }
            Some(round) if round.state == RoundState::Aggregating => {
                // Only `close_round` moves a round to aggregating, and it
                // runs inside this step: one found here was interrupted (the
                // server died, or the enclave failed while aggregating).
                self.resume_round(&round, &enclave, "the aggregation was interrupted", now)
                    .await?;
            }
            latest => {
                let running = self.running().await?;
                if self.preset.is_none() && self.ctx.store.latest_model_summary().await?.is_none() {
                    let mut inner = self.inner.lock().await;
                    if !inner.waiting_for_model_logged {
                        inner.waiting_for_model_logged = true;
                        tracing::info!(
                            "waiting for an admin to register the model (qflare model init --from FILE)"
                        );
                    }
                    drop(inner);
                    self.publish().await;
                    return Ok(());
                }
                let model = self.current_model(&enclave).await?;
                if running && !is_finished(&self.ctx.config, Some(model.version)) {
                    let next_id = latest.map_or(1, |r| r.id + 1);
                    self.open_round(next_id, &model, &enclave, now).await?;
                }
            }
        }
        self.publish().await;
        Ok(())
    }

    /// A fresh report for a device's nonce.
    pub async fn attest(&self, nonce: [u8; 32]) -> Result<AttestationReport, FederationError> {
        Ok(self.enclave.attest(nonce).await?)
    }

    /// The largest sealed update body a device may send now: what an
    /// update of the current model needs (it has the model's layout), under
    /// the configured `limits.update_bytes`. With no current model no round
    /// is open, and nothing bigger than an ordinary sealed request is read.
    pub async fn update_body_limit(&self) -> usize {
        use qflare_protocol::wire::limits::{sealed_record_for, update_envelope_for};
        let model_len = self
            .inner
            .lock()
            .await
            .model
            .as_ref()
            .map(|m| m.bytes.len());
        match model_len {
            Some(len) => self
                .ctx
                .config
                .limits
                .update_bytes
                .min(sealed_record_for(update_envelope_for(len))),
            None => self.ctx.config.limits.sealed_bytes,
        }
    }

    /// The evaluation set, if configured.
    pub fn has_evaluation(&self) -> bool {
        self.eval.is_some()
    }
}

/// Whether rounds are being started: the admin's last start or pause,
/// else `federation.auto_start`.
pub async fn is_running(store: &dyn Store, config: &Config) -> Result<bool, FederationError> {
    Ok(match store.training_control().await? {
        Some(control) => control == TrainingControl::Started,
        None => config.federation.auto_start,
    })
}

fn unix(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn is_finished(config: &Config, model_version: Option<u64>) -> bool {
    let max = config.federation.max_rounds;
    max > 0 && model_version.is_some_and(|v| v >= max)
}

async fn load_eval(dir: PathBuf, examples: usize) -> Result<Dataset, FederationError> {
    let data = tokio::task::spawn_blocking(move || Dataset::load(&dir, Split::Test))
        .await
        .map_err(|e| FederationError::Inconsistent(format!("loading the test set: {e}")))??;
    Ok(if examples > 0 && examples < data.len() {
        data.head(examples)
    } else {
        data
    })
}
