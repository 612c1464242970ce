//! A host cannot re-run a round in one enclave boot to replay a device's
//! envelope, nor have two models certified as one version (issue 11 item 7).
//!
//! The attack these tests stop: a round closes with device A among many;
//! the host keeps A's envelope, begins the same round id again (or an
//! older one) with A alone, submits the envelope and reads A's update off
//! the new model. The enclave's own request service is driven here with
//! real sealed envelopes; `process.rs` checks the same refusal against the
//! real binary after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qflare_enclave::backend::SoftwareBackend;
use qflare_enclave::frame::{ErrorMeta, Frame, Kind};
use qflare_enclave::messages::{
    AttestRequest, BeginRoundRequest, CertifyRequest, Hardening, InitModelRequest, LedgerVerdict,
    ModelAnswer, OutcomeAnswer, ReportAnswer, RoundDevice, SubmitRequest,
};
use qflare_enclave::service::EnclaveService;
use qflare_enclave::{AggregationConfig, DefenseConfig};
use qflare_protocol::attestation::{
    self, AttestationMode, AttestationPolicy, AttestationReport, VerifiedEnclave,
};
use qflare_protocol::envelope::{self, UpdateMetadata};
use qflare_protocol::identity::DeviceId;
use qflare_protocol::model::ModelCertificate;
use qflare_protocol::sig::SigningKey;
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::{KemSuite, SignatureSuite};

const NOW: u64 = 1_800_000_000;
const MEASUREMENT: [u8; 48] = [7; 48];

struct Enclave {
    service: EnclaveService<SoftwareBackend>,
    report: AttestationReport,
    verified: VerifiedEnclave,
}

fn boot() -> Enclave {
    let backend = SoftwareBackend::new(
        MEASUREMENT,
        KemSuite::MlKem768,
        SignatureSuite::MlDsa65,
        &mut rand::rng(),
    )
    .unwrap();
    let mut service = EnclaveService::new(backend, Hardening::default(), None);
    let answer = service.handle(
        &Frame::new(Kind::Attest, &AttestRequest { nonce: [1; 32] }, Vec::new()),
        NOW,
    );
    let report = answer.meta::<ReportAnswer>().unwrap().report;
    let policy = AttestationPolicy {
        allowed_measurements: vec![MEASUREMENT],
        allowed_modes: vec![AttestationMode::Software],
        max_age_secs: 600,
        // An in-process service, not the sandboxed binary.
        require_sandbox: false,
        hardware: Default::default(),
    };
    let verified = attestation::verify_report(&report, &policy, Some(&[1; 32]), NOW).unwrap();
    Enclave {
        service,
        report,
        verified,
    }
}

struct Device {
    id: DeviceId,
    key: SigningKey,
}

fn device() -> Device {
    let mut rng = rand::rng();
    Device {
        id: DeviceId::random(&mut rng),
        key: SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap(),
    }
}

fn refusal(answer: &Frame) -> ErrorMeta {
    assert_eq!(answer.kind, Kind::Error, "expected a refusal");
    answer.meta::<ErrorMeta>().unwrap()
}

impl Enclave {
    fn call(&mut self, kind: Kind, meta: &impl serde::Serialize, blobs: Vec<Vec<u8>>) -> Frame {
        self.service.handle(&Frame::new(kind, meta, blobs), NOW)
    }

    /// Model version 0 of the 2NN from `seed`, with its certificate.
    fn init(&mut self, seed: u64) -> Frame {
        self.call(
            Kind::InitModel,
            &InitModelRequest {
                architecture: "mnist-2nn".into(),
                seed,
            },
            Vec::new(),
        )
    }

    fn begin(&mut self, round_id: u64, version: u64, model: &[u8], devices: &[&Device]) -> Frame {
        let request = BeginRoundRequest {
            round_id,
            model_version: version,
            architecture: "mnist-2nn".into(),
            config: AggregationConfig {
                defense: DefenseConfig::off(),
                ..AggregationConfig::default()
            },
            update_encoding: Default::default(),
            devices: devices
                .iter()
                .map(|d| RoundDevice {
                    device_id: d.id,
                    signature_suite: d.key.suite(),
                    verifying_key: d.key.verifying_key().as_bytes().to_vec(),
                })
                .collect(),
            reference_training: None,
            expected_participants: None,
        };
        self.call(Kind::BeginRound, &request, vec![model.to_vec()])
    }

    /// An honest update of `model` for round `round_id`, sealed to this boot.
    fn seal(&self, device: &Device, round_id: u64, version: u64, model: &[u8]) -> Vec<u8> {
        let global = TensorMap::from_safetensors(model, 1 << 26).unwrap();
        let delta: Vec<f32> = global.to_flat().iter().map(|w| -0.01 * w).collect();
        let update = global.with_flat(&delta).unwrap().to_safetensors();
        let sealed = envelope::seal(
            &UpdateMetadata {
                round_id,
                device_id: device.id,
                model_version: version,
                example_count: 600,
            },
            &update,
            &device.key,
            &self.verified.kem_public_key,
            &mut rand::rng(),
        )
        .unwrap();
        serde_json::to_vec(&sealed).unwrap()
    }

    fn submit(&mut self, device: &Device, sealed: Vec<u8>) -> LedgerVerdict {
        let answer = self.call(
            Kind::Submit,
            &SubmitRequest {
                device_id: device.id,
            },
            vec![sealed],
        );
        assert_eq!(answer.kind, Kind::Verdict);
        answer.meta().unwrap()
    }

    /// Finalizes; returns the new model and its certificate.
    fn finalize(&mut self) -> (Vec<u8>, ModelCertificate) {
        let answer = self.call(Kind::Finalize, &serde_json::json!({}), Vec::new());
        assert_eq!(answer.kind, Kind::Outcome);
        let outcome: OutcomeAnswer = answer.meta().unwrap();
        assert!(outcome.aggregated, "{:?}", outcome.error);
        (
            answer.blobs.into_iter().next().unwrap(),
            outcome.certificate.unwrap(),
        )
    }
}

fn model_of(answer: Frame) -> (Vec<u8>, ModelCertificate) {
    assert_eq!(answer.kind, Kind::Model, "{:?}", answer.meta::<ErrorMeta>());
    let certificate = answer.meta::<ModelAnswer>().unwrap().certificate;
    (answer.blobs.into_iter().next().unwrap(), certificate)
}

#[test]
fn a_finished_round_cannot_be_begun_again_to_replay_an_envelope() {
    let mut enclave = boot();
    let (v0, _) = model_of(enclave.init(3));
    let (a, b) = (device(), device());
    assert_eq!(enclave.begin(1, 0, &v0, &[&a, &b]).kind, Kind::Ack);
    let kept = enclave.seal(&a, 1, 0, &v0);
    assert_ne!(enclave.submit(&a, kept.clone()).status, "rejected");
    let b_sealed = enclave.seal(&b, 1, 0, &v0);
    assert_ne!(enclave.submit(&b, b_sealed).status, "rejected");
    let (v1, _) = enclave.finalize();

    // The replay: round 1 again, with A alone, on the same model.
    let error = refusal(&enclave.begin(1, 0, &v0, &[&a]));
    assert_eq!(error.code, "refused");
    assert!(error.message.contains("round 1"), "{}", error.message);
    // Nor can the envelope be fed to a new round: it names round 1.
    assert_eq!(enclave.begin(2, 1, &v1, &[&a]).kind, Kind::Ack);
    let verdict = enclave.submit(&a, kept);
    assert_eq!(
        (verdict.status.as_str(), verdict.code.as_str()),
        ("rejected", "wrong_round")
    );
    // And no older round at all.
    let error = refusal(&enclave.begin(1, 1, &v1, &[&a]));
    assert!(error.message.contains("older"), "{}", error.message);
}

#[test]
fn an_aborted_round_with_updates_stays_aborted_one_without_may_be_retried() {
    let mut enclave = boot();
    let (v0, _) = model_of(enclave.init(3));
    let (a, b) = (device(), device());

    // Begun, nothing submitted, begun again: the host's retry after its own failure.
    assert_eq!(enclave.begin(4, 0, &v0, &[&a, &b]).kind, Kind::Ack);
    assert_eq!(enclave.begin(4, 0, &v0, &[&a, &b]).kind, Kind::Ack);

    // An update arrives, the host aborts and wants the round again with A alone.
    let sealed = enclave.seal(&a, 4, 0, &v0);
    assert_ne!(enclave.submit(&a, sealed.clone()).status, "rejected");
    assert_eq!(
        enclave
            .call(Kind::Abort, &serde_json::json!({}), Vec::new())
            .kind,
        Kind::Ack
    );
    let error = refusal(&enclave.begin(4, 0, &v0, &[&a]));
    assert!(error.message.contains("round 4"), "{}", error.message);
    // A refused submission spends the id too.
    assert_eq!(enclave.begin(5, 0, &v0, &[&a]).kind, Kind::Ack);
    let verdict = enclave.submit(&b, sealed);
    assert_eq!(verdict.code, "not_selected");
    assert_eq!(refusal(&enclave.begin(5, 0, &v0, &[&a])).code, "refused");
    assert_eq!(enclave.begin(6, 0, &v0, &[&a]).kind, Kind::Ack);
}

#[test]
fn one_version_names_one_model() {
    // Another boot of the same build certified a different version 0.
    let mut previous = boot();
    let (other_v0, other_certificate) = model_of(previous.init(4));
    let previous_report = previous.report.clone();

    let mut enclave = boot();
    let (v0, _) = model_of(enclave.init(3));
    // The same model again is fine (idempotent); a different one is not.
    assert_eq!(model_of(enclave.init(3)).0, v0);
    let error = refusal(&enclave.init(4));
    assert!(error.message.contains("version 0"), "{}", error.message);
    let error = refusal(&enclave.call(
        Kind::Certify,
        &CertifyRequest {
            certificate: other_certificate,
            previous_report,
        },
        vec![other_v0],
    ));
    assert_eq!(error.code, "refused");
    assert!(error.message.contains("version 0"), "{}", error.message);

    // A round on version 0 makes version 1; a second round on version 0
    // would make another version 1, so it does not begin.
    let a = device();
    assert_eq!(enclave.begin(1, 0, &v0, &[&a]).kind, Kind::Ack);
    let sealed = enclave.seal(&a, 1, 0, &v0);
    enclave.submit(&a, sealed);
    let (v1, certificate) = enclave.finalize();
    assert_eq!(certificate.model_version, 1);
    let error = refusal(&enclave.begin(2, 0, &v0, &[&a]));
    assert!(error.message.contains("version 1"), "{}", error.message);
    assert_eq!(enclave.begin(2, 1, &v1, &[&a]).kind, Kind::Ack);
}
