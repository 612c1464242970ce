//! The round controller (the original design's `fl_controller` and
//! `client_manager`): it owns the enclave process and the life cycle of
//! every round, and persists each step so a restarted server resumes.
//!
//! ```text
//!            ┌──────────── enough active devices, not paused, rounds left ───┐
//!            ▼                                                               │
//!  (none / Completed / Failed) ──open──▶ Open ──target reached or deadline──▶ Aggregating
//!                                         │  ▲                                 │
//!     enclave restarted, server restarted │  │ submissions (POST /v1/updates)  ├─ model ──▶ Completed
//!     or minimum missed at the deadline ──┴──┼──────────────▶ Failed ◀─────────┴─ no model
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
//! * A round whose enclave died, or that was open when the server stopped,
//!   cannot be finished (its envelopes were sealed to keys that no longer
//!   exist): it is marked failed and a new round starts from the same model.
//!
//! Only this server runs a controller; it is the deployment's coordinator.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qflare_enclave::frame::{Frame, Kind};
use qflare_enclave::host::{EnclaveClient, EnclaveCommand, EnclaveError, EnclaveInfo};
use qflare_enclave::messages::{
    BeginRoundRequest, CertifyRequest, InitModelRequest, LedgerVerdict, ModelAnswer, OutcomeAnswer,
    RoundDevice, SubmitRequest,
};
use qflare_ml::{Architecture, Dataset, Split};
use qflare_protocol::attestation::{AttestationMode, AttestationPolicy, AttestationReport};
use qflare_protocol::crypto::sha256;
use qflare_protocol::identity::DeviceId;
use qflare_protocol::model::ModelCertificate;
use qflare_store::{ModelRecord, RoundRecord, RoundState, VerdictRecord};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Mutex, Notify, watch};

use crate::app::AppState;
use crate::config::Config;
use crate::ledger::AuditKind;

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
}

/// What `certificate_json` holds for every stored model: the certificate and
/// the enclave key that made it, so a later enclave boot can endorse it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredCertificate {
    /// The enclave's certificate.
    pub certificate: ModelCertificate,
    /// The attestation report of the enclave boot that signed it.
    pub report: AttestationReport,
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
    started: bool,
    paused: bool,
    model: Option<CurrentModel>,
    open: Option<OpenRound>,
    waiting_logged: bool,
    audited_generation: u64,
}

/// A snapshot for watchers (tests, the web page, the demo).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FederationStatus {
    /// The latest round id.
    pub round_id: u64,
    /// Its state.
    pub round_state: Option<RoundState>,
    /// The latest model version.
    pub model_version: Option<u64>,
    /// The enclave's generation.
    pub enclave_generation: u64,
    /// True once `max_rounds` models have been aggregated.
    pub finished: bool,
}

/// The round controller.
pub struct Federation {
    enclave: EnclaveClient,
    architecture: Architecture,
    eval: Option<Dataset>,
    inner: Mutex<Inner>,
    notify: Notify,
    status: watch::Sender<FederationStatus>,
    /// Nanoseconds spent waiting on the enclave for submissions and aggregation.
    enclave_nanos: std::sync::atomic::AtomicU64,
    /// Held (shared) by each submission from storing its envelope to the
    /// enclave's verdict, and (exclusive) while a round leaves `Open`: no
    /// stored envelope can miss the enclave's round.
    gate: tokio::sync::RwLock<()>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("enclave", &self.enclave)
            .field("architecture", &self.architecture)
            .finish_non_exhaustive()
    }
}

fn unix(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// How the server starts its enclave.
pub fn enclave_command(config: &Config) -> Result<EnclaveCommand, FederationError> {
    let mut args = config.enclave.args.clone();
    let mut push = |flag: &str, value: String| {
        args.push(flag.to_owned());
        args.push(value);
    };
    push("--kem", config.enclave.kem_suite.as_str().to_owned());
    push("--threads", config.enclave.threads.to_string());
    if let Some(root) = &config.enclave.root_data {
        push("--root-data", root.display().to_string());
    }
    if let Some(program) = &config.enclave.command {
        return Ok(EnclaveCommand {
            program: program.clone(),
            args,
        });
    }
    let exe = std::env::current_exe()
        .map_err(|e| FederationError::Inconsistent(format!("current executable: {e}")))?;
    let sibling = exe.with_file_name("qflare-enclave");
    if sibling.exists() {
        return Ok(EnclaveCommand {
            program: sibling,
            args,
        });
    }
    let mut own = vec!["enclave".to_owned()];
    own.extend(args);
    Ok(EnclaveCommand {
        program: exe,
        args: own,
    })
}

fn policy(config: &Config, command: &EnclaveCommand) -> Result<AttestationPolicy, FederationError> {
    let mut allowed = Vec::new();
    for text in &config.enclave.allowed_measurements {
        let mut measurement = [0u8; 48];
        hex::decode_to_slice(text, &mut measurement).map_err(|_| {
            FederationError::Inconsistent("enclave.allowed_measurements: bad hex".into())
        })?;
        allowed.push(measurement);
    }
    if config.enclave.trust_spawned_binary {
        let measurement = qflare_enclave::backend::measure_file(&command.program).map_err(|e| {
            FederationError::Inconsistent(format!("measuring {}: {e}", command.program.display()))
        })?;
        allowed.push(measurement);
    }
    Ok(AttestationPolicy {
        allowed_measurements: allowed,
        allowed_modes: if config.enclave.allow_software_mode {
            vec![AttestationMode::Software]
        } else {
            Vec::new()
        },
        max_age_secs: 600,
    })
}

impl Federation {
    /// Starts and attests the enclave, loads the evaluation set.
    pub async fn start(config: &Config) -> Result<Arc<Self>, FederationError> {
        let command = enclave_command(config)?;
        let policy = policy(config, &command)?;
        let enclave = EnclaveClient::start(
            command,
            policy,
            Duration::from_secs(config.enclave.request_timeout_secs.max(5)),
        )
        .await?;
        let architecture: Architecture = config
            .federation
            .architecture
            .parse()
            .map_err(|e: qflare_ml::MlError| FederationError::Inconsistent(e.to_string()))?;
        let eval = match &config.federation.eval_data {
            Some(dir) => Some(load_eval(dir.clone(), config.federation.eval_examples).await?),
            None => None,
        };
        let (status, _) = watch::channel(FederationStatus::default());
        Ok(Arc::new(Self {
            enclave,
            architecture,
            eval,
            inner: Mutex::new(Inner {
                started: config.federation.auto_start,
                ..Inner::default()
            }),
            notify: Notify::new(),
            status,
            enclave_nanos: std::sync::atomic::AtomicU64::new(0),
            gate: tokio::sync::RwLock::new(()),
        }))
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

    /// Starts (or resumes) training; `max_rounds` replaces the configured limit when given.
    pub async fn start_training(&self) {
        let mut inner = self.inner.lock().await;
        inner.started = true;
        inner.paused = false;
        drop(inner);
        self.poke();
    }

    /// Stops opening new rounds (an open round still finishes).
    pub async fn pause(&self) {
        self.inner.lock().await.paused = true;
    }

    /// True when rounds are being started.
    pub async fn running(&self) -> bool {
        let inner = self.inner.lock().await;
        inner.started && !inner.paused
    }

    /// The controller loop; returns when `shutdown` fires.
    pub async fn run(self: Arc<Self>, state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(err) = self.step(&state).await {
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

    async fn publish(&self, state: &AppState) {
        let round = state.store.latest_round().await.ok().flatten();
        let model = state.store.latest_model().await.ok().flatten();
        let finished = is_finished(state, model.as_ref().map(|m| m.version));
        if let Some(round) = &round {
            state
                .metrics
                .current_round
                .set(i64::try_from(round.id).unwrap_or(i64::MAX));
        }
        if let Some(model) = &model {
            state
                .metrics
                .model_version
                .set(i64::try_from(model.version).unwrap_or(i64::MAX));
        }
        self.status.send_replace(FederationStatus {
            round_id: round.as_ref().map_or(0, |r| r.id),
            round_state: round.map(|r| r.state),
            model_version: model.map(|m| m.version),
            enclave_generation: self.enclave.generation(),
            finished,
        });
    }

    /// One decision of the controller.
    pub async fn step(&self, state: &AppState) -> Result<(), FederationError> {
        let enclave = self.enclave.ensure_running().await?;
        let new_generation = {
            let mut inner = self.inner.lock().await;
            let new = inner.audited_generation != enclave.generation;
            inner.audited_generation = enclave.generation;
            new
        };
        if new_generation {
            state
                .audit(
                    AuditKind::EnclaveAttested,
                    "server",
                    &enclave.generation.to_string(),
                    json!({
                        "measurement": hex::encode(enclave.verified.measurement),
                        "mode": enclave.verified.mode.as_str(),
                        "enclave_key_sha256": hex::encode(sha256(enclave.verified.verifying_key.as_bytes())),
                        "hardening": enclave.hardening,
                    }),
                )
                .await;
        }
        let latest = state.store.latest_round().await?;
        let now = state.now();
        match latest {
            Some(round) if round.state == RoundState::Open => {
                let known = self.inner.lock().await.open.clone();
                match known {
                    Some(open)
                        if open.round_id == round.id && open.generation == enclave.generation =>
                    {
                        let all_in = open.submitted.len() >= round.target_updates as usize;
                        if all_in || now >= unix(round.deadline) {
                            self.close_round(state, &round, &open, now).await?;
                        }
                    }
                    Some(open) if open.round_id == round.id => {
                        self.fail_round(
                            state,
                            &round,
                            RoundState::Open,
                            "the enclave restarted; its keys are gone",
                        )
                        .await?;
                    }
                    _ => {
                        self.fail_round(
                            state,
                            &round,
                            RoundState::Open,
                            "the server restarted during the round",
                        )
                        .await?;
                    }
                }
            }
            Some(round) if round.state == RoundState::Aggregating => {
                self.fail_round(
                    state,
                    &round,
                    RoundState::Aggregating,
                    "interrupted during aggregation",
                )
                .await?;
            }
            latest => {
                let (started, paused) = {
                    let inner = self.inner.lock().await;
                    (inner.started, inner.paused)
                };
                let model = self.current_model(state, &enclave).await?;
                if started && !paused && !is_finished(state, Some(model.version)) {
                    let next_id = latest.map_or(1, |r| r.id + 1);
                    self.open_round(state, next_id, &model, &enclave, now)
                        .await?;
                }
            }
        }
        self.publish(state).await;
        Ok(())
    }

    /// The current model, certified by the running enclave (creating model 0
    /// or re-certifying after an enclave restart as needed).
    pub async fn current_model(
        &self,
        state: &AppState,
        enclave: &EnclaveInfo,
    ) -> Result<CurrentModel, FederationError> {
        let stored = state.store.latest_model().await?;
        {
            let inner = self.inner.lock().await;
            if let (Some(model), Some(stored)) = (&inner.model, &stored)
                && model.version == stored.version
                && model.generation == enclave.generation
            {
                return Ok(model.clone());
            }
        }
        let current_key = enclave.verified.verifying_key.clone();
        let (version, bytes, certificate) = match stored {
            None => {
                let request = InitModelRequest {
                    architecture: self.architecture.to_string(),
                    seed: state.config.federation.model_seed,
                };
                let answer = self
                    .enclave
                    .call_expecting(
                        &Frame::new(Kind::InitModel, &request, Vec::new()),
                        Kind::Model,
                    )
                    .await?;
                let certificate = answer
                    .meta::<ModelAnswer>()
                    .map_err(EnclaveError::from)?
                    .certificate;
                let bytes = answer.blobs.into_iter().next().ok_or_else(|| {
                    FederationError::Inconsistent("the enclave sent no model".into())
                })?;
                self.store_model(state, 0, 0, &bytes, &certificate, &enclave.report)
                    .await?;
                self.evaluate(state, 0, &bytes).await;
                (0, bytes, certificate)
            }
            Some(record) => {
                let stored: StoredCertificate = serde_json::from_str(&record.certificate_json)
                    .map_err(|e| {
                        FederationError::Inconsistent(format!("stored certificate: {e}"))
                    })?;
                let certificate = if stored.report.verifying_key == current_key.as_bytes() {
                    stored.certificate
                } else {
                    let previous_key = hex::encode(&sha256(&stored.report.verifying_key)[..8]);
                    state
                        .audit(
                            AuditKind::ModelRecertified,
                            "enclave",
                            &record.version.to_string(),
                            json!({
                                "model_sha256": hex::encode(stored.certificate.model_sha256),
                                "previous_enclave_key": previous_key,
                                "generation": enclave.generation,
                            }),
                        )
                        .await;
                    let request = CertifyRequest {
                        certificate: stored.certificate,
                        previous_report: stored.report,
                    };
                    let answer = self
                        .enclave
                        .call_expecting(
                            &Frame::new(Kind::Certify, &request, vec![record.bytes.clone()]),
                            Kind::Model,
                        )
                        .await?;
                    answer
                        .meta::<ModelAnswer>()
                        .map_err(EnclaveError::from)?
                        .certificate
                };
                (record.version, record.bytes, certificate)
            }
        };
        let model = CurrentModel {
            version,
            bytes: Arc::new(bytes),
            certificate,
            enclave_key_sha256: sha256(current_key.as_bytes()),
            generation: enclave.generation,
        };
        self.inner.lock().await.model = Some(model.clone());
        Ok(model)
    }

    async fn store_model(
        &self,
        state: &AppState,
        version: u64,
        round_id: u64,
        bytes: &[u8],
        certificate: &ModelCertificate,
        report: &AttestationReport,
    ) -> Result<(), FederationError> {
        let stored = StoredCertificate {
            certificate: certificate.clone(),
            report: report.clone(),
        };
        state
            .store
            .insert_model(&ModelRecord {
                version,
                round_id,
                architecture: self.architecture.to_string(),
                bytes: bytes.to_vec(),
                certificate_json: serde_json::to_string(&stored)
                    .map_err(|e| FederationError::Inconsistent(e.to_string()))?,
                created_at: state.now_i64(),
                accuracy: None,
                loss: None,
            })
            .await?;
        Ok(())
    }

    async fn evaluate(&self, state: &AppState, version: u64, bytes: &[u8]) {
        let Some(eval) = self.eval.clone() else {
            return;
        };
        let architecture = self.architecture;
        let bytes = bytes.to_vec();
        let outcome = tokio::task::spawn_blocking(move || {
            let model = qflare_protocol::tensor::TensorMap::from_safetensors(
                &bytes,
                qflare_protocol::wire::limits::TENSORS,
            )?;
            Ok::<_, FederationError>(qflare_ml::evaluate(architecture, &model, &eval)?)
        })
        .await;
        match outcome {
            Ok(Ok(metrics)) => {
                tracing::info!(
                    version,
                    accuracy = metrics.accuracy,
                    loss = metrics.loss,
                    "evaluated the global model"
                );
                if let Err(err) = state
                    .store
                    .set_model_metrics(version, metrics.accuracy, metrics.loss)
                    .await
                {
                    tracing::warn!(%err, "could not store model metrics");
                }
            }
            Ok(Err(err)) => tracing::warn!(%err, "evaluation failed"),
            Err(err) => tracing::warn!(%err, "evaluation task failed"),
        }
    }

    async fn open_round(
        &self,
        state: &AppState,
        round_id: u64,
        model: &CurrentModel,
        enclave: &EnclaveInfo,
        now: u64,
    ) -> Result<(), FederationError> {
        let config = &state.config.federation;
        let horizon = i64::try_from(now.saturating_sub(config.active_within_secs)).unwrap_or(0);
        let eligible: Vec<_> = state
            .store
            .list_devices()
            .await?
            .into_iter()
            .filter(|d| {
                d.revoked_at.is_none() && d.last_seen_at.unwrap_or(d.enrolled_at) >= horizon
            })
            .collect();
        let wanted = match config.fraction {
            Some(fraction) => {
                ((fraction * eligible.len() as f64).ceil() as usize).max(config.min_updates)
            }
            None => config.clients_per_round,
        }
        .min(eligible.len());
        if eligible.len() < config.min_updates || wanted < config.min_updates {
            let mut inner = self.inner.lock().await;
            if !inner.waiting_logged {
                tracing::info!(
                    eligible = eligible.len(),
                    needed = config.min_updates,
                    "waiting for enough active devices"
                );
                inner.waiting_logged = true;
            }
            return Ok(());
        }
        let selected: Vec<_> = {
            let mut rng = rand::rng();
            rand::seq::IndexedRandom::sample(eligible.as_slice(), &mut rng, wanted)
                .cloned()
                .collect()
        };
        let mut devices = Vec::with_capacity(selected.len());
        for device in &selected {
            let (_, key) = crate::api::public::device_keys(device)
                .map_err(|e| FederationError::Inconsistent(e.to_string()))?;
            devices.push(RoundDevice {
                device_id: DeviceId::parse(&device.id)?,
                signature_suite: key.suite(),
                verifying_key: key.as_bytes().to_vec(),
            });
        }
        let mut aggregation = state.config.aggregation.clone();
        aggregation.min_accepted = aggregation.min_accepted.max(config.min_updates);
        let training = &config.training;
        let request = BeginRoundRequest {
            round_id,
            model_version: model.version,
            architecture: self.architecture.to_string(),
            config: aggregation,
            devices,
            reference_training: Some(qflare_ml::TrainConfig {
                learning_rate: training.learning_rate,
                batch_size: training.batch_size,
                epochs: training.epochs,
                seed: round_id,
            }),
        };
        let mut blobs = vec![model.bytes.to_vec()];
        if model.version > 0
            && let Some(previous) = state.store.get_model(model.version - 1).await?
        {
            blobs.push(previous.bytes);
        }
        self.enclave
            .call_expecting(&Frame::new(Kind::BeginRound, &request, blobs), Kind::Ack)
            .await?;
        let deadline = now.saturating_add(config.round_timeout_secs);
        let record = RoundRecord {
            id: round_id,
            state: RoundState::Open,
            base_model_version: model.version,
            config_json:
                json!({ "architecture": self.architecture.to_string(), "training": training })
                    .to_string(),
            min_updates: u32::try_from(config.min_updates).unwrap_or(u32::MAX),
            target_updates: u32::try_from(selected.len()).unwrap_or(u32::MAX),
            opened_at: state.now_i64(),
            deadline: i64::try_from(deadline).unwrap_or(i64::MAX),
            closed_at: None,
            attempt: 1,
            outcome_json: None,
        };
        let ids: Vec<String> = selected.iter().map(|d| d.id.clone()).collect();
        state.store.create_round(&record, &ids).await?;
        {
            let mut inner = self.inner.lock().await;
            inner.open = Some(OpenRound {
                round_id,
                generation: enclave.generation,
                submitted: HashSet::new(),
                not_rejected: 0,
            });
            inner.waiting_logged = false;
        }
        tracing::info!(
            round_id,
            model_version = model.version,
            selected = ids.len(),
            "round opened"
        );
        state
            .audit(
                AuditKind::RoundOpened,
                "server",
                &round_id.to_string(),
                json!({ "model_version": model.version, "selected": ids, "deadline": deadline }),
            )
            .await;
        Ok(())
    }

    async fn fail_round(
        &self,
        state: &AppState,
        round: &RoundRecord,
        from: RoundState,
        reason: &str,
    ) -> Result<(), FederationError> {
        let outcome = json!({ "error": reason }).to_string();
        if state
            .store
            .transition_round(
                round.id,
                from,
                RoundState::Failed,
                state.now_i64(),
                Some(&outcome),
            )
            .await?
        {
            tracing::warn!(round_id = round.id, reason, "round failed");
            state
                .audit(
                    AuditKind::RoundFailed,
                    "server",
                    &round.id.to_string(),
                    json!({ "reason": reason }),
                )
                .await;
        }
        let mut inner = self.inner.lock().await;
        if inner.open.as_ref().is_some_and(|o| o.round_id == round.id) {
            inner.open = None;
        }
        Ok(())
    }

    async fn close_round(
        &self,
        state: &AppState,
        round: &RoundRecord,
        open: &OpenRound,
        now: u64,
    ) -> Result<(), FederationError> {
        if open.not_rejected < round.min_updates as usize && now < unix(round.deadline) {
            return Ok(());
        }
        let moved = {
            // Wait for submissions in flight to reach the enclave first.
            let _exclusive = self.gate.write().await;
            state
                .store
                .transition_round(
                    round.id,
                    RoundState::Open,
                    RoundState::Aggregating,
                    state.now_i64(),
                    None,
                )
                .await?
        };
        if !moved {
            return Ok(());
        }
        let answer = match self
            .timed(self.enclave.call_expecting(
                &Frame::new(Kind::Finalize, &json!({}), Vec::new()),
                Kind::Outcome,
            ))
            .await
        {
            Ok(answer) => answer,
            Err(err) => {
                self.fail_round(
                    state,
                    round,
                    RoundState::Aggregating,
                    &format!("the enclave failed: {err}"),
                )
                .await?;
                return Ok(());
            }
        };
        let outcome: OutcomeAnswer = answer.meta().map_err(EnclaveError::from)?;
        self.record_verdicts(state, round.id, &outcome.verdicts)
            .await;
        let model_blob = answer.blobs.into_iter().next();
        match (outcome.aggregated, outcome.certificate, model_blob) {
            (true, Some(certificate), Some(bytes)) => {
                let enclave = self.enclave.ensure_running().await?;
                let version = certificate.model_version;
                self.store_model(
                    state,
                    version,
                    round.id,
                    &bytes,
                    &certificate,
                    &enclave.report,
                )
                .await?;
                let accepted = outcome
                    .verdicts
                    .iter()
                    .filter(|v| v.status == "accepted")
                    .count();
                let summary = json!({
                    "model_version": version,
                    "model_sha256": hex::encode(certificate.model_sha256),
                    "accepted": accepted,
                    "rejected": outcome.verdicts.len() - accepted,
                    "stats": outcome.stats,
                });
                state
                    .store
                    .transition_round(
                        round.id,
                        RoundState::Aggregating,
                        RoundState::Completed,
                        state.now_i64(),
                        Some(&summary.to_string()),
                    )
                    .await?;
                state
                    .audit(
                        AuditKind::RoundAggregated,
                        "enclave",
                        &round.id.to_string(),
                        summary,
                    )
                    .await;
                {
                    let mut inner = self.inner.lock().await;
                    inner.model = Some(CurrentModel {
                        version,
                        bytes: Arc::new(bytes.clone()),
                        certificate,
                        enclave_key_sha256: sha256(enclave.verified.verifying_key.as_bytes()),
                        generation: enclave.generation,
                    });
                    inner.open = None;
                }
                tracing::info!(round_id = round.id, version, accepted, "round aggregated");
                self.evaluate(state, version, &bytes).await;
            }
            _ => {
                let reason = outcome
                    .error
                    .unwrap_or_else(|| "the enclave produced no model".into());
                self.fail_round(state, round, RoundState::Aggregating, &reason)
                    .await?;
            }
        }
        Ok(())
    }

    async fn record_verdicts(&self, state: &AppState, round_id: u64, verdicts: &[LedgerVerdict]) {
        let records: Vec<VerdictRecord> = verdicts
            .iter()
            .map(|v| VerdictRecord {
                device_id: v.device_id.to_hex(),
                verdict: v.status.clone(),
                reason: Some(v.code.clone()),
            })
            .collect();
        if let Err(err) = state.store.set_verdicts(round_id, &records).await {
            tracing::warn!(%err, "could not store verdicts");
        }
        for verdict in verdicts {
            let kind = if verdict.status == "accepted" {
                AuditKind::UpdateAccepted
            } else {
                AuditKind::UpdateRejected
            };
            state
                .audit(
                    kind,
                    "enclave",
                    &verdict.device_id.to_hex(),
                    json!({
                        "round_id": round_id,
                        "code": verdict.code,
                        "score": verdict.score,
                        "norm": verdict.norm,
                        "cosine": verdict.cosine,
                    }),
                )
                .await;
        }
    }

    /// Forwards a stored envelope to the enclave and counts its verdict.
    pub async fn submit(
        &self,
        round_id: u64,
        device_id: DeviceId,
        envelope: Vec<u8>,
    ) -> Result<LedgerVerdict, FederationError> {
        let answer = self
            .timed(self.enclave.call_expecting(
                &Frame::new(Kind::Submit, &SubmitRequest { device_id }, vec![envelope]),
                Kind::Verdict,
            ))
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(err) => {
                self.poke();
                return Err(err.into());
            }
        };
        let verdict: LedgerVerdict = answer.meta().map_err(EnclaveError::from)?;
        let mut inner = self.inner.lock().await;
        if let Some(open) = inner.open.as_mut().filter(|o| o.round_id == round_id) {
            open.submitted.insert(device_id.to_hex());
            if verdict.status != "rejected" {
                open.not_rejected += 1;
            }
        }
        drop(inner);
        self.poke();
        Ok(verdict)
    }

    /// A fresh report for a device's nonce.
    pub async fn attest(&self, nonce: [u8; 32]) -> Result<AttestationReport, FederationError> {
        Ok(self.enclave.attest(nonce).await?)
    }

    /// The evaluation set, if configured.
    pub fn has_evaluation(&self) -> bool {
        self.eval.is_some()
    }
}

fn is_finished(state: &AppState, model_version: Option<u64>) -> bool {
    let max = state.config.federation.max_rounds;
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
