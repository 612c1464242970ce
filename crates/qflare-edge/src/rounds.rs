//! [`RoundClient`]: the device's steps one call at a time, for hosts that
//! drive training themselves instead of handing a trainer to
//! [`run_device`](crate::run_device) (the Python SDK's `Client`).
//!
//! The steps are the loop's, with every check of the loop: a round is only
//! returned after the enclave's fresh report verified against the policy and
//! the device's nonce, and the global model against the attested enclave's
//! certificate; an update is only sealed after its tensors matched the global
//! model's names and shapes and held finite values. What the loop adds —
//! back-off, re-sealing after an enclave restart, receipts lost in transit,
//! progress events — is the caller's business here: errors come back as they
//! are ([`EdgeError::is_retryable`] says which may be retried).

use std::time::{Duration, Instant};

use qflare_protocol::api::routes;
use qflare_protocol::attestation::{ATTESTATION_NONCE_LEN, AttestationPolicy, VerifiedEnclave};
use qflare_protocol::envelope::{self, UpdateMetadata};
use qflare_protocol::federation::{
    EvaluationReceipt, EvaluationReport, ModelQuery, RoundInfo, RoundPosition, RoundQuery,
    RoundStatus, SubmitReceipt, TrainingPlan,
};
use qflare_protocol::tensor::{Tensor, TensorMap};
use qflare_protocol::update_encoding::{self, UpdateEncoding};
use qflare_protocol::wire;

use crate::client::{Session, open_session, transport_for, unix_now};
use crate::error::EdgeError;
use crate::identity::Identity;
use crate::run::{
    LONG_POLL_SECS, MODEL_DOWNLOAD_LIMIT, RECEIPT_LIMIT, ROUND_INFO_LIMIT, UNHELD_POLL,
    verify_model_download, verify_round_report,
};
use crate::trainer::layout_mismatch;
use crate::transport::Transport;

/// Sessions are renewed when they have less than this left.
const SESSION_MARGIN_SECS: u64 = 60;

/// A round that selected this device, with its verified global model.
pub struct TrainingRound {
    /// The round.
    pub round_id: u64,
    /// The global model's version.
    pub model_version: u64,
    /// The model's name (its certificate's `architecture`).
    pub model: String,
    /// The round's learning rate, batch size and local epochs.
    pub plan: TrainingPlan,
    /// How the update must be encoded for the enclave (the server's choice).
    pub update_encoding: UpdateEncoding,
    /// When the round closes (Unix seconds), if the server said.
    pub deadline: Option<u64>,
    /// The verified global weights.
    pub global: TensorMap,
    enclave: VerifiedEnclave,
}

impl std::fmt::Debug for TrainingRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingRound")
            .field("round_id", &self.round_id)
            .field("model_version", &self.model_version)
            .field("model", &self.model)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

/// Why [`RoundClient::wait_for_round`] returned without a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRound {
    /// The server has finished training.
    Finished,
    /// The timeout passed first.
    TimedOut,
}

/// The device's steps, one call at a time (see the module documentation).
pub struct RoundClient {
    identity: Identity,
    policy: AttestationPolicy,
    transport: Transport,
    session: Option<Session>,
    /// Polls are never more than this far apart, whatever the server asks.
    max_poll: Duration,
}

impl std::fmt::Debug for RoundClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundClient")
            .field("device_id", &self.identity.device_id)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl RoundClient {
    /// A client for `identity`, trusting enclaves that satisfy `policy`.
    pub fn new(identity: Identity, policy: AttestationPolicy) -> Result<Self, EdgeError> {
        if let Some(why) = policy.why_nothing_passes() {
            return Err(EdgeError::Config(why));
        }
        let transport = transport_for(&identity)?;
        Ok(Self {
            identity,
            policy,
            transport,
            session: None,
            max_poll: Duration::from_secs(60),
        })
    }

    /// The device's id.
    pub fn device_id(&self) -> String {
        self.identity.device_id.to_string()
    }

    /// The open session, opening (or renewing) one when needed.
    pub async fn session(&mut self) -> Result<&mut Session, EdgeError> {
        let renew = self
            .session
            .as_ref()
            .is_none_or(|s| s.expires_within(SESSION_MARGIN_SECS));
        if renew {
            self.session = Some(open_session(&self.identity, &self.transport).await?);
        }
        self.session
            .as_mut()
            .ok_or_else(|| EdgeError::Config("internal: no session after opening one".into()))
    }

    /// Polls until a round selects this device and returns it with its
    /// verified global model, or says why not ([`NoRound`]).
    pub async fn wait_for_round(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Result<TrainingRound, NoRound>, EdgeError> {
        let started = Instant::now();
        let mut seen: Option<RoundPosition> = None;
        loop {
            let nonce: [u8; ATTESTATION_NONCE_LEN] = rand::random();
            // Held by the server until the answer differs from the last
            // one, but never past the caller's timeout.
            let left = timeout.map(|t| t.saturating_sub(started.elapsed()));
            let wait_while = seen.map(|mut position| {
                position.max_wait_secs =
                    left.map_or(LONG_POLL_SECS, |left| left.as_secs().min(LONG_POLL_SECS));
                position
            });
            let asked = Instant::now();
            let info: RoundInfo = self
                .session()
                .await?
                .call(
                    routes::CURRENT_ROUND,
                    &RoundQuery {
                        nonce: Some(nonce),
                        wait_while,
                    },
                    ROUND_INFO_LIMIT,
                )
                .await?;
            match info.status {
                RoundStatus::Train => return self.training_round(info, &nonce).await.map(Ok),
                RoundStatus::Finished => return Ok(Err(NoRound::Finished)),
                _ => {}
            }
            let unheld =
                wait_while.is_some_and(|w| w.unchanged_in(&info)) && asked.elapsed() < UNHELD_POLL;
            seen = Some(RoundPosition::of(&info, LONG_POLL_SECS));
            let poll = if unheld {
                Duration::from_secs(info.poll_after_secs.max(1)).min(self.max_poll)
            } else {
                Duration::ZERO
            };
            if let Some(timeout) = timeout
                && started.elapsed() + poll >= timeout
            {
                return Ok(Err(NoRound::TimedOut));
            }
            tokio::time::sleep(poll).await;
        }
    }

    async fn training_round(
        &mut self,
        info: RoundInfo,
        nonce: &[u8; ATTESTATION_NONCE_LEN],
    ) -> Result<TrainingRound, EdgeError> {
        let missing =
            |field: &str| EdgeError::RoundRefused(format!("a train answer without {field}"));
        let round_id = info.round_id.ok_or_else(|| missing("a round id"))?;
        let model_version = info
            .model_version
            .ok_or_else(|| missing("a model version"))?;
        let model = info.architecture.ok_or_else(|| missing("a model name"))?;
        qflare_protocol::model::validate_model_name(&model)
            .map_err(|e| EdgeError::RoundRefused(e.to_string()))?;
        let plan = info.training.ok_or_else(|| missing("a training plan"))?;
        let report = info
            .report
            .ok_or_else(|| missing("an attestation report"))?;
        let enclave = verify_round_report(&report, &self.policy, nonce, unix_now())?;
        let download = self
            .session()
            .await?
            .call_raw(
                routes::CURRENT_MODEL,
                wire::encode(&ModelQuery::default())?,
                MODEL_DOWNLOAD_LIMIT,
            )
            .await?;
        let (_, global) = verify_model_download(&download, &enclave, model_version, &model)?;
        Ok(TrainingRound {
            round_id,
            model_version,
            model,
            plan,
            update_encoding: info.update_encoding,
            deadline: info.deadline,
            global,
            enclave,
        })
    }

    /// Seals `trained − round.global` to the round's attested enclave and
    /// submits it, trained on `examples` local examples. `trained` must have
    /// the global model's tensor names and shapes and finite values.
    pub async fn submit(
        &mut self,
        round: &TrainingRound,
        trained: &TensorMap,
        examples: u64,
    ) -> Result<SubmitReceipt, EdgeError> {
        let update = checked_delta(trained, &round.global)?;
        let metadata = UpdateMetadata {
            round_id: round.round_id,
            device_id: self.identity.device_id,
            model_version: round.model_version,
            example_count: examples,
        };
        let bytes = zeroize::Zeroizing::new(update_encoding::encode(
            &update,
            round.update_encoding,
            &mut rand::rng(),
        )?);
        let sealed = envelope::seal(
            &metadata,
            &bytes,
            &self.identity.keys.signing,
            &round.enclave.kem_public_key,
            &mut rand::rng(),
        )?;
        self.session()
            .await?
            .submit_update(&sealed, RECEIPT_LIMIT)
            .await
    }

    /// Reports this device's evaluation of the round's global model on its
    /// own held-out data (federated evaluation).
    pub async fn evaluate(
        &mut self,
        round: &TrainingRound,
        examples: u64,
        metrics: std::collections::BTreeMap<String, f64>,
    ) -> Result<EvaluationReceipt, EdgeError> {
        let report = EvaluationReport {
            round_id: round.round_id,
            model_version: round.model_version,
            examples,
            metrics,
        };
        report.validate()?;
        self.session()
            .await?
            .call(routes::EVALUATIONS, &report, RECEIPT_LIMIT)
            .await
    }
}

/// Why an update cannot be made from trained weights: they do not have the
/// global model's layout, or they hold a NaN or an infinity. Each names the
/// tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateRefusal {
    /// A missing, extra or differently shaped tensor.
    #[error("the trained weights do not fit the global model: {0}")]
    ShapeMismatch(String),
    /// A NaN or an infinity.
    #[error("tensor {0} holds a NaN or an infinity")]
    NonFinite(String),
}

/// `trained − global`, tensor by tensor, after checking `trained` has the
/// global model's names and shapes and finite values.
pub fn checked_delta(trained: &TensorMap, global: &TensorMap) -> Result<TensorMap, EdgeError> {
    if let Some(mismatch) = layout_mismatch(trained, global) {
        return Err(EdgeError::UpdateRefused(UpdateRefusal::ShapeMismatch(
            mismatch,
        )));
    }
    if let Some(name) = trained.first_non_finite() {
        return Err(EdgeError::UpdateRefused(UpdateRefusal::NonFinite(
            name.to_owned(),
        )));
    }
    let mut delta = TensorMap::new();
    for ((name, new), (_, old)) in trained.iter().zip(global.iter()) {
        let values = new
            .data()
            .iter()
            .zip(old.data())
            .map(|(n, o)| n - o)
            .collect();
        delta.insert(name, Tensor::new(new.shape().to_vec(), values)?)?;
    }
    Ok(delta)
}
