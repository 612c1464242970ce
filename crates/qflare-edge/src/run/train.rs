//! A `train` answer's work: verify the enclave's report for our nonce, fetch
//! (or reuse) the verified global model, run the device's
//! [`LocalTrainer`](crate::LocalTrainer) on a blocking thread, check the
//! delta it returns and encode it as the update, or keep an update already
//! trained when only the enclave restarted; then hand it to [`super::submit`].

use std::sync::Arc;
use std::time::Instant;

use qflare_protocol::attestation::VerifiedEnclave;
use qflare_protocol::crypto::sha256;
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::update_encoding::{self, UpdateEncoding};
use zeroize::Zeroizing;

use super::events::DeviceEvent;
use super::link::Link;
use super::runner::Next;
use super::runner::{CachedModel, PendingUpdate, Runner};
use super::verify::{decode_model, verify_model_certificate, verify_round_report};
use crate::client::unix_now;
use crate::error::EdgeError;
use crate::identity::Identity;
use crate::trainer::{FitTask, LOSS_METRIC, TrainError};
use qflare_protocol::attestation::ATTESTATION_NONCE_LEN;
use qflare_protocol::federation::{RoundInfo, TrainingPlan};
use std::time::Duration;

/// The shuffle seed of one round: a function of the device, the round and
/// the configured seed, so devices differ and reruns repeat.
pub(super) fn round_seed(identity: &Identity, round_id: u64, seed: u64) -> u64 {
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

/// What a round asks this device to do, as the server's answer said it.
pub(super) struct RoundWork {
    pub(super) round_id: u64,
    pub(super) model_version: u64,
    pub(super) architecture: String,
    pub(super) plan: TrainingPlan,
    /// The seed of the trainer's shuffling.
    pub(super) seed: u64,
    /// How the update is encoded for the enclave.
    pub(super) update_encoding: UpdateEncoding,
}
impl<L: Link> Runner<'_, L> {
    pub(super) async fn train_round(
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
        let missing =
            |field: &str| EdgeError::RoundRefused(format!("a train answer without {field}"));
        let model_version = info
            .model_version
            .ok_or_else(|| missing("a model version"))?;
        // The update kept for this very round and model version is sealed
        // again, not retrained: after an enclave restart, a lost receipt, or
        // a resumed round (the server or its enclave restarted and cleared
        // what was sealed to the old boot; see `submit` for the limit).
        let reusable = self
            .pending
            .as_ref()
            .is_some_and(|p| p.model_version == model_version && p.round_id == round_id);
        if !reusable && self.done_rounds.contains(&round_id) {
            // Submitted or skipped already; the server has not caught up.
            return Ok(Next::Poll(poll));
        }
        let architecture = info.architecture.ok_or_else(|| missing("a model name"))?;
        qflare_protocol::model::validate_model_name(&architecture)
            .map_err(|e| EdgeError::RoundRefused(e.to_string()))?;
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
            mode: enclave.mode,
        });

        if reusable {
            let key = sha256(enclave.kem_public_key.as_bytes());
            if self.pending.as_ref().is_some_and(|p| !p.may_seal_to(&key)) {
                return Ok(self.drop_rekeyed(round_id));
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
                .global_model(round_id, model_version, &architecture, &enclave)
                .await?;
            self.last_plan = Some(plan.clone());
            let seed = round_seed(self.identity, round_id, self.config.train_seed);
            let work = RoundWork {
                round_id,
                model_version,
                architecture,
                plan,
                seed,
                update_encoding: info.update_encoding,
            };
            self.pending = Some(self.train(work, global).await?);
        }
        self.submit(round_id, &enclave).await
    }

    /// The verified model of `version`, from the cache or downloaded.
    pub(super) async fn global_model(
        &mut self,
        round_id: u64,
        version: u64,
        architecture: &str,
        enclave: &VerifiedEnclave,
    ) -> Result<Arc<TensorMap>, EdgeError> {
        if let Some(cached) = &self.model
            && cached.version == version
            && cached.architecture == architecture
        {
            let weights = cached.weights.clone();
            self.events.emit(DeviceEvent::ModelVerified {
                version,
                architecture: architecture.to_owned(),
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
        let weights = Arc::new(decode_model(model)?);
        self.timings(round_id).model_decode += started.elapsed();

        self.summary.models_downloaded += 1;
        tracing::info!(
            version,
            architecture,
            bytes = model.len(),
            "global model verified"
        );
        self.events.emit(DeviceEvent::ModelVerified {
            version,
            architecture: architecture.to_owned(),
            bytes: model.len(),
            cached: false,
        });
        self.model = Some(CachedModel {
            version,
            architecture: architecture.to_owned(),
            bytes: model.len(),
            weights: weights.clone(),
        });
        Ok(weights)
    }

    /// Runs the [`LocalTrainer`](crate::LocalTrainer) on a blocking thread
    /// (burn's kernels run on the process-wide compute pool), checks the
    /// update's layout, applies the tamper hook and encodes the update.
    pub(super) async fn train(
        &mut self,
        work: RoundWork,
        global: Arc<TensorMap>,
    ) -> Result<PendingUpdate, EdgeError> {
        let trainer = self.config.trainer.clone();
        let events = self.events.clone();
        let tamper = self.config.tamper.clone();
        let RoundWork {
            round_id,
            model_version,
            architecture,
            plan,
            seed,
            update_encoding,
        } = work;
        let job = move || -> Result<_, TrainError> {
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
            let task = FitTask {
                round_id,
                model_version,
                architecture: &architecture,
                global: &global,
                plan: &plan,
                seed,
            };
            let evaluation = match trainer.evaluate(&task) {
                Ok(evaluation) => evaluation,
                Err(err) => {
                    tracing::warn!(round_id, %err, "evaluating the global model failed");
                    None
                }
            };
            let started = Instant::now();
            let fitted = trainer.fit(&task, &progress)?;
            let training = started.elapsed();
            let started = Instant::now();
            let mut update = fitted.update;
            // What gets sealed must be a delta of the model the round trains.
            if let Some(mismatch) = crate::trainer::layout_mismatch(&update, &global) {
                return Err(TrainError::Failed(format!(
                    "the trainer's update does not fit the global model: {mismatch}"
                )));
            }
            if let Some(tamper) = tamper {
                update = tamper(round_id, update);
            }
            let bytes = Zeroizing::new(
                update_encoding::encode(&update, update_encoding, &mut rand::rng())
                    .map_err(|err| TrainError::Failed(format!("encoding the update: {err}")))?,
            );
            let mean_loss = fitted.metrics.get(LOSS_METRIC).copied().unwrap_or(f64::NAN);
            Ok((
                fitted.examples,
                mean_loss,
                bytes,
                training,
                started.elapsed(),
                evaluation,
            ))
        };
        let (examples, mean_loss, bytes, training, encode, evaluation) =
            match tokio::task::spawn_blocking(job).await {
                Ok(result) => result?,
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(err) => return Err(TrainError::Failed(err.to_string()).into()),
            };
        let timings = self.timings(round_id);
        timings.training += training;
        timings.update_encode += encode;
        Ok(PendingUpdate {
            round_id,
            model_version,
            examples,
            mean_loss,
            evaluation,
            bytes,
            awaiting_reseal: false,
            delivered: false,
            sealed_to: None,
            rekeys: 0,
        })
    }
}

impl<L: Link> Runner<'_, L> {
    /// When training has finished, evaluates the final model — the one the
    /// last round this device took part in produced — with the trainer's
    /// `evaluate`, and reports it under that round. Best effort and once per
    /// run: the model's certificate is checked against a fresh report as for
    /// training, and any failure is logged, never fatal.
    pub(super) async fn evaluate_final_model(
        &mut self,
        info: &RoundInfo,
        nonce: &[u8; ATTESTATION_NONCE_LEN],
    ) {
        if std::mem::replace(&mut self.final_evaluated, true) {
            return;
        }
        let Some(last) = self.summary.rounds.last() else {
            return;
        };
        let (round_id, version) = (last.round_id, last.model_version + 1);
        match self.final_evaluation(info, nonce, round_id, version).await {
            Ok(Some(result)) => self.report_evaluation(round_id, version, result).await,
            Ok(None) => {}
            Err(err) => {
                tracing::info!(round_id, version, %err, "the final model was not evaluated");
            }
        }
    }

    async fn final_evaluation(
        &mut self,
        info: &RoundInfo,
        nonce: &[u8; ATTESTATION_NONCE_LEN],
        round_id: u64,
        version: u64,
    ) -> Result<Option<crate::trainer::EvalResult>, EdgeError> {
        let (Some(report), Some(architecture), Some(plan)) = (
            &info.report,
            info.architecture.clone(),
            self.last_plan.clone(),
        ) else {
            return Ok(None);
        };
        let enclave = verify_round_report(report, &self.config.policy, nonce, unix_now())?;
        // Only the model the device's last round produced: if later rounds
        // ran without this device, the certificate's version differs and the
        // download is refused here.
        let global = self
            .global_model(round_id, version, &architecture, &enclave)
            .await?;
        let trainer = self.config.trainer.clone();
        let seed = round_seed(self.identity, round_id, self.config.train_seed);
        let job = move || {
            trainer.evaluate(&FitTask {
                round_id,
                model_version: version,
                architecture: &architecture,
                global: &global,
                plan: &plan,
                seed,
            })
        };
        match tokio::task::spawn_blocking(job).await {
            Ok(result) => Ok(result?),
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(err) => Err(TrainError::Failed(err.to_string()).into()),
        }
    }
}
