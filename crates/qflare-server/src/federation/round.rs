//! A round's life: open it (select devices, begin the round in the
//! enclave), forward submissions, close it (aggregate, store and evaluate the
//! new model, ledger every verdict) or fail it.

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
            let (_, key) = registered_keys(device)
                .map_err(|e| FederationError::Inconsistent(e.to_string()))?;
            devices.push(RoundDevice {
                device_id: DeviceId::parse(&device.id)?,
                signature_suite: key.suite(),
                verifying_key: key.as_bytes().to_vec(),
            });
        }
        let mut aggregation = self.ctx.config.aggregation.clone();
        aggregation.min_accepted = aggregation.min_accepted.max(config.min_updates);
        let training = &config.training;
        let request = BeginRoundRequest {
            round_id,
            model_version: model.version,
            architecture: model.certificate.architecture.clone(),
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
            && let Some(previous) = self.ctx.store.get_model(model.version - 1).await?
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
                json!({ "architecture": model.certificate.architecture, "training": training })
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
        let mut inner = self.inner.lock().await;
        if inner.open.as_ref().is_some_and(|o| o.round_id == round.id) {
            inner.open = None;
        }
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
                &Frame::new(Kind::Finalize, &json!({}), Vec::new()),
                Kind::Outcome,
            ))
            .await
        {
            Ok(answer) => answer,
            Err(err) => {
                self.fail_round(
                    round,
                    RoundState::Aggregating,
                    &format!("the enclave failed: {err}"),
                )
                .await?;
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
                let summary = json!({
                    "model_version": version,
                    "model_sha256": hex::encode(certificate.model_sha256),
                    "accepted": accepted,
                    "rejected": outcome.verdicts.len() - accepted,
                    "stats": outcome.stats,
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
