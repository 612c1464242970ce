//! A round's life: open it (select devices, begin the round in the
//! enclave), forward submissions, close it (aggregate, store and evaluate the
//! new model, ledger every verdict), resume it in a new enclave boot, or fail
//! it.
//!
//! Somewhat over 600 lines on purpose: these steps are one state machine over
//! the same round record and enclave calls, and each transition reads best
//! beside the others (the resume path mirrors opening, the close path the
//! failure path). The verdict filter at the end is what they all relay.

use std::collections::HashSet;
use std::sync::Arc;

use qflare_enclave::frame::{Frame, Kind};
use qflare_enclave::host::{EnclaveError, EnclaveInfo};
use qflare_enclave::messages::{
    BeginRoundRequest, LedgerVerdict, OutcomeAnswer, RoundDevice, SubmitRequest,
};
use qflare_protocol::crypto::sha256;
use qflare_protocol::identity::DeviceId;
use qflare_store::{RoundRecord, RoundState, VerdictRecord};
use serde_json::json;

use super::privacy::{self, RoundPrivacy};
use super::{CurrentModel, Federation, FederationError, OpenRound, unix};
use crate::devices::registered_keys;
use crate::ledger::AuditKind;

impl Federation {
    pub(super) async fn open_round(
        &self,
        round_id: u64,
        model: &CurrentModel,
        enclave: &EnclaveInfo,
        now: u64,
    ) -> Result<(), FederationError> {
        let config = &self.ctx.config.federation;
        let horizon = i64::try_from(now.saturating_sub(config.active_within_secs)).unwrap_or(0);
        let eligible: Vec<_> = self
            .ctx
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
        .min(eligible.len())
        .min(qflare_enclave::frame::MAX_ROUND_DEVICES);
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
        let (selected, round_privacy) = match &self.ctx.config.aggregation.privacy {
            None => {
                let mut rng = rand::rng();
                let selected: Vec<_> =
                    rand::seq::IndexedRandom::sample(eligible.as_slice(), &mut rng, wanted)
                        .cloned()
                        .collect();
                (selected, None)
            }
            Some(settings) => {
                let q = (wanted as f64 / eligible.len() as f64).min(1.0);
                if !self.privacy_allows(settings, q).await? {
                    return Ok(());
                }
                let selected = privacy::poisson_sample(&eligible, q, &mut rand::rng());
                // Too few (or, rarely, more than a round holds): nothing is
                // released, so skipping the draw spends no budget.
                if selected.len() < config.min_updates.max(1)
                    || selected.len() > qflare_enclave::frame::MAX_ROUND_DEVICES
                {
                    tracing::debug!(
                        sampled = selected.len(),
                        "private round not opened: the Poisson draw is out of range"
                    );
                    return Ok(());
                }
                let round_privacy = RoundPrivacy {
                    sampling_rate: q,
                    noise_multiplier: settings.noise_multiplier,
                    expected_participants: q * eligible.len() as f64,
                };
                (selected, Some(round_privacy))
            }
        };
        let mut devices = Vec::with_capacity(selected.len());
        for device in &selected {
            devices.push(round_device(device)?);
        }
        let training = &config.training;
        // Known before the round is stored, so no submission to it can find
        // the controller unaware of it (see `accepting`).
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
        self.begin_in_enclave(round_id, model, devices, round_privacy)
            .await?;
        let deadline = now.saturating_add(config.round_timeout_secs);
        let record = RoundRecord {
            id: round_id,
            state: RoundState::Open,
            base_model_version: model.version,
            config_json: json!({
                "architecture": model.certificate.architecture,
                "training": training,
                "privacy": round_privacy,
            })
            .to_string(),
            min_updates: u32::try_from(config.min_updates).unwrap_or(u32::MAX),
            target_updates: u32::try_from(selected.len()).unwrap_or(u32::MAX),
            opened_at: self.now_i64(),
            deadline: i64::try_from(deadline).unwrap_or(i64::MAX),
            closed_at: None,
            attempt: 1,
            outcome_json: None,
        };
        let ids: Vec<String> = selected.iter().map(|d| d.id.clone()).collect();
        self.ctx.store.create_round(&record, &ids).await?;
        tracing::info!(
            round_id,
            model_version = model.version,
            selected = ids.len(),
            "round opened"
        );
        self.ctx
            .auditor
            .audit(
                AuditKind::RoundOpened,
                "server",
                &round_id.to_string(),
                json!({ "model_version": model.version, "selected": ids, "deadline": deadline }),
            )
            .await;
        Ok(())
    }

    /// Begins round `round_id` on `model` with `devices` in the running
    /// enclave boot.
    async fn begin_in_enclave(
        &self,
        round_id: u64,
        model: &CurrentModel,
        devices: Vec<RoundDevice>,
        round_privacy: Option<RoundPrivacy>,
    ) -> Result<(), FederationError> {
        let config = &self.ctx.config.federation;
        let mut aggregation = self.ctx.config.aggregation.clone();
        aggregation.min_accepted = aggregation.min_accepted.max(config.min_updates);
        let training = &config.training;
        let request = BeginRoundRequest {
            round_id,
            model_version: model.version,
            architecture: model.certificate.architecture.clone(),
            config: aggregation,
            update_encoding: config.update_encoding,
            devices,
            reference_training: Some(qflare_ml::TrainConfig {
                learning_rate: training.learning_rate,
                batch_size: training.batch_size,
                epochs: training.epochs,
                seed: round_id,
            }),
            expected_participants: round_privacy.map(|p| p.expected_participants),
        };
        let mut blobs = vec![model.bytes.to_vec()];
        if model.version > 0
            && let Some(previous) = self.ctx.store.get_model(model.version - 1).await?
        {
            blobs.push(previous.bytes);
        }
        self.enclave
            .call_expecting(Frame::new(Kind::BeginRound, &request, blobs), Kind::Ack)
            .await?;
        Ok(())
    }

    /// Resumes an `Open` or `Aggregating` round the running enclave boot
    /// has not begun (the enclave or the server restarted): the same id,
    /// model version and devices, begun again; every submission cleared
    /// (sealed to keys that are gone) so the devices re-seal what they kept;
    /// the deadline a full round from now. A round whose model was stored
    /// before the crash is completed instead, and one that cannot be resumed
    /// (the model moved on, the enclave refuses) fails.
    pub(super) async fn resume_round(
        &self,
        round: &RoundRecord,
        enclave: &EnclaveInfo,
        why: &str,
        now: u64,
    ) -> Result<(), FederationError> {
        let next = round.base_model_version.saturating_add(1);
        if round.state == RoundState::Aggregating
            && let Some(made) = self.ctx.store.get_model(next).await?
            && made.round_id == round.id
        {
            // The server died between storing the new model and closing the
            // round; the verdicts were stored before the model.
            let verdicts = self.ctx.store.participant_states(round.id).await?;
            let accepted = verdicts
                .iter()
                .filter(|p| p.verdict.as_deref() == Some("accepted"))
                .count();
            let rejected = verdicts
                .iter()
                .filter(|p| p.verdict.as_deref() == Some("rejected"))
                .count();
            let summary = json!({
                "model_version": next,
                "accepted": accepted,
                "rejected": rejected,
                "recovered": true,
            });
            if self
                .ctx
                .store
                .transition_round(
                    round.id,
                    RoundState::Aggregating,
                    RoundState::Completed,
                    self.now_i64(),
                    Some(&summary.to_string()),
                )
                .await?
            {
                tracing::info!(round_id = round.id, "round completed before the restart");
            }
            self.inner.lock().await.open = None;
            self.discard_closed_envelopes().await;
            return Ok(());
        }
        let model = self.current_model(enclave).await?;
        if model.version != round.base_model_version {
            let reason = format!(
                "cannot resume: the round trains version {}, the latest model is {}",
                round.base_model_version, model.version
            );
            return self.fail_round(round, round.state, &reason).await;
        }
        let mut devices = Vec::new();
        let mut ids = Vec::new();
        for participant in self.ctx.store.participant_states(round.id).await? {
            // A device revoked since cannot take part; the rest can.
            match self.ctx.store.get_device(&participant.device_id).await? {
                Some(device) if device.revoked_at.is_none() => {
                    devices.push(round_device(&device)?);
                    ids.push(device.id);
                }
                _ => {}
            }
        }
        let deadline = now
            .saturating_add(self.ctx.config.federation.round_timeout_secs)
            .max(unix(round.deadline));
        // No submission may be between the store and the enclave meanwhile:
        // it would reach the new boot and then be cleared.
        let exclusive = self.gate.write().await;
        let round_privacy = RoundPrivacy::of_record(round);
        match self
            .begin_in_enclave(round.id, &model, devices, round_privacy)
            .await
        {
            Ok(()) => {}
            Err(FederationError::Enclave(EnclaveError::Refused { message, .. })) => {
                drop(exclusive);
                let reason = format!("cannot resume: the enclave refused: {message}");
                return self.fail_round(round, round.state, &reason).await;
            }
            Err(err) => return Err(err),
        }
        let reopened = self
            .ctx
            .store
            .reopen_round(
                round.id,
                i64::try_from(deadline).unwrap_or(i64::MAX),
                self.now_i64(),
            )
            .await?;
        if !reopened {
            // Closed meanwhile (an admin, another replica): nothing to resume.
            return Ok(());
        }
        self.inner.lock().await.open = Some(OpenRound {
            round_id: round.id,
            generation: enclave.generation,
            submitted: HashSet::new(),
            not_rejected: 0,
        });
        drop(exclusive);
        let attempt = round.attempt.saturating_add(1);
        tracing::info!(
            round_id = round.id,
            attempt,
            why,
            devices = ids.len(),
            "round resumed; its devices submit again"
        );
        self.ctx
            .auditor
            .audit(
                AuditKind::RoundResumed,
                "server",
                &round.id.to_string(),
                json!({
                    "reason": why,
                    "attempt": attempt,
                    "model_version": round.base_model_version,
                    "selected": ids,
                    "deadline": deadline,
                    "generation": enclave.generation,
                }),
            )
            .await;
        self.poke();
        Ok(())
    }

    /// Refuses a submission to a round that is open in the store but not
    /// begun in the running enclave boot: it is about to be resumed, which
    /// would clear it. The device hears `enclave_restarting` and re-seals.
    /// Anything else (an unknown or closed round) is the store's to judge.
    pub async fn accepting(&self, round_id: u64) -> Result<(), FederationError> {
        let generation = self.enclave.generation();
        let known = self
            .inner
            .lock()
            .await
            .open
            .as_ref()
            .filter(|o| o.round_id == round_id)
            .map(|o| o.generation);
        match known {
            Some(begun) if begun == generation => Ok(()),
            Some(_) => Err(FederationError::Resuming(round_id)),
            None => match self.ctx.store.get_round(round_id).await? {
                Some(round) if round.state == RoundState::Open => {
                    Err(FederationError::Resuming(round_id))
                }
                _ => Ok(()),
            },
        }
    }

    /// Deletes the envelopes of closed rounds (they serve nothing once the
    /// round is over, and kept they could be replayed).
    pub(super) async fn discard_closed_envelopes(&self) {
        match self.ctx.store.discard_closed_envelopes().await {
            Ok(0) => {}
            Ok(count) => tracing::debug!(count, "deleted the envelopes of closed rounds"),
            Err(err) => tracing::warn!(%err, "could not delete the envelopes of closed rounds"),
        }
    }

    pub(super) async fn fail_round(
        &self,
        round: &RoundRecord,
        from: RoundState,
        reason: &str,
    ) -> Result<(), FederationError> {
        let outcome = json!({ "error": reason }).to_string();
        if self
            .ctx
            .store
            .transition_round(
                round.id,
                from,
                RoundState::Failed,
                self.now_i64(),
                Some(&outcome),
            )
            .await?
        {
            tracing::warn!(round_id = round.id, reason, "round failed");
            self.ctx
                .auditor
                .audit(
                    AuditKind::RoundFailed,
                    "server",
                    &round.id.to_string(),
                    json!({ "reason": reason }),
                )
                .await;
        }
        {
            let mut inner = self.inner.lock().await;
            if inner.open.as_ref().is_some_and(|o| o.round_id == round.id) {
                inner.open = None;
            }
        }
        self.discard_closed_envelopes().await;
        Ok(())
    }

    pub(super) async fn close_round(
        &self,
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
            self.ctx
                .store
                .transition_round(
                    round.id,
                    RoundState::Open,
                    RoundState::Aggregating,
                    self.now_i64(),
                    None,
                )
                .await?
        };
        if !moved {
            return Ok(());
        }
        let answer = match self
            .timed(self.enclave.call_expecting(
                Frame::new(Kind::Finalize, &json!({}), Vec::new()),
                Kind::Outcome,
            ))
            .await
        {
            Ok(answer) => answer,
            Err(err) => {
                // Left aggregating: the next step resumes it in the new
                // boot if the enclave died, or fails it if the enclave
                // refuses to begin it again.
                tracing::warn!(round_id = round.id, %err, "aggregation failed in the enclave");
                return Ok(());
            }
        };
        let outcome: OutcomeAnswer = answer.meta().map_err(EnclaveError::from)?;
        self.record_verdicts(round.id, &outcome.verdicts).await;
        let model_blob = answer.blobs.into_iter().next();
        match (outcome.aggregated, outcome.certificate, model_blob) {
            (true, Some(certificate), Some(bytes)) => {
                let enclave = self.enclave.ensure_running().await?;
                let version = certificate.model_version;
                self.store_model(version, round.id, &bytes, &certificate, &enclave.report)
                    .await?;
                let accepted = outcome
                    .verdicts
                    .iter()
                    .filter(|v| v.status == "accepted")
                    .count();
                // Which attested enclave made the model: an auditor holding
                // the model file matches these against its certificate's
                // report (`qflare attest verify`).
                let privacy = self.privacy_spent().await?;
                let summary = json!({
                    "model_version": version,
                    "model_sha256": hex::encode(certificate.model_sha256),
                    "privacy": privacy,
                    "accepted": accepted,
                    "rejected": outcome.verdicts.len() - accepted,
                    "stats": outcome.stats,
                    "enclave_mode": enclave.verified.mode.as_str(),
                    "enclave_measurement": hex::encode(enclave.verified.measurement),
                    "enclave_evidence_sha384": enclave
                        .verified
                        .evidence
                        .as_ref()
                        .map(|evidence| hex::encode(evidence.evidence_sha384)),
                });
                self.ctx
                    .store
                    .transition_round(
                        round.id,
                        RoundState::Aggregating,
                        RoundState::Completed,
                        self.now_i64(),
                        Some(&summary.to_string()),
                    )
                    .await?;
                self.ctx
                    .auditor
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
                self.discard_closed_envelopes().await;
                tracing::info!(round_id = round.id, version, accepted, "round aggregated");
                self.evaluate(version, &bytes).await;
            }
            _ => {
                let reason = outcome
                    .error
                    .unwrap_or_else(|| "the enclave produced no model".into());
                self.fail_round(round, RoundState::Aggregating, &reason)
                    .await?;
            }
        }
        Ok(())
    }

    pub(super) async fn record_verdicts(&self, round_id: u64, verdicts: &[LedgerVerdict]) {
        let verdicts: Vec<LedgerVerdict> = verdicts.iter().cloned().map(known_verdict).collect();
        let verdicts = verdicts.as_slice();
        let records: Vec<VerdictRecord> = verdicts
            .iter()
            .map(|v| VerdictRecord {
                device_id: v.device_id.to_hex(),
                verdict: v.status.clone(),
                reason: Some(v.code.clone()),
            })
            .collect();
        if let Err(err) = self.ctx.store.set_verdicts(round_id, &records).await {
            tracing::warn!(%err, "could not store verdicts");
        }
        for verdict in verdicts {
            let kind = if verdict.status == "accepted" {
                AuditKind::UpdateAccepted
            } else {
                AuditKind::UpdateRejected
            };
            self.ctx
                .auditor
                .audit(
                    kind,
                    "enclave",
                    &verdict.device_id.to_hex(),
                    json!({
                        "round_id": round_id,
                        "code": verdict.code,
                    }),
                )
                .await;
        }
    }

    /// Forwards a recorded submission's envelope to the enclave and counts
    /// its verdict.
    pub async fn submit(
        &self,
        round_id: u64,
        device_id: DeviceId,
        envelope: Vec<u8>,
    ) -> Result<LedgerVerdict, FederationError> {
        let answer = self
            .timed(self.enclave.call_expecting(
                Frame::new(Kind::Submit, &SubmitRequest { device_id }, vec![envelope]),
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
        let verdict = known_verdict(answer.meta().map_err(EnclaveError::from)?);
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
}

fn round_device(device: &qflare_store::DeviceRecord) -> Result<RoundDevice, FederationError> {
    let (_, key) =
        registered_keys(device).map_err(|e| FederationError::Inconsistent(e.to_string()))?;
    Ok(RoundDevice {
        device_id: DeviceId::parse(&device.id)?,
        signature_suite: key.suite(),
        verifying_key: key.as_bytes().to_vec(),
    })
}

/// The code a verdict is relayed and recorded under when the enclave gives
/// one outside its fixed set.
pub const UNKNOWN_VERDICT_CODE: &str = "enclave_unknown_code";

/// A verdict with its status and code from the fixed sets
/// ([`qflare_enclave::verdict::is_known_code`]): what the enclave says goes
/// to devices, the metrics' labels and the ledger, so a compromised or
/// mismatched enclave must not be able to put arbitrary text there. An
/// unknown status counts as a rejection.
pub fn known_verdict(verdict: LedgerVerdict) -> LedgerVerdict {
    let status = match verdict.status.as_str() {
        "accepted" | "pending" | "rejected" => verdict.status,
        _ => "rejected".to_owned(),
    };
    let code = if qflare_enclave::verdict::is_known_code(&verdict.code) {
        verdict.code
    } else {
        tracing::warn!(
            device = %verdict.device_id,
            "the enclave gave a verdict code outside its fixed set"
        );
        UNKNOWN_VERDICT_CODE.to_owned()
    };
    LedgerVerdict {
        device_id: verdict.device_id,
        status,
        code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_codes_and_statuses_pass() {
        let device_id = DeviceId::from_bytes([3; 16]);
        let verdict = |status: &str, code: &str| LedgerVerdict {
            device_id,
            status: status.into(),
            code: code.into(),
        };
        assert_eq!(
            known_verdict(verdict("accepted", "clipped")),
            verdict("accepted", "clipped")
        );
        assert_eq!(
            known_verdict(verdict("pending", "pending")),
            verdict("pending", "pending")
        );
        assert_eq!(
            known_verdict(verdict("rejected", "not_selected")),
            verdict("rejected", "not_selected")
        );
        assert_eq!(
            known_verdict(verdict("rejected", "norm 3.1417 > 2.0")),
            verdict("rejected", UNKNOWN_VERDICT_CODE)
        );
        assert_eq!(
            known_verdict(verdict("<script>", "accepted")),
            verdict("rejected", "accepted")
        );
    }
}
