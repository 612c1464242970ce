//! The certified current model: created as version 0 by the enclave,
//! re-certified after an enclave restart, stored with the certificate and
//! the report of the enclave boot that signed it, and evaluated on the
//! held-out set.

use std::sync::Arc;

use qflare_enclave::frame::{Frame, Kind};
use qflare_enclave::host::{EnclaveError, EnclaveInfo};
use qflare_enclave::messages::{CertifyRequest, ImportModelRequest, InitModelRequest, ModelAnswer};
use qflare_protocol::attestation::AttestationReport;
use qflare_protocol::crypto::sha256;
use qflare_protocol::model::ModelCertificate;
use qflare_store::ModelRecord;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{CurrentModel, Federation, FederationError};
use crate::ledger::AuditKind;

/// A model an admin registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisteredModel {
    /// The model's name.
    pub name: String,
    /// Its version (0).
    pub version: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of scalar parameters.
    pub parameters: usize,
    /// SHA-256 of the stored (canonical f32) safetensors bytes, hex.
    pub model_sha256: String,
}

/// What `certificate_json` holds for every stored model: the certificate and
/// the enclave key that made it, so a later enclave boot can endorse it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoredCertificate {
    /// The enclave's certificate.
    pub certificate: ModelCertificate,
    /// The attestation report of the enclave boot that signed it.
    pub report: AttestationReport,
}

impl Federation {
    /// The current model, certified by the running enclave (creating model 0
    /// or re-certifying after an enclave restart as needed).
    pub async fn current_model(
        &self,
        enclave: &EnclaveInfo,
    ) -> Result<CurrentModel, FederationError> {
        // Every download asks: the summary names the newest version
        // without reading its bytes, which the cache already holds.
        let newest = self.ctx.store.latest_model_summary().await?;
        {
            let inner = self.inner.lock().await;
            if let (Some(model), Some(newest)) = (&inner.model, &newest)
                && model.version == newest.version
                && model.generation == enclave.generation
            {
                return Ok(model.clone());
            }
        }
        let current_key = enclave.verified.verifying_key.clone();
        let _creating = self.model_creation.lock().await;
        // Read under the lock: registration, or another caller, may have
        // stored a model while this waited.
        let stored = self.ctx.store.latest_model().await?;
        {
            let inner = self.inner.lock().await;
            if let (Some(model), Some(stored)) = (&inner.model, &stored)
                && model.version == stored.version
                && model.generation == enclave.generation
            {
                return Ok(model.clone());
            }
        }
        let (version, bytes, certificate) = match stored {
            None => {
                let preset = self.preset.ok_or(FederationError::NoModel)?;
                let request = InitModelRequest {
                    architecture: preset.to_string(),
                    seed: self.ctx.config.federation.model_seed,
                };
                let answer = self
                    .enclave
                    .call_expecting(
                        Frame::new(Kind::InitModel, &request, Vec::new()),
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
                self.store_model(0, 0, &bytes, &certificate, &enclave.report)
                    .await?;
                self.evaluate(0, &bytes).await;
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
                    self.ctx
                        .auditor
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
                            Frame::new(Kind::Certify, &request, vec![record.bytes.clone()]),
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

    /// Registers the federation's initial model from an admin's file: the
    /// enclave checks and certifies it as version 0 under `name`, and it is
    /// stored in canonical f32 form. Only for `federation.architecture:
    /// custom`, and only while no model exists.
    pub async fn register_model(
        &self,
        name: &str,
        file: Vec<u8>,
    ) -> Result<RegisteredModel, FederationError> {
        if let Some(preset) = self.preset {
            return Err(FederationError::ModelExists(format!(
                "federation.architecture is the built-in {preset}, which the enclave creates \
                 itself; set it to custom to register a model file"
            )));
        }
        qflare_protocol::model::validate_model_name(name)
            .map_err(|e| FederationError::ModelRefused(e.to_string()))?;
        // Decoded here too, for an error that names the tensor without a
        // round trip to the enclave; the enclave decodes it again itself.
        let map = qflare_protocol::tensor::TensorMap::from_safetensors(
            &file,
            qflare_protocol::wire::limits::TENSORS,
        )
        .map_err(|e| FederationError::ModelRefused(e.to_string()))?;
        let enclave = self.enclave.ensure_running().await?;
        let _creating = self.model_creation.lock().await;
        if let Some(existing) = self.ctx.store.latest_model().await? {
            return Err(FederationError::ModelExists(format!(
                "model {} version {} is registered already; a federation's model is fixed once \
                 registered",
                existing.architecture, existing.version
            )));
        }
        let request = ImportModelRequest {
            name: name.to_owned(),
        };
        let answer = self
            .enclave
            .call_expecting(
                Frame::new(Kind::ImportModel, &request, vec![file]),
                Kind::Model,
            )
            .await
            .map_err(|e| match e {
                EnclaveError::Refused { message, .. } => FederationError::ModelRefused(message),
                other => other.into(),
            })?;
        let certificate = answer
            .meta::<ModelAnswer>()
            .map_err(EnclaveError::from)?
            .certificate;
        let bytes = answer
            .blobs
            .into_iter()
            .next()
            .ok_or_else(|| FederationError::Inconsistent("the enclave sent no model".into()))?;
        self.store_model(0, 0, &bytes, &certificate, &enclave.report)
            .await?;
        self.ctx
            .auditor
            .audit(
                AuditKind::ModelRegistered,
                "admin",
                name,
                json!({
                    "model_sha256": hex::encode(certificate.model_sha256),
                    "tensors": map.len(),
                    "parameters": map.num_parameters(),
                }),
            )
            .await;
        tracing::info!(name, parameters = map.num_parameters(), "model registered");
        self.poke();
        Ok(RegisteredModel {
            name: name.to_owned(),
            version: 0,
            tensors: map.len(),
            parameters: map.num_parameters(),
            model_sha256: hex::encode(certificate.model_sha256),
        })
    }

    pub(super) async fn store_model(
        &self,
        version: u64,
        round_id: u64,
        bytes: &[u8],
        certificate: &ModelCertificate,
        report: &AttestationReport,
    ) -> Result<(), FederationError> {
        qflare_protocol::model::validate_model_name(&certificate.architecture)?;
        let stored = StoredCertificate {
            certificate: certificate.clone(),
            report: report.clone(),
        };
        self.ctx
            .store
            .insert_model(&ModelRecord {
                version,
                round_id,
                architecture: certificate.architecture.clone(),
                bytes: bytes.to_vec(),
                certificate_json: serde_json::to_string(&stored)
                    .map_err(|e| FederationError::Inconsistent(e.to_string()))?,
                created_at: self.now_i64(),
                accuracy: None,
                loss: None,
            })
            .await?;
        Ok(())
    }

    pub(super) async fn evaluate(&self, version: u64, bytes: &[u8]) {
        let (Some(eval), Some(architecture)) = (self.eval.clone(), self.preset) else {
            return;
        };
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
                if let Err(err) = self
                    .ctx
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
}
