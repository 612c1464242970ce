//! `Certify` in the request service: a restarted enclave endorses a model
//! only when the certificate verifies under a previous boot's report that
//! carries this enclave's own measurement and mode.
//!
//! In software mode a report is self-signed, so these checks catch a model
//! from another build, a tampered report or model, or a certificate by
//! another key; they do not stop a host that forges a report of its own
//! (docs/enclave.md §9.2). What is tested here is what the check does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qflare_enclave::backend::SoftwareBackend;
use qflare_enclave::frame::{ErrorMeta, Frame, Kind};
use qflare_enclave::messages::{
    AttestRequest, CertifyRequest, Hardening, InitModelRequest, ModelAnswer, ReportAnswer,
};
use qflare_enclave::service::EnclaveService;
use qflare_protocol::attestation::AttestationReport;
use qflare_protocol::model::{self, ModelCertificate};
use qflare_protocol::sig::SigningKey;
use qflare_protocol::{KemSuite, SignatureSuite};

const NOW: u64 = 1_800_000_000;
const MEASUREMENT: [u8; 48] = [7; 48];

fn boot(measurement: [u8; 48]) -> EnclaveService<SoftwareBackend> {
    let backend = SoftwareBackend::new(
        measurement,
        KemSuite::MlKem768,
        SignatureSuite::MlDsa65,
        &mut rand::rng(),
    )
    .unwrap();
    EnclaveService::new(backend, Hardening::default(), None)
}

fn report(service: &mut EnclaveService<SoftwareBackend>) -> AttestationReport {
    let answer = service.handle(
        &Frame::new(Kind::Attest, &AttestRequest { nonce: [1; 32] }, Vec::new()),
        NOW,
    );
    assert_eq!(answer.kind, Kind::Report);
    answer.meta::<ReportAnswer>().unwrap().report
}

/// A boot's initial 2NN model, its certificate and the boot's report.
fn certified_model(measurement: [u8; 48]) -> (Vec<u8>, ModelCertificate, AttestationReport) {
    let mut service = boot(measurement);
    let answer = service.handle(
        &Frame::new(
            Kind::InitModel,
            &InitModelRequest {
                architecture: "mnist-2nn".into(),
                seed: 3,
            },
            Vec::new(),
        ),
        NOW,
    );
    assert_eq!(answer.kind, Kind::Model);
    let certificate = answer.meta::<ModelAnswer>().unwrap().certificate;
    let model = answer.blobs.into_iter().next().unwrap();
    (model, certificate, report(&mut service))
}

fn certify(
    service: &mut EnclaveService<SoftwareBackend>,
    model: Vec<u8>,
    certificate: ModelCertificate,
    previous_report: AttestationReport,
) -> Frame {
    service.handle(
        &Frame::new(
            Kind::Certify,
            &CertifyRequest {
                certificate,
                previous_report,
            },
            vec![model],
        ),
        NOW + 60,
    )
}

fn refusal(answer: &Frame) -> ErrorMeta {
    assert_eq!(answer.kind, Kind::Error, "expected a refusal");
    answer.meta::<ErrorMeta>().unwrap()
}

#[test]
fn a_restarted_enclave_recertifies_its_predecessors_model() {
    let (model, certificate, previous) = certified_model(MEASUREMENT);
    let mut restarted = boot(MEASUREMENT);
    let answer = certify(&mut restarted, model.clone(), certificate.clone(), previous);
    assert_eq!(answer.kind, Kind::Model);
    let endorsed = answer.meta::<ModelAnswer>().unwrap().certificate;
    let own = report(&mut restarted);
    let key = qflare_protocol::attestation::verify_report(
        &own,
        &qflare_protocol::attestation::AttestationPolicy {
            allowed_measurements: vec![MEASUREMENT],
            allowed_modes: vec![qflare_protocol::attestation::AttestationMode::Software],
            max_age_secs: 600,
            require_sandbox: false,
            hardware: Default::default(),
        },
        Some(&[1; 32]),
        NOW,
    )
    .unwrap()
    .verifying_key;
    model::verify(&endorsed, &model, &key).unwrap();
    assert_eq!(
        (
            endorsed.model_version,
            endorsed.round_id,
            endorsed.model_sha256
        ),
        (
            certificate.model_version,
            certificate.round_id,
            certificate.model_sha256
        )
    );
}

#[test]
fn a_model_from_another_build_is_refused() {
    let (model, certificate, other_build) = certified_model([9; 48]);
    let mut restarted = boot(MEASUREMENT);
    let error = refusal(&certify(&mut restarted, model, certificate, other_build));
    assert_eq!(error.code, "protocol_error", "{}", error.message);
}

#[test]
fn a_tampered_report_is_refused() {
    let (model, certificate, mut previous) = certified_model(MEASUREMENT);
    previous.issued_at += 1;
    let mut restarted = boot(MEASUREMENT);
    let error = refusal(&certify(&mut restarted, model, certificate, previous));
    assert_eq!(error.code, "protocol_error", "{}", error.message);
}

#[test]
fn a_tampered_model_is_refused() {
    let (mut model, certificate, previous) = certified_model(MEASUREMENT);
    let last = model.len() - 1;
    model[last] ^= 0x40;
    let mut restarted = boot(MEASUREMENT);
    let error = refusal(&certify(&mut restarted, model, certificate, previous));
    assert_eq!(error.code, "protocol_error", "{}", error.message);
}

#[test]
fn a_certificate_by_a_key_other_than_the_reports_is_refused() {
    let (model, _, previous) = certified_model(MEASUREMENT);
    let outsider = SigningKey::generate(SignatureSuite::MlDsa65, &mut rand::rng()).unwrap();
    let forged = model::certify("mnist-2nn", 5, 5, &model, &outsider).unwrap();
    let mut restarted = boot(MEASUREMENT);
    let error = refusal(&certify(&mut restarted, model, forged, previous));
    assert_eq!(error.code, "protocol_error", "{}", error.message);
}
