//! Submission: seal the pending update to the attested enclave, send it, and
//! record the receipt (or, when the receipt was lost, the server's word that
//! the update arrived).

use std::time::Instant;

use qflare_protocol::ProtocolError;
use qflare_protocol::attestation::VerifiedEnclave;
use qflare_protocol::crypto::sha256;
use qflare_protocol::envelope::{self, UpdateMetadata};
use qflare_protocol::federation::{EvaluationReport, SubmitReceipt};

use super::events::{DeviceEvent, RoundRecord, RoundTimings, StopReason};
use super::link::Link;
use super::runner::{MAX_REKEYS, Next, PendingUpdate, Runner};
use crate::error::EdgeError;
use crate::trainer::EvalResult;

/// The receipt status recorded when the server lists this device as having
/// submitted to a round whose receipt never arrived (the connection broke
/// after the server took the update).
pub const STATUS_SUBMITTED: &str = "submitted";
/// The code recorded with [`STATUS_SUBMITTED`].
pub const CODE_RECEIPT_LOST: &str = "receipt_lost";
/// The code of the [`DeviceEvent::Skipped`] event when a round's update was
/// dropped rather than sealed to yet another enclave key.
pub const CODE_RESEAL_LIMIT: &str = "reseal_limit";

impl<L: Link> Runner<'_, L> {
    /// Seals the pending update to the attested enclave and submits it.
    pub(super) async fn submit(
        &mut self,
        round_id: u64,
        enclave: &VerifiedEnclave,
    ) -> Result<Next, EdgeError> {
        let key = sha256(enclave.kem_public_key.as_bytes());
        let pending = self
            .pending
            .as_mut()
            .ok_or_else(|| EdgeError::Config("internal: submit without a trained update".into()))?;
        if !pending.may_seal_to(&key) {
            return Ok(self.drop_rekeyed(round_id));
        }
        if pending.sealed_to.is_some_and(|before| before != key) {
            pending.rekeys += 1;
        }
        pending.sealed_to = Some(key);
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
        let sealed_bytes = (sealed.kem_ciphertext.len() + sealed.sealed_payload.len()) as u64;
        if let Some(mut pending) = self.pending.take() {
            self.record(&pending, receipt, Some(sealed_bytes));
            let evaluation = pending.evaluation.take();
            let model_version = pending.model_version;
            pending.delivered = true;
            pending.awaiting_reseal = false;
            self.pending = Some(pending);
            if let Some(evaluation) = evaluation {
                self.report_evaluation(round_id, model_version, evaluation)
                    .await;
            }
        }
        let submitted = self.summary.rounds.len() as u64;
        if self.config.max_rounds.is_some_and(|max| submitted >= max) {
            return Ok(Next::Stop(StopReason::MaxRounds));
        }
        Ok(Next::Now)
    }

    /// The round's update was sealed to as many enclave keys as it may be:
    /// the server asks for it under yet another key, which a host that keeps
    /// restarting the enclave would, to open it in rounds of its choosing.
    /// It is dropped, and the device waits for the next round.
    pub(super) fn drop_rekeyed(&mut self, round_id: u64) -> Next {
        tracing::warn!(
            round_id,
            limit = MAX_REKEYS,
            "the enclave's key changed again while this round was open; dropping the update \
             rather than sealing it to another enclave boot, and waiting for the next round"
        );
        self.pending = None;
        self.clock = None;
        self.working_round = None;
        self.done_rounds.insert(round_id);
        self.summary.skipped += 1;
        self.events.emit(DeviceEvent::Skipped {
            round_id: Some(round_id),
            code: CODE_RESEAL_LIMIT.to_owned(),
        });
        Next::Now
    }

    /// Sends the trainer's evaluation of the round's model. Best effort: a
    /// refusal is logged, and the round's update stands either way.
    pub(super) async fn report_evaluation(
        &mut self,
        round_id: u64,
        model_version: u64,
        result: EvalResult,
    ) {
        let report = EvaluationReport {
            round_id,
            model_version,
            examples: result.examples,
            metrics: result.metrics,
        };
        if let Err(err) = report.validate() {
            tracing::warn!(round_id, %err, "the trainer's evaluation is not reportable");
            return;
        }
        let sent = match self.ensure_session().await {
            Ok(()) => self.link.evaluate(&report).await.map(|_| ()),
            Err(err) => Err(err),
        };
        match sent {
            Ok(()) => self.events.emit(DeviceEvent::Evaluated {
                round_id,
                model_version,
                examples: report.examples,
                metrics: report.metrics,
            }),
            Err(err) => tracing::warn!(round_id, %err, "reporting the evaluation failed"),
        }
    }

    pub(super) fn record(
        &mut self,
        pending: &PendingUpdate,
        receipt: SubmitReceipt,
        sealed_bytes: Option<u64>,
    ) {
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
            sealed_bytes,
            timings,
        });
        let record = RoundRecord {
            round_id,
            model_version: pending.model_version,
            examples: pending.examples,
            mean_loss: pending.mean_loss,
            status: receipt.status,
            code: receipt.code,
            timings,
        };
        // A resumed round's second receipt replaces the first: one round, one row.
        match self
            .summary
            .rounds
            .iter_mut()
            .find(|r| r.round_id == round_id)
        {
            Some(earlier) => *earlier = record,
            None => self.summary.rounds.push(record),
        }
    }

    /// The server lists us as submitted to a round whose receipt we never
    /// got (the connection broke after it took the update): record it.
    /// Not after `enclave_restarting`, though: then what the server stored
    /// was sealed to the dead enclave's key, so the update is kept until the
    /// server asks for it again (or the round moves on).
    pub(super) fn receipt_lost(&mut self, round_id: Option<u64>) {
        if self.pending.as_ref().is_some_and(|p| p.delivered) {
            return;
        }
        let Some(mut pending) = self
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
        self.record(&pending, receipt, None);
        pending.delivered = true;
        self.pending = Some(pending);
    }
}
