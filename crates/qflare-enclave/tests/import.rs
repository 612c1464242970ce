//! `ImportModel` in the request service: an admin's own initial model is
//! widened to f32, checked and certified as version 0 — or refused with a
//! reason that names the tensor — and a round over it begins.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qflare_enclave::backend::SoftwareBackend;
use qflare_enclave::frame::{ErrorMeta, Frame, Kind};
use qflare_enclave::messages::{
    AttestRequest, BeginRoundRequest, Hardening, ImportModelRequest, ModelAnswer, ReportAnswer,
};
use qflare_enclave::service::EnclaveService;
use qflare_enclave::{AggregationConfig, AggregatorKind};
use qflare_protocol::model;
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::{KemSuite, SignatureSuite};

const NOW: u64 = 1_800_000_000;

fn boot() -> EnclaveService<SoftwareBackend> {
    let backend = SoftwareBackend::new(
        [7; 48],
        KemSuite::MlKem768,
        SignatureSuite::MlDsa65,
        &mut rand::rng(),
    )
    .unwrap();
    EnclaveService::new(backend, Hardening::default(), None)
}

/// A safetensors file with one tensor `name` of `dtype` holding `data` (raw
/// little-endian elements), as PyTorch or NumPy would write it.
fn file(name: &str, dtype: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
    let header = format!(
        r#"{{"{name}":{{"dtype":"{dtype}","shape":[{}],"data_offsets":[0,{}]}}}}"#,
        shape.join(","),
        data.len()
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn import(service: &mut EnclaveService<SoftwareBackend>, name: &str, bytes: Vec<u8>) -> Frame {
    service.handle(
        &Frame::new(
            Kind::ImportModel,
            &ImportModelRequest { name: name.into() },
            vec![bytes],
        ),
        NOW,
    )
}

fn refusal(frame: &Frame) -> String {
    assert_eq!(frame.kind, Kind::Error, "expected a refusal");
    frame.meta::<ErrorMeta>().unwrap().message
}

#[test]
fn a_half_precision_model_is_certified_as_canonical_f32() {
    let mut service = boot();
    // 1.0, -2.0, 0.5, 0.0 in IEEE half precision.
    let halves = [0x3c00u16, 0xc000, 0x3800, 0x0000];
    let data: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
    let answer = import(
        &mut service,
        "tiny-net",
        file("layer.weight", "F16", &[2, 2], &data),
    );
    assert_eq!(answer.kind, Kind::Model, "{answer:?}");
    let certificate = answer.meta::<ModelAnswer>().unwrap().certificate;
    let model_bytes = answer.blobs.into_iter().next().unwrap();
    let map = TensorMap::from_safetensors(&model_bytes, usize::MAX).unwrap();
    assert_eq!(
        map.get("layer.weight").unwrap().data(),
        [1.0, -2.0, 0.5, 0.0]
    );
    assert_eq!(
        model_bytes,
        map.to_safetensors(),
        "stored in canonical f32 form"
    );
    assert_eq!(
        (
            certificate.architecture.as_str(),
            certificate.model_version,
            certificate.round_id
        ),
        ("tiny-net", 0, 0)
    );
    let report = service.handle(
        &Frame::new(Kind::Attest, &AttestRequest { nonce: [1; 32] }, Vec::new()),
        NOW,
    );
    let report = report.meta::<ReportAnswer>().unwrap().report;
    let key = qflare_protocol::sig::VerifyingKey::from_bytes(
        report.signature_suite,
        report.verifying_key.clone(),
    )
    .unwrap();
    model::verify(&certificate, &model_bytes, &key).unwrap();

    // A round over the imported model begins.
    let begin = |aggregator| {
        let config = AggregationConfig {
            aggregator,
            ..AggregationConfig::default()
        };
        Frame::new(
            Kind::BeginRound,
            &BeginRoundRequest {
                round_id: 1,
                model_version: 0,
                architecture: "tiny-net".into(),
                config,
                update_encoding: Default::default(),
                devices: Vec::new(),
                reference_training: None,
                expected_participants: None,
            },
            vec![model_bytes.clone()],
        )
    };
    assert_eq!(
        service.handle(&begin(AggregatorKind::FedAvg), NOW).kind,
        Kind::Ack
    );
}

#[test]
fn models_that_cannot_be_federated_are_refused_by_name() {
    let mut service = boot();
    let counter = file("bn.num_batches_tracked", "I64", &[], &3i64.to_le_bytes());
    let message = refusal(&import(&mut service, "with-bn", counter));
    assert!(
        message.contains("bn.num_batches_tracked") && message.contains("I64"),
        "{message}"
    );

    let nan: Vec<u8> = [1.0f32, f32::NAN]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let message = refusal(&import(
        &mut service,
        "nan-net",
        file("fc.bias", "F32", &[2], &nan),
    ));
    assert!(message.contains("fc.bias"), "{message}");

    let ok: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let message = refusal(&import(
        &mut service,
        "Not A Name",
        file("fc.bias", "F32", &[2], &ok),
    ));
    assert!(message.contains("model name"), "{message}");
    // A built-in architecture's name promises its layout.
    let message = refusal(&import(
        &mut service,
        "mnist-2nn",
        file("fc.bias", "F32", &[2], &ok),
    ));
    assert!(!message.is_empty());
    assert_eq!(
        import(
            &mut service,
            "two-floats",
            file("fc.bias", "F32", &[2], &ok)
        )
        .kind,
        Kind::Model
    );
    // Once a model is certified, no second initial model is.
    let message = refusal(&import(
        &mut service,
        "two-floats",
        file("fc.bias", "F32", &[2], &ok),
    ));
    assert!(message.contains("once"), "{message}");
}
