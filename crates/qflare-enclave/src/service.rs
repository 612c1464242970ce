//! The enclave's request handling: a pure state machine from request frames
//! to answer frames. No I/O, and the time comes in as an argument, so the
//! whole protocol is tested in-process; the binary adds only the stdio loop
//! and the sandbox ([`crate::process`]).
//!
//! State: the models this boot has certified (by digest) and at most one
//! active round. A round aggregates only on top of a model this boot
//! certified, so the host cannot make the enclave sign an update of a model
//! it never produced; updates are accepted only from the round's selected
//! devices, under the keys the host registered for them, for this round and
//! this model version. Round ids only move forward and a version names one
//! model ([`crate::history`]), so a host cannot re-run a round to replay a
//! device's envelope.

use std::collections::{HashMap, HashSet};

use qflare_ml::{Architecture, Dataset};
use qflare_protocol::attestation::{self, AttestationPolicy};
use qflare_protocol::crypto::sha256;
use qflare_protocol::envelope::{self, UpdateEnvelope};
use qflare_protocol::identity::DeviceId;
use qflare_protocol::model;
use qflare_protocol::sig::VerifyingKey;
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::update_encoding::{self, UpdateEncoding};
use qflare_protocol::wire::limits;
use zeroize::Zeroizing;

use crate::backend::EnclaveBackend;
use crate::frame::{Frame, FrameError, Kind};
use crate::history::BootHistory;
use crate::messages::{
    AckAnswer, AttestRequest, BeginRoundRequest, CertifyRequest, Hardening, ImportModelRequest,
    InitModelRequest, LedgerVerdict, ModelAnswer, OutcomeAnswer, ReportAnswer, SubmitRequest,
};
use crate::round::{RoundAggregator, RoundSpec};
use crate::validate::CandidateUpdate;
use crate::verdict::{DeviceVerdict, Verdict};

/// A request that could not be served: becomes an `Error` frame.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The frame itself was malformed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A request out of order (e.g. `Submit` without a round).
    #[error("{0}")]
    State(&'static str),
    /// A request that contradicts the enclave's state.
    #[error("{0}")]
    Refused(String),
    /// The ML backend failed.
    #[error(transparent)]
    Ml(#[from] qflare_ml::MlError),
    /// A protocol operation failed.
    #[error(transparent)]
    Protocol(#[from] qflare_protocol::ProtocolError),
    /// The boot's history forbids it (an old round id, a second model for a version).
    #[error(transparent)]
    History(#[from] crate::history::HistoryError),
    /// The aggregation settings are invalid.
    #[error(transparent)]
    Config(#[from] crate::error::ConfigError),
    /// The aggregator refused to start.
    #[error(transparent)]
    Aggregation(#[from] crate::error::AggregationError),
}

impl ServiceError {
    fn code(&self) -> &'static str {
        match self {
            Self::Frame(e) => e.code(),
            Self::State(_) => "bad_state",
            Self::Refused(_) | Self::History(_) => "refused",
            Self::Ml(_) => "ml_error",
            Self::Protocol(_) => "protocol_error",
            Self::Config(_) => "bad_config",
            Self::Aggregation(_) => "aggregation_error",
        }
    }

    /// The error frame for this failure.
    pub fn to_frame(&self) -> Frame {
        Frame::error(self.code(), &self.to_string())
    }
}

pub use crate::verdict::ENVELOPE_CODES;

struct CertifiedModel {
    architecture: String,
    model_version: u64,
}

struct ActiveRound {
    round_id: u64,
    model_version: u64,
    architecture: String,
    global: TensorMap,
    /// The largest envelope an update of this round's model can need.
    envelope_limit: usize,
    /// How this round's updates must be encoded.
    update_encoding: UpdateEncoding,
    devices: HashMap<DeviceId, VerifyingKey>,
    seen: HashSet<DeviceId>,
    aggregator: RoundAggregator,
    /// Envelope-level rejections (before the aggregator saw anything).
    refused: Vec<LedgerVerdict>,
}

/// The enclave's state.
pub struct EnclaveService<B> {
    backend: B,
    hardening: Hardening,
    certified: HashMap<[u8; 32], CertifiedModel>,
    round: Option<ActiveRound>,
    history: BootHistory,
    root_data: Option<Dataset>,
}

impl<B> std::fmt::Debug for EnclaveService<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnclaveService")
            .field("certified_models", &self.certified.len())
            .field("round", &self.round.as_ref().map(|r| r.round_id))
            .finish_non_exhaustive()
    }
}

fn ledger(verdict: &DeviceVerdict) -> LedgerVerdict {
    LedgerVerdict {
        device_id: verdict.device_id,
        status: if verdict.accepted {
            "accepted"
        } else {
            "rejected"
        }
        .to_owned(),
        code: verdict.reason.code().to_owned(),
    }
}

/// Decodes a model the enclave is asked to certify under `name`: a valid
/// name, a well-formed tensor file and, for a built-in architecture's
/// name, that architecture's layout.
fn decode_model(name: &str, bytes: &[u8]) -> Result<TensorMap, ServiceError> {
    model::validate_model_name(name)?;
    let map = TensorMap::from_safetensors(bytes, limits::TENSORS)?;
    if map.is_empty() {
        return Err(ServiceError::Refused("the model has no tensors".into()));
    }
    if let Ok(architecture) = name.parse::<Architecture>() {
        architecture.validate(&map)?;
    }
    Ok(map)
}

fn refusal(device_id: DeviceId, code: &str) -> LedgerVerdict {
    LedgerVerdict {
        device_id,
        status: "rejected".to_owned(),
        code: code.to_owned(),
    }
}

impl<B: EnclaveBackend> EnclaveService<B> {
    /// A fresh enclave. `root_data` is FLTrust's small clean data set, read
    /// before the sandbox closed the file system.
    pub fn new(backend: B, hardening: Hardening, root_data: Option<Dataset>) -> Self {
        Self {
            backend,
            hardening,
            certified: HashMap::new(),
            round: None,
            history: BootHistory::default(),
            root_data,
        }
    }

    /// The backend (for the process loop's probe and tests).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Serves one request at time `now`.
    pub fn handle(&mut self, request: &Frame, now: u64) -> Frame {
        let result = match request.kind {
            Kind::Attest => self.attest(request, now),
            Kind::InitModel => self.init_model(request),
            Kind::ImportModel => self.import_model(request),
            Kind::Certify => self.certify(request),
            Kind::BeginRound => self.begin_round(request),
            Kind::Submit => self.submit(request),
            Kind::Finalize => self.finalize(),
            Kind::Abort => Ok(self.abort()),
            _ => Err(ServiceError::State("not a request this enclave serves")),
        };
        result.unwrap_or_else(|err| {
            tracing::warn!(kind = ?request.kind, code = err.code(), %err, "request refused");
            err.to_frame()
        })
    }

    fn attest(&self, request: &Frame, now: u64) -> Result<Frame, ServiceError> {
        request.expect_blobs(0)?;
        let meta: AttestRequest = request.meta()?;
        let report = self.backend.attest(meta.nonce, now)?;
        Ok(Frame::new(
            Kind::Report,
            &ReportAnswer {
                report,
                hardening: self.hardening,
            },
            Vec::new(),
        ))
    }

    /// Certifies `model` as `model_version` of `architecture` and remembers
    /// it, unless this boot certified another model as that version.
    fn certify_and_remember(
        &mut self,
        architecture: &str,
        model_version: u64,
        round_id: u64,
        model: &[u8],
    ) -> Result<model::ModelCertificate, ServiceError> {
        let digest = sha256(model);
        self.history.check_version(model_version, &digest)?;
        let certificate = self
            .backend
            .certify(architecture, model_version, round_id, model)?;
        self.history.certified(model_version, digest);
        self.certified.insert(
            digest,
            CertifiedModel {
                architecture: architecture.to_owned(),
                model_version,
            },
        );
        Ok(certificate)
    }

    fn init_model(&mut self, request: &Frame) -> Result<Frame, ServiceError> {
        request.expect_blobs(0)?;
        let meta: InitModelRequest = request.meta()?;
        let architecture: Architecture = meta.architecture.parse()?;
        let model = qflare_ml::initial_model(architecture, meta.seed)?.to_safetensors();
        let certificate = self.certify_and_remember(&meta.architecture, 0, 0, &model)?;
        Ok(Frame::new(
            Kind::Model,
            &ModelAnswer { certificate },
            vec![model],
        ))
    }

    fn import_model(&mut self, request: &Frame) -> Result<Frame, ServiceError> {
        request.expect_blobs(1)?;
        // A federation starts once: a host that could have a second
        // "version 0" certified mid-federation could swap the model devices
        // train on. (Across an enclave restart this boot cannot know; see
        // docs/enclave.md §10.)
        if !self.certified.is_empty() {
            return Err(ServiceError::Refused(
                "this enclave has certified a model already; an initial model is imported \
                 once, before anything else"
                    .into(),
            ));
        }
        let meta: ImportModelRequest = request.meta()?;
        let map = decode_model(&meta.name, &request.blobs[0])?;
        if let Some(name) = map.first_non_finite() {
            return Err(ServiceError::Refused(format!(
                "tensor {name} of the initial model holds a NaN or an infinity"
            )));
        }
        let model = map.to_safetensors();
        let certificate = self.certify_and_remember(&meta.name, 0, 0, &model)?;
        tracing::info!(
            name = %meta.name,
            tensors = map.len(),
            parameters = map.num_parameters(),
            "imported an initial model"
        );
        Ok(Frame::new(
            Kind::Model,
            &ModelAnswer { certificate },
            vec![model],
        ))
    }

    fn certify(&mut self, request: &Frame) -> Result<Frame, ServiceError> {
        request.expect_blobs(1)?;
        let meta: CertifyRequest = request.meta()?;
        let model_bytes = &request.blobs[0];
        // The previous boot must have run this very code in this very mode.
        let own = AttestationPolicy {
            allowed_measurements: vec![self.backend.measurement()],
            allowed_modes: vec![self.backend.mode()],
            max_age_secs: u64::MAX,
            // The previous boot's certificate is what counts here, not how
            // that boot was sandboxed.
            require_sandbox: false,
            hardware: Default::default(),
        };
        let previous = attestation::verify_report(
            &meta.previous_report,
            &own,
            None,
            meta.previous_report.issued_at,
        )?;
        model::verify(&meta.certificate, model_bytes, &previous.verifying_key)?;
        decode_model(&meta.certificate.architecture, model_bytes)?;
        let certificate = self.certify_and_remember(
            &meta.certificate.architecture,
            meta.certificate.model_version,
            meta.certificate.round_id,
            model_bytes,
        )?;
        Ok(Frame::new(
            Kind::Model,
            &ModelAnswer { certificate },
            Vec::new(),
        ))
    }

    fn begin_round(&mut self, request: &Frame) -> Result<Frame, ServiceError> {
        if request.blobs.is_empty() || request.blobs.len() > 2 {
            return Err(FrameError::Blobs {
                expected: 1,
                got: request.blobs.len(),
            }
            .into());
        }
        let meta: BeginRoundRequest = request.meta()?;
        self.history
            .check_begin(meta.round_id, meta.model_version)?;
        meta.config.validate()?;
        let global_bytes = &request.blobs[0];
        let known = self.certified.get(&sha256(global_bytes)).ok_or_else(|| {
            ServiceError::Refused("the global model was not certified by this enclave".into())
        })?;
        if known.model_version != meta.model_version || known.architecture != meta.architecture {
            return Err(ServiceError::Refused(
                "the global model's version or architecture differs from its certificate".into(),
            ));
        }
        let global = TensorMap::from_safetensors(global_bytes, limits::TENSORS)?;
        // Only a built-in architecture can be trained in here, which is
        // what FLTrust's reference update needs.
        let builtin = meta.architecture.parse::<Architecture>().ok();
        // The previous model counts only if this boot certified it as the
        // version before; otherwise the defense falls back to the round median.
        let previous_global_update = match request.blobs.get(1) {
            Some(previous) => match self.certified.get(&sha256(previous)) {
                Some(prev)
                    if prev.model_version + 1 == meta.model_version
                        && prev.architecture == meta.architecture =>
                {
                    let previous = TensorMap::from_safetensors(previous, limits::TENSORS)?;
                    Some(qflare_ml::delta(&global, &previous)?)
                }
                _ => None,
            },
            None => None,
        };
        let trusted_reference = match (
            &meta.config.aggregator,
            &self.root_data,
            &meta.reference_training,
        ) {
            (crate::config::AggregatorKind::Fltrust, Some(root), Some(training)) => {
                let architecture = builtin.ok_or_else(|| {
                    ServiceError::Refused(format!(
                        "FLTrust trains a reference update on the root data, which needs a \
                         built-in architecture; model {} is not one",
                        meta.architecture
                    ))
                })?;
                let outcome = qflare_ml::train(architecture, &global, root, training, None)?;
                Some(qflare_ml::delta(&outcome.weights, &global)?)
            }
            _ => None,
        };
        let mut devices = HashMap::with_capacity(meta.devices.len());
        for device in &meta.devices {
            devices.insert(
                device.device_id,
                VerifyingKey::from_bytes(device.signature_suite, device.verifying_key.clone())?,
            );
        }
        let aggregator = RoundAggregator::new(RoundSpec {
            round_id: meta.round_id,
            base_model_version: meta.model_version,
            global: global.clone(),
            previous_global_update,
            trusted_reference,
            config: meta.config,
            expected_participants: meta.expected_participants,
        })?;
        if let Some(old) = self.round.take() {
            tracing::warn!(
                round = old.round_id,
                "a new round replaces an unfinished one"
            );
        }
        self.history.begun(meta.round_id);
        self.round = Some(ActiveRound {
            round_id: meta.round_id,
            model_version: meta.model_version,
            architecture: meta.architecture.clone(),
            global,
            envelope_limit: limits::update_envelope_for(global_bytes.len()),
            update_encoding: meta.update_encoding,
            devices,
            seen: HashSet::new(),
            aggregator,
            refused: Vec::new(),
        });
        tracing::info!(
            round = meta.round_id,
            devices = meta.devices.len(),
            "round begun"
        );
        Ok(Frame::new(
            Kind::Ack,
            &AckAnswer {
                round_id: Some(meta.round_id),
            },
            Vec::new(),
        ))
    }

    fn submit(&mut self, request: &Frame) -> Result<Frame, ServiceError> {
        request.expect_blobs(1)?;
        let meta: SubmitRequest = request.meta()?;
        let round = self
            .round
            .as_mut()
            .ok_or(ServiceError::State("no round is open in the enclave"))?;
        // Whatever the verdict, the round has seen an envelope: its id is spent.
        self.history.used();
        let first = !round.seen.contains(&meta.device_id);
        let verdict = Self::judge(&self.backend, round, meta.device_id, &request.blobs[0]);
        // The aggregator keeps its own verdicts (including rejections on
        // arrival) and hands them back at finalize; only refusals it never
        // saw are kept here, once per device.
        if first && verdict.status == "rejected" && ENVELOPE_CODES.contains(&verdict.code.as_str())
        {
            round.refused.push(verdict.clone());
        }
        round.seen.insert(meta.device_id);
        Ok(Frame::new(Kind::Verdict, &verdict, Vec::new()))
    }

    /// Everything between the sealed bytes and the aggregator (its refusals
    /// use the codes in [`ENVELOPE_CODES`]).
    fn judge(
        backend: &B,
        round: &mut ActiveRound,
        device_id: DeviceId,
        bytes: &[u8],
    ) -> LedgerVerdict {
        let Some(device_key) = round.devices.get(&device_id) else {
            return refusal(device_id, "not_selected");
        };
        if round.seen.contains(&device_id) {
            return refusal(device_id, "duplicate");
        }
        let envelope: UpdateEnvelope = match envelope::decode(bytes, round.envelope_limit) {
            Ok(envelope) => envelope,
            Err(_) => return refusal(device_id, "malformed_envelope"),
        };
        if envelope.device_id != device_id {
            return refusal(device_id, "device_mismatch");
        }
        if envelope.round_id != round.round_id {
            return refusal(device_id, "wrong_round");
        }
        if envelope.model_version != round.model_version {
            return refusal(device_id, "wrong_model_version");
        }
        let opened = match backend.open(&envelope, device_key) {
            Ok(opened) => opened,
            Err(qflare_protocol::ProtocolError::BadSignature(_)) => {
                return refusal(device_id, "bad_signature");
            }
            Err(_) => return refusal(device_id, "undecryptable"),
        };
        let update = Zeroizing::new(opened.update);
        let delta = match update_encoding::decode(&update, round.update_encoding, limits::TENSORS) {
            Ok(delta) => delta,
            Err(_) => return refusal(device_id, "malformed_update"),
        };
        drop(update);
        let candidate = CandidateUpdate {
            device_id,
            round_id: opened.metadata.round_id,
            base_model_version: opened.metadata.model_version,
            example_count: opened.metadata.example_count,
            delta,
        };
        match round.aggregator.submit(candidate) {
            Ok(Verdict::Accepted(reason)) => LedgerVerdict {
                status: "accepted".into(),
                ..refusal(device_id, reason.code())
            },
            Ok(Verdict::Pending) => LedgerVerdict {
                status: "pending".into(),
                ..refusal(device_id, "pending")
            },
            Ok(Verdict::Rejected(reason)) => refusal(device_id, reason.code()),
            Err(err) => {
                tracing::warn!(%err, "aggregator refused an update");
                refusal(device_id, "aggregator_error")
            }
        }
    }

    fn finalize(&mut self) -> Result<Frame, ServiceError> {
        let round = self
            .round
            .take()
            .ok_or(ServiceError::State("no round is open in the enclave"))?;
        self.history.used();
        let mut verdicts = round.refused;
        match round.aggregator.finalize_with_noise(&mut rand::rng()) {
            Ok(result) => {
                verdicts.extend(result.verdicts.iter().map(ledger));
                let model = result.new_global.to_safetensors();
                let version = round.model_version + 1;
                let certificate = self.certify_and_remember(
                    &round.architecture,
                    version,
                    round.round_id,
                    &model,
                )?;
                drop(round.global);
                tracing::info!(
                    round = round.round_id,
                    version,
                    accepted = result.stats.accepted,
                    "round aggregated"
                );
                Ok(Frame::new(
                    Kind::Outcome,
                    &OutcomeAnswer {
                        aggregated: true,
                        certificate: Some(certificate),
                        error: None,
                        retryable: false,
                        verdicts,
                        stats: Some((&result.stats).into()),
                    },
                    vec![model],
                ))
            }
            Err(failure) => {
                verdicts.extend(failure.verdicts.iter().map(ledger));
                tracing::warn!(round = round.round_id, error = %failure.error, "round failed");
                Ok(Frame::new(
                    Kind::Outcome,
                    &OutcomeAnswer {
                        aggregated: false,
                        certificate: None,
                        error: Some(failure.error.to_string()),
                        retryable: failure.error.is_retryable(),
                        verdicts,
                        stats: Some((&failure.stats).into()),
                    },
                    Vec::new(),
                ))
            }
        }
    }

    fn abort(&mut self) -> Frame {
        let round_id = self.round.take().map(|r| r.round_id);
        Frame::new(Kind::Ack, &AckAnswer { round_id }, Vec::new())
    }
}
