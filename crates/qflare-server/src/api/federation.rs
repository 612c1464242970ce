//! Federated-learning routes: the device side inside sealed sessions, and
//! the admin's round controls.
//!
//! A little over 600 lines: the five device routes (round, model, upload
//! admission, update, evaluation) and the admin view they feed share the
//! coordination lookups and error mapping here. The seam to split along,
//! when it grows, is the admin half (`view` and the round controls, from
//! `FederationView` down) into its own module.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use qflare_protocol::api::routes;
use qflare_protocol::crypto::sha256;
use qflare_protocol::envelope::{self, UpdateEnvelope};
use qflare_protocol::federation::{
    EvaluationReceipt, EvaluationReport, ModelDownload, ModelQuery, RoundInfo, RoundQuery,
    RoundStatus, SubmitReceipt, UploadAdmission, UploadAdmissionRequest, encode_model_download,
};
use qflare_protocol::identity::DeviceId;
use qflare_protocol::wire::limits;
use qflare_store::{EvaluationRecord, RoundState, SubmissionOutcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::SharedState;
use crate::coordination::{Coordination, Coordinator};
use crate::devices::registered_keys;
use crate::downloads::DownloadShare;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::federation::{Federation, FederationError};
use crate::ledger::AuditKind;
use crate::metrics::Metrics;
use crate::openapi::SealedRecord;
use crate::sealed::SealedRequest;

pub(crate) fn federation(state: &SharedState) -> ApiResult<Arc<Coordination>> {
    state
        .federation
        .clone()
        .ok_or_else(|| ApiError::new(ErrorCode::FederationDisabled))
}

impl From<FederationError> for ApiError {
    fn from(err: FederationError) -> Self {
        match err {
            FederationError::Enclave(qflare_enclave::host::EnclaveError::Died(_)) => {
                ApiError::new(ErrorCode::EnclaveRestarting)
                    .detail(err)
                    .retry_after(2)
            }
            FederationError::Resuming(_) => ApiError::new(ErrorCode::EnclaveRestarting)
                .detail(err)
                .retry_after(2),
            FederationError::Store(store) => store.into(),
            FederationError::ModelRefused(why) => {
                ApiError::new(ErrorCode::InvalidModel).explain(why)
            }
            FederationError::ModelExists(why) => ApiError::new(ErrorCode::ModelExists).explain(why),
            // Reachable from a device route: no detail for the client.
            FederationError::NoModel => ApiError::not_found("no model is registered yet"),
            other => ApiError::internal(other),
        }
    }
}

/// `POST /v1/rounds/current`.
#[utoipa::path(
    post, path = routes::CURRENT_ROUND, tag = "device",
    request_body(content = SealedRecord, content_type = "application/vnd.qflare.sealed", description = "A sealed `RoundQuery`."),
    responses((status = 200, description = "A sealed `RoundInfo`.", content_type = "application/vnd.qflare.sealed", body = SealedRecord)),
)]
pub async fn current_round(State(state): State<SharedState>, request: SealedRequest) -> Response {
    let result = round_info(&state, &request).await;
    request.respond(result)
}

/// A device's poll. It costs the same whatever the round's size and the
/// model's: one indexed participant row and the newest model's summary are
/// read, never an envelope or the model, and the enclave is asked for a
/// fresh report (behind its one lock) only when the answer sends the device
/// to work that needs one: training, or evaluating the final model.
///
/// A long poll (`wait_while`) is held while the answer would still be the
/// device's last one, and looked at again each time the round controller
/// publishes a change, so a device learns of a new round, or of the end of
/// the one it submitted to, when it happens rather than at its next poll.
async fn round_info(state: &SharedState, request: &SealedRequest) -> ApiResult<RoundInfo> {
    let coordination = federation(state)?;
    let query: RoundQuery = request.json("round query", 1024)?;
    // Subscribed before the first look, so that a change between that look
    // and the wait still wakes it.
    let mut changes = coordination.subscribe();
    let mut info = position(state, request).await?;
    if let Some(seen) = query.wait_while {
        let hold = seen
            .max_wait_secs
            .min(state.config.federation.long_poll_secs);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(hold);
        state.metrics.long_polls_held.inc();
        let _held = GaugeHold(&state.metrics.long_polls_held);
        while seen.unchanged_in(&info) {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
            info = position(state, request).await?;
        }
    }
    let needs_report = matches!(info.status, RoundStatus::Train | RoundStatus::Finished);
    info.report = match query.nonce {
        Some(nonce) if needs_report => coordination.attest(Some(nonce)).await?,
        // Nothing to verify now: the enclave is not disturbed.
        Some(_) => None,
        // A client that sends no nonce gets the boot's report, from memory,
        // if there is a running enclave to say it.
        None => coordination.attest(None).await.unwrap_or_default(),
    };
    Ok(info)
}

/// Counts a held poll down when dropped, however the handler ends.
struct GaugeHold<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeHold<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Where the requesting device stands now, without a report.
async fn position(state: &SharedState, request: &SealedRequest) -> ApiResult<RoundInfo> {
    let poll = state.config.federation.poll_interval_secs;
    let latest = state.store.latest_round().await?;
    let model = state.store.latest_model_summary().await?;
    // The controller's own verdict covers central DP's budget too; a
    // replica that does not coordinate sees only `max_rounds` (its devices
    // wait instead, as for a paused federation).
    let finished = (state.config.federation.max_rounds > 0
        && model
            .as_ref()
            .is_some_and(|m| m.version >= state.config.federation.max_rounds))
        || state
            .federation
            .as_ref()
            .is_some_and(|f| f.subscribe().borrow().finished);
    let mut info = RoundInfo {
        status: if finished {
            RoundStatus::Finished
        } else {
            RoundStatus::Waiting
        },
        round_id: None,
        model_version: None,
        architecture: model.as_ref().map(|m| m.architecture.clone()),
        training: None,
        update_encoding: Default::default(),
        deadline: None,
        report: None,
        poll_after_secs: poll,
    };
    if let Some(round) = latest.filter(|r| r.state == RoundState::Open) {
        let participant = state
            .store
            .participant_state(round.id, &request.device.id)
            .await?;
        info.status = match participant {
            None => RoundStatus::NotSelected,
            Some(p) if p.submitted_at.is_some() => RoundStatus::Submitted,
            Some(_) => RoundStatus::Train,
        };
        info.round_id = Some(round.id);
        info.model_version = Some(round.base_model_version);
        info.training = Some(state.config.federation.training.clone());
        info.update_encoding = state.config.federation.update_encoding;
        info.deadline = u64::try_from(round.deadline).ok();
    }
    Ok(info)
}

/// `POST /v1/models/current`: the model devices train from, with the running
/// enclave's certificate, as `header length | header | safetensors`.
#[utoipa::path(
    post, path = routes::CURRENT_MODEL, tag = "device",
    request_body(content = SealedRecord, content_type = "application/vnd.qflare.sealed", description = "A sealed `ModelQuery`."),
    responses((status = 200, description = "A sealed model download: a `ModelDownload` header, then the safetensors bytes.", content_type = "application/vnd.qflare.sealed", body = SealedRecord)),
)]
pub async fn current_model(State(state): State<SharedState>, request: SealedRequest) -> Response {
    let result = model_download(&state, &request).await;
    match result {
        Ok((bytes, share)) => request.respond_download(bytes, share),
        Err(err) => request.respond_error(err),
    }
}

async fn model_download(
    state: &SharedState,
    request: &SealedRequest,
) -> ApiResult<(Vec<u8>, DownloadShare)> {
    let coordination = federation(state)?;
    let _: ModelQuery = request.json("model query", 1024)?;
    let model = coordination.current_model().await?;
    // The copy below is this device's alone (sealed to its session): it
    // waits for its share of the download budget before it is made.
    let share = state
        .downloads
        .reserve(
            &request.device.id,
            model.bytes.len() + limits::MODEL_CERTIFICATE,
        )
        .await?;
    let body = encode_model_download(
        &ModelDownload {
            certificate: model.certificate.clone(),
            enclave_key_sha256: model.enclave_key_sha256,
        },
        &model.bytes,
    )?;
    Ok((body, share))
}

/// `POST /v1/updates/admission`: hold this device's place and bytes for the
/// update it is about to send (see `crate::uploads`).
#[utoipa::path(
    post, path = routes::UPDATE_ADMISSION, tag = "device",
    request_body(content = SealedRecord, content_type = "application/vnd.qflare.sealed", description = "A sealed `UploadAdmissionRequest`."),
    responses((status = 200, description = "A sealed `UploadAdmission`; refusals are those of `POST /v1/updates` before its body (`round_closed`, `not_selected`, `duplicate`, `rate_limited`, `busy` with `Retry-After`, `payload_too_large`).", content_type = "application/vnd.qflare.sealed", body = SealedRecord)),
)]
pub async fn admit_update(State(state): State<SharedState>, request: SealedRequest) -> Response {
    let result = admit_upload(&state, &request).await;
    if let Err(err) = &result {
        Metrics::count(&state.metrics.upload_admissions, err.code.as_str());
    } else {
        Metrics::count(&state.metrics.upload_admissions, "admitted");
    }
    request.respond(result)
}

async fn admit_upload(state: &SharedState, request: &SealedRequest) -> ApiResult<UploadAdmission> {
    let coordination = federation(state)?;
    let asked: UploadAdmissionRequest = request.json("upload admission", 1024)?;
    let limit = coordination.update_body_limit().await;
    let bytes = usize::try_from(asked.bytes).unwrap_or(usize::MAX);
    if bytes > limit {
        return Err(ApiError::too_large(format!(
            "an update of {bytes} bytes is over the limit {limit}"
        )));
    }
    let held = state
        .uploads
        .reserve(
            state.store.as_ref(),
            &request.device.id,
            asked.round_id,
            bytes,
        )
        .await?;
    Ok(UploadAdmission {
        expires_in_secs: held.as_secs(),
    })
}

/// `POST /v1/updates`: check who sent it, record it, forward it sealed.
#[utoipa::path(
    post, path = routes::UPDATES, tag = "device",
    request_body(content = SealedRecord, content_type = "application/vnd.qflare.sealed", description = "A sealed update envelope: signed by the device, sealed to the enclave."),
    responses((status = 200, description = "A sealed `SubmitReceipt`.", content_type = "application/vnd.qflare.sealed", body = SealedRecord)),
)]
pub async fn submit_update(
    State(state): State<SharedState>,
    mut request: SealedRequest,
) -> Response {
    let result = submit(&state, &mut request).await;
    if let Err(err) = &result {
        Metrics::count(&state.metrics.updates, err.code.as_str());
    }
    request.respond(result)
}

async fn submit(state: &SharedState, request: &mut SealedRequest) -> ApiResult<SubmitReceipt> {
    let coordination = federation(state)?;
    let envelope: UpdateEnvelope = envelope::decode(&request.body, limits::UPDATE_ENVELOPE)?;
    let (round_id, device_id) = (envelope.round_id, envelope.device_id);
    if envelope.device_id != request.device_id {
        return Err(ApiError::new(ErrorCode::DeviceMismatch));
    }
    let (_, key) = registered_keys(&request.device).map_err(ApiError::internal)?;
    if let Err(err) = envelope::verify_outer(&envelope, &key) {
        state
            .audit(
                AuditKind::UpdateRejected,
                "server",
                &request.device.id,
                json!({ "round_id": envelope.round_id, "code": "bad_signature" }),
            )
            .await;
        return Err(ApiError::authentication(err));
    }
    // Only the raw body travels on: the decoded copy of its payload goes now.
    drop(envelope);
    // Moved, not cloned, to the enclave; the answer needs only the channel.
    let body = std::mem::take(&mut request.body);
    let receipt = match coordination.coordinator().await? {
        Coordinator::Local(fed) => deliver(state, &fed, round_id, device_id, body).await?,
        Coordinator::Remote { link, address } => {
            link.submit(&address, &request.device.id, body).await?
        }
    };
    Metrics::count(&state.metrics.updates, &receipt.code);
    Ok(receipt)
}

/// Records a submission whose envelope is checked against its device's
/// signature and hands it to this replica's enclave: for a device's own
/// request at the coordinator, and for one another replica forwarded.
pub(crate) async fn deliver(
    state: &SharedState,
    fed: &Federation,
    round_id: u64,
    device_id: DeviceId,
    body: Vec<u8>,
) -> ApiResult<SubmitReceipt> {
    let _gate = fed.submission_gate().await;
    fed.accepting(round_id).await?;
    // The database keeps the envelope's digest, not the envelope: only
    // the enclave boot it is sealed to can use it, and it goes there from
    // memory. Writing every update through the database (and deleting it
    // when the round closes) cost a round of the CNN at 10 devices about
    // 66 MB of writes and WAL checkpoints (docs/benchmarks.md §10).
    let stored = state
        .store
        .record_submission(
            round_id,
            &device_id.to_hex(),
            &sha256(&body),
            state.now_i64(),
        )
        .await?;
    match stored {
        SubmissionOutcome::Stored => {}
        SubmissionOutcome::NotSelected => {
            return Err(ApiError::new(ErrorCode::NotSelected));
        }
        SubmissionOutcome::AlreadySubmitted => {
            return Err(ApiError::new(ErrorCode::Duplicate));
        }
        SubmissionOutcome::DeadlinePassed => {
            return Err(ApiError::new(ErrorCode::DeadlinePassed));
        }
        SubmissionOutcome::RoundNotOpen => {
            return Err(ApiError::new(ErrorCode::RoundClosed));
        }
        SubmissionOutcome::UnknownRound => {
            return Err(ApiError::new(ErrorCode::UnknownRound));
        }
    }
    let verdict = fed.submit(round_id, device_id, body).await?;
    // The enclave's final verdicts (accepted or rejected, with reasons) are
    // written to the ledger when the round closes; auditing them here too
    // would record each one twice.
    Ok(SubmitReceipt {
        round_id,
        status: verdict.status,
        code: verdict.code,
    })
}

/// `POST /v1/evaluations`: a device's evaluation of the model it was sent
/// for a round, on its own held-out data.
#[utoipa::path(
    post, path = routes::EVALUATIONS, tag = "device",
    request_body(content = SealedRecord, content_type = "application/vnd.qflare.sealed", description = "A sealed `EvaluationReport`."),
    responses((status = 200, description = "A sealed `EvaluationReceipt`.", content_type = "application/vnd.qflare.sealed", body = SealedRecord)),
)]
pub async fn submit_evaluation(
    State(state): State<SharedState>,
    request: SealedRequest,
) -> Response {
    let result = record_evaluation(&state, &request).await;
    request.respond(result)
}

async fn record_evaluation(
    state: &SharedState,
    request: &SealedRequest,
) -> ApiResult<EvaluationReceipt> {
    federation(state)?;
    let report: EvaluationReport = request.json("evaluation report", 16 * 1024)?;
    report.validate()?;
    if report.examples > state.config.aggregation.max_example_count {
        return Err(ApiError::malformed("evaluation example count over the cap"));
    }
    // Only a device selected for the round reports on its model: anyone
    // else's numbers would be unweighted noise at best, a lever at worst.
    let round = state
        .store
        .get_round(report.round_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownRound))?;
    let selected = state
        .store
        .participant_state(round.id, &request.device.id)
        .await?
        .is_some();
    if !selected {
        return Err(ApiError::new(ErrorCode::NotSelected));
    }
    // The model the round started from, or (once it completed) the one it
    // produced: the last model of a federation has no round of its own.
    let produced = round.state == RoundState::Completed
        && report.model_version == round.base_model_version + 1;
    if report.model_version != round.base_model_version && !produced {
        return Err(ApiError::malformed(
            "the evaluated model is neither the round's base model nor the one it produced",
        ));
    }
    let report_version = report.model_version;
    state
        .store
        .record_evaluation(&EvaluationRecord {
            model_version: report.model_version,
            round_id: report.round_id,
            device_id: request.device.id.clone(),
            examples: report.examples,
            metrics: report.metrics.into_iter().collect(),
            created_at: state.now_i64(),
        })
        .await?;
    Ok(EvaluationReceipt {
        model_version: report_version,
    })
}

/// `POST /v1/admin/rounds/start` and `/pause` answer, and `GET /v1/admin/rounds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FederationView {
    /// Whether new rounds are being opened.
    pub running: bool,
    /// The enclave's generation.
    pub enclave_generation: u64,
    /// The enclave's measurement (hex).
    pub enclave_measurement: Option<String>,
    /// Which replica coordinates (PostgreSQL deployments; `None` with
    /// SQLite, where the one server always does).
    #[serde(default)]
    pub coordinator: Option<CoordinatorView>,
    /// Recent rounds, newest first.
    pub rounds: Vec<RoundView>,
    /// Every model with its test metrics, oldest first.
    pub models: Vec<ModelView>,
    /// Central DP's budget, when `aggregation.privacy` is set.
    #[serde(default)]
    pub privacy: Option<PrivacyView>,
}

/// ε spent by the private rounds so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PrivacyView {
    /// ε of the (ε, δ) guarantee over every private round recorded.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The configured budget, if any.
    pub budget: Option<f64>,
    /// Private rounds counted.
    pub rounds: u64,
}

/// The replica holding the coordinator lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorView {
    /// Where the other replicas reach it (`host:port`).
    pub address: String,
    /// How many times the lease has changed hands, this tenure included.
    pub epoch: u64,
    /// When it took the lease (Unix seconds).
    pub since: i64,
    /// When the lease lapses unless renewed (Unix seconds).
    pub expires_at: i64,
}

/// A round in the admin view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoundView {
    /// Id.
    pub id: u64,
    /// State.
    pub state: String,
    /// Version of the model it started from.
    pub base_model_version: u64,
    /// Devices selected.
    pub selected: u32,
    /// Devices that submitted.
    pub submitted: usize,
    /// Opened, Unix seconds.
    pub opened_at: i64,
    /// Closed, Unix seconds.
    pub closed_at: Option<i64>,
    /// Deadline, Unix seconds.
    pub deadline: i64,
    /// The outcome (statistics, or why it failed).
    pub outcome: Option<serde_json::Value>,
}

/// A model in the admin view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelView {
    /// Version.
    pub version: u64,
    /// The round that produced it.
    pub round_id: u64,
    /// Created, Unix seconds.
    pub created_at: i64,
    /// Test accuracy, when evaluated.
    pub accuracy: Option<f64>,
    /// Test loss, when evaluated.
    pub loss: Option<f64>,
    /// What devices reported evaluating it on their own data, when any did.
    #[serde(default)]
    pub federated: Option<FederatedEvaluation>,
}

/// Devices' evaluations of one model version, aggregated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FederatedEvaluation {
    /// Devices that reported (the most of any one metric).
    pub devices: u64,
    /// Their held-out examples (the most of any one metric).
    pub examples: u64,
    /// Each metric's example-weighted mean over the reporting devices.
    pub metrics: std::collections::BTreeMap<String, f64>,
}

impl ModelView {
    /// The accuracy to show: the server's test accuracy, else the devices'
    /// federated `accuracy` metric.
    pub fn shown_accuracy(&self) -> Option<f64> {
        self.accuracy.or_else(|| {
            self.federated
                .as_ref()
                .and_then(|f| f.metrics.get("accuracy").copied())
        })
    }
}

/// The federation's state for the admin API and the web pages.
pub async fn view(state: &SharedState, limit: u32) -> ApiResult<FederationView> {
    let coordination = federation(state)?;
    let mut rounds = Vec::new();
    for round in state.store.list_rounds(limit).await? {
        let submitted =
            usize::try_from(state.store.submission_count(round.id).await?).unwrap_or(usize::MAX);
        rounds.push(RoundView {
            id: round.id,
            state: round.state.as_str().to_owned(),
            base_model_version: round.base_model_version,
            selected: round.target_updates,
            submitted,
            opened_at: round.opened_at,
            closed_at: round.closed_at,
            deadline: round.deadline,
            outcome: round
                .outcome_json
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok()),
        });
    }
    let mut federated: std::collections::BTreeMap<u64, FederatedEvaluation> =
        std::collections::BTreeMap::new();
    for summary in state.store.evaluation_history().await? {
        let entry = federated
            .entry(summary.model_version)
            .or_insert_with(|| FederatedEvaluation {
                devices: 0,
                examples: 0,
                metrics: std::collections::BTreeMap::new(),
            });
        entry.devices = entry.devices.max(summary.devices);
        entry.examples = entry.examples.max(summary.examples);
        entry.metrics.insert(summary.metric, summary.mean);
    }
    let models = state
        .store
        .model_history()
        .await?
        .into_iter()
        .map(|m| ModelView {
            version: m.version,
            round_id: m.round_id,
            created_at: m.created_at,
            accuracy: m.accuracy,
            loss: m.loss,
            federated: federated.remove(&m.version),
        })
        .collect();
    let enclave = coordination.enclave_summary().await;
    let privacy = match &state.config.aggregation.privacy {
        Some(settings) => {
            let all = state.store.list_rounds(u32::MAX).await?;
            crate::federation::privacy::spent(settings, &all)
                .ok()
                .map(|spent| PrivacyView {
                    epsilon: spent.epsilon,
                    delta: spent.delta,
                    budget: spent.budget,
                    rounds: spent.rounds,
                })
        }
        None => None,
    };
    Ok(FederationView {
        running: coordination.running().await?,
        enclave_generation: enclave.generation,
        enclave_measurement: enclave.measurement,
        coordinator: coordination.lease().await?.map(|lease| CoordinatorView {
            address: lease.address,
            epoch: lease.epoch,
            since: lease.acquired_at,
            expires_at: lease.expires_at,
        }),
        rounds,
        models,
        privacy,
    })
}

/// `GET /v1/admin/rounds`.
#[utoipa::path(
    get, path = routes::ADMIN_ROUNDS, tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "Recent rounds, every model and the enclave.", body = FederationView)),
)]
pub async fn list_rounds(State(state): State<SharedState>) -> ApiResult<Json<FederationView>> {
    Ok(Json(view(&state, 50).await?))
}

/// `POST /v1/admin/rounds/start`.
#[utoipa::path(
    post, path = routes::ADMIN_ROUNDS_START, tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "Training started or resumed.", body = FederationView)),
)]
pub async fn start_rounds(State(state): State<SharedState>) -> ApiResult<Json<FederationView>> {
    federation(&state)?.start_training().await?;
    Ok(Json(view(&state, 10).await?))
}

/// `POST /v1/admin/rounds/pause`.
#[utoipa::path(
    post, path = routes::ADMIN_ROUNDS_PAUSE, tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "No new rounds open; the open one finishes.", body = FederationView)),
)]
pub async fn pause_rounds(State(state): State<SharedState>) -> ApiResult<Json<FederationView>> {
    federation(&state)?.pause().await?;
    Ok(Json(view(&state, 10).await?))
}
