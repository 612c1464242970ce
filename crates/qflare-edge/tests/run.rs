//! The device loop's checks that need no server: the enclave report, the
//! model download (the defence against a host-side tampered model), the
//! back-off schedule, shard parsing and selection, and the loop's handling
//! of configuration errors and an unreachable server.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use qflare_edge::run::{
    DeviceEvent, StopOutcome, decode_model, verify_model_certificate, verify_model_download,
    verify_round_report,
};
use qflare_edge::shard::select_local_data;
use qflare_edge::{
    Backoff, BurnTrainer, DeviceConfig, EdgeError, Events, Identity, ModelRefusal, Shard,
    StopReason, run_device,
};
use qflare_ml::model::{IMAGE_PIXELS, IMAGE_SIDE};
use qflare_ml::{Architecture, Dataset, initial_model};
use qflare_protocol::attestation::{
    AttestationMode, AttestationPolicy, AttestationReport, EnclaveRuntime, ReportBody,
    SeccompState, VerifiedEnclave, sign_report,
};
use qflare_protocol::crypto::sha256;
use qflare_protocol::federation::{ModelDownload, encode_model_download};
use qflare_protocol::identity::{DeviceId, DeviceKeys, ServerFingerprint};
use qflare_protocol::kem::KemKeyPair;
use qflare_protocol::model::certify;
use qflare_protocol::sig::SigningKey;
use qflare_protocol::{KemSuite, ProtocolError, SignatureSuite};

const NOW: u64 = 1_700_000_000;
const MEASUREMENT: [u8; 48] = [7; 48];
const NONCE: [u8; 32] = [42; 32];

/// An enclave: its signing key and a report for `NONCE`.
struct Enclave {
    signing: SigningKey,
    report: AttestationReport,
}

fn enclave() -> Enclave {
    let mut rng = rand::rng();
    let signing = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
    let kem = KemKeyPair::generate(KemSuite::MlKem768, &mut rng).unwrap();
    let body = ReportBody {
        mode: AttestationMode::Software,
        measurement: MEASUREMENT,
        kem_public_key: kem.public,
        verifying_key: signing.verifying_key().clone(),
        nonce: NONCE,
        issued_at: NOW,
        evidence: Vec::new(),
        runtime: Some(sandboxed_runtime()),
    };
    let report = sign_report(&body, &signing).unwrap();
    Enclave { signing, report }
}

fn sandboxed_runtime() -> EnclaveRuntime {
    EnclaveRuntime {
        seccomp: SeccompState::Enforce,
        no_new_privs: true,
        not_dumpable: true,
        no_core_files: true,
        memory_locked: true,
        arguments: vec!["--threads".into(), "1".into()],
        root_data_sha256: None,
    }
}

fn policy() -> AttestationPolicy {
    AttestationPolicy {
        allowed_measurements: vec![MEASUREMENT],
        allowed_modes: vec![AttestationMode::Software],
        max_age_secs: 600,
        require_sandbox: true,
        hardware: Default::default(),
    }
}

fn verified(enclave: &Enclave) -> VerifiedEnclave {
    verify_round_report(&enclave.report, &policy(), &NONCE, NOW + 5).unwrap()
}

/// A download of the 2NN's initial model, certified by `signer` as
/// `version` of `architecture`, naming `named_key`'s hash.
fn download(
    signer: &SigningKey,
    named_key: &SigningKey,
    version: u64,
    architecture: &str,
) -> Vec<u8> {
    let model = initial_model(Architecture::Mnist2nn, 1)
        .unwrap()
        .to_safetensors();
    let certificate = certify(architecture, version, version, &model, signer).unwrap();
    let header = ModelDownload {
        certificate,
        enclave_key_sha256: sha256(named_key.verifying_key().as_bytes()),
    };
    encode_model_download(&header, &model).unwrap()
}

fn refusal(result: Result<impl std::fmt::Debug, EdgeError>) -> ModelRefusal {
    match result {
        Err(EdgeError::ModelRefused(reason)) => reason,
        other => panic!("expected a model refusal, got {other:?}"),
    }
}

#[test]
fn an_honest_model_verifies_and_decodes() {
    let enclave = enclave();
    let bytes = download(&enclave.signing, &enclave.signing, 3, "mnist-2nn");
    let (certificate, weights) =
        verify_model_download(&bytes, &verified(&enclave), 3, "mnist-2nn").unwrap();
    assert_eq!(certificate.model_version, 3);
    assert_eq!(weights, initial_model(Architecture::Mnist2nn, 1).unwrap());
}

#[test]
fn a_flipped_model_byte_is_refused() {
    let enclave = enclave();
    let bytes = download(&enclave.signing, &enclave.signing, 3, "mnist-2nn");
    // Flip a byte in the weights (the last byte is deep in fc3.bias) and one
    // in the middle of the model, each on its own.
    for position in [bytes.len() - 1, bytes.len() - 400_000] {
        let mut tampered = bytes.clone();
        tampered[position] ^= 0x01;
        assert_eq!(
            refusal(verify_model_download(
                &tampered,
                &verified(&enclave),
                3,
                "mnist-2nn"
            )),
            ModelRefusal::Certificate(ProtocolError::Mismatch("model digest")),
        );
    }
}

#[test]
fn a_certificate_from_another_key_is_refused() {
    let enclave = enclave();
    let host = SigningKey::generate(SignatureSuite::MlDsa65, &mut rand::rng()).unwrap();
    // The host signs with its own key but names the attested key's hash.
    let bytes = download(&host, &enclave.signing, 3, "mnist-2nn");
    assert!(matches!(
        refusal(verify_model_download(
            &bytes,
            &verified(&enclave),
            3,
            "mnist-2nn"
        )),
        ModelRefusal::Certificate(ProtocolError::BadSignature(_))
    ));
}

#[test]
fn an_enclave_key_hash_mismatch_is_refused() {
    let enclave = enclave();
    let other = SigningKey::generate(SignatureSuite::MlDsa65, &mut rand::rng()).unwrap();
    // A model genuinely certified by another enclave, named as such.
    let bytes = download(&other, &other, 3, "mnist-2nn");
    assert_eq!(
        refusal(verify_model_download(
            &bytes,
            &verified(&enclave),
            3,
            "mnist-2nn"
        )),
        ModelRefusal::EnclaveKeyMismatch
    );
}

#[test]
fn a_wrong_model_version_is_refused() {
    let enclave = enclave();
    // A genuine, older model replayed by the host into version 3's round.
    let bytes = download(&enclave.signing, &enclave.signing, 2, "mnist-2nn");
    assert_eq!(
        refusal(verify_model_download(
            &bytes,
            &verified(&enclave),
            3,
            "mnist-2nn"
        )),
        ModelRefusal::VersionMismatch {
            expected: 3,
            received: 2
        }
    );
}

#[test]
fn a_wrong_architecture_is_refused() {
    let enclave = enclave();
    // The certificate says mnist-cnn while the round trains the 2NN ...
    let bytes = download(&enclave.signing, &enclave.signing, 3, "mnist-cnn");
    assert_eq!(
        refusal(verify_model_download(
            &bytes,
            &verified(&enclave),
            3,
            "mnist-2nn"
        )),
        ModelRefusal::ArchitectureMismatch {
            expected: "mnist-2nn".into(),
            received: "mnist-cnn".into()
        }
    );
    // ... and certified weights holding a NaN are refused, naming the tensor.
    let mut poisoned = initial_model(Architecture::Mnist2nn, 3).unwrap();
    let (name, tensor) = poisoned.iter_mut().next().unwrap();
    let name = name.to_owned();
    tensor.data_mut()[0] = f32::NAN;
    let model = poisoned.to_safetensors();
    let certificate = certify("mnist-2nn", 3, 3, &model, &enclave.signing).unwrap();
    let header = ModelDownload {
        certificate,
        enclave_key_sha256: sha256(enclave.signing.verifying_key().as_bytes()),
    };
    let bytes = encode_model_download(&header, &model).unwrap();
    let (_, model) = verify_model_certificate(&bytes, &verified(&enclave), 3, "mnist-2nn").unwrap();
    match refusal(decode_model(model)) {
        ModelRefusal::Layout(reason) => assert!(reason.contains(&name), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn certified_garbage_and_truncated_downloads_are_refused() {
    let enclave = enclave();
    let garbage = b"not a safetensors file".to_vec();
    let certificate = certify("mnist-2nn", 3, 3, &garbage, &enclave.signing).unwrap();
    let header = ModelDownload {
        certificate,
        enclave_key_sha256: sha256(enclave.signing.verifying_key().as_bytes()),
    };
    let bytes = encode_model_download(&header, &garbage).unwrap();
    assert!(matches!(
        refusal(verify_model_download(
            &bytes,
            &verified(&enclave),
            3,
            "mnist-2nn"
        )),
        ModelRefusal::Layout(_)
    ));
    assert!(matches!(
        refusal(verify_model_download(
            &bytes[..3],
            &verified(&enclave),
            3,
            "mnist-2nn"
        )),
        ModelRefusal::Malformed(_)
    ));
}

#[test]
fn the_report_must_match_nonce_measurement_and_mode() {
    let enclave = enclave();
    let refused = |result: Result<VerifiedEnclave, EdgeError>| match result {
        Err(EdgeError::Attestation(ProtocolError::AttestationRefused(why))) => why,
        other => panic!("expected an attestation refusal, got {other:?}"),
    };
    assert!(verify_round_report(&enclave.report, &policy(), &NONCE, NOW).is_ok());
    assert_eq!(
        refused(verify_round_report(
            &enclave.report,
            &policy(),
            &[43; 32],
            NOW
        )),
        "nonce does not match"
    );
    let other_measurement = AttestationPolicy {
        allowed_measurements: vec![[8; 48]],
        ..policy()
    };
    assert_eq!(
        refused(verify_round_report(
            &enclave.report,
            &other_measurement,
            &NONCE,
            NOW
        )),
        "measurement not on the allow-list"
    );
    let no_software = AttestationPolicy {
        allowed_modes: Vec::new(),
        ..policy()
    };
    assert_eq!(
        refused(verify_round_report(
            &enclave.report,
            &no_software,
            &NONCE,
            NOW
        )),
        "mode not permitted"
    );
    // A stale report is refused too, and a report whose measurement was
    // edited after signing fails its signature.
    assert!(matches!(
        verify_round_report(&enclave.report, &policy(), &NONCE, NOW + 601),
        Err(EdgeError::Attestation(ProtocolError::Expired { .. }))
    ));
    let mut edited = enclave.report.clone();
    edited.measurement = [8; 48];
    let lenient = AttestationPolicy {
        allowed_measurements: vec![[8; 48]],
        ..policy()
    };
    assert!(matches!(
        verify_round_report(&edited, &lenient, &NONCE, NOW),
        Err(EdgeError::Attestation(ProtocolError::BadSignature(_)))
    ));
}

#[test]
fn an_unsandboxed_enclave_is_refused_unless_the_device_allows_it() {
    let Enclave { signing, .. } = enclave();
    let sign = |runtime: EnclaveRuntime| {
        let body = ReportBody {
            mode: AttestationMode::Software,
            measurement: MEASUREMENT,
            kem_public_key: KemKeyPair::generate(KemSuite::MlKem768, &mut rand::rng())
                .unwrap()
                .public,
            verifying_key: signing.verifying_key().clone(),
            nonce: NONCE,
            issued_at: NOW,
            evidence: Vec::new(),
            runtime: Some(runtime),
        };
        sign_report(&body, &signing).unwrap()
    };
    // `--seccomp log`, as the enclave signs it.
    let log_only = sign(EnclaveRuntime {
        seccomp: SeccompState::Log,
        ..sandboxed_runtime()
    });
    assert!(matches!(
        verify_round_report(&log_only, &policy(), &NONCE, NOW),
        Err(EdgeError::Attestation(ProtocolError::AttestationRefused(m))) if m.contains("sandbox")
    ));
    let allowing = AttestationPolicy {
        require_sandbox: false,
        ..policy()
    };
    let verified = verify_round_report(&log_only, &allowing, &NONCE, NOW).unwrap();
    assert_eq!(verified.runtime.map(|r| r.seccomp), Some(SeccompState::Log));
    // A host that edits the signed runtime back to "enforce" breaks the
    // signature, under either policy.
    let mut relabelled = log_only.clone();
    relabelled.runtime.as_mut().unwrap().seccomp = SeccompState::Enforce;
    for policy in [policy(), allowing] {
        assert!(matches!(
            verify_round_report(&relabelled, &policy, &NONCE, NOW),
            Err(EdgeError::Attestation(ProtocolError::BadSignature(_)))
        ));
    }
}

#[test]
fn back_off_grows_and_is_bounded() {
    let backoff = Backoff::default();
    let mut rng = rand::rng();
    let mut previous = Duration::ZERO;
    for attempt in 0..200 {
        let ceiling = backoff.ceiling(attempt);
        assert!(ceiling >= previous, "attempt {attempt} shrank");
        assert!(ceiling <= Duration::from_secs(30));
        for _ in 0..20 {
            let delay = backoff.delay(attempt, &mut rng);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} vs {ceiling:?}"
            );
        }
        previous = ceiling;
    }
    assert_eq!(backoff.ceiling(0), Duration::from_millis(500));
    assert_eq!(backoff.ceiling(1), Duration::from_secs(1));
    assert_eq!(backoff.ceiling(3), Duration::from_secs(4));
    assert_eq!(backoff.ceiling(6), Duration::from_secs(30));
    assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(30));
    // The jittered waits grow too: attempt 4's shortest beats attempt 1's longest.
    assert!(backoff.delay(4, &mut rng) > backoff.ceiling(1));
}

#[test]
fn partition_k_of_n_parses() {
    assert_eq!(
        "3/10".parse::<Shard>().unwrap(),
        Shard {
            index: 2,
            count: 10
        }
    );
    assert_eq!(
        " 1 / 1 ".parse::<Shard>().unwrap(),
        Shard { index: 0, count: 1 }
    );
    assert_eq!("3/10".parse::<Shard>().unwrap().to_string(), "3/10");
    for bad in ["0/10", "11/10", "3/0", "3", "a/10", "3/b", "-1/10", "", "/"] {
        assert!(
            matches!(bad.parse::<Shard>(), Err(EdgeError::Config(_))),
            "{bad:?} parsed"
        );
    }
}

fn synthetic(n: usize) -> Dataset {
    let mut images = vec![0.0f32; n * IMAGE_PIXELS];
    for (i, image) in images.chunks_mut(IMAGE_PIXELS).enumerate() {
        // Tag each image with its index so shards can be told apart.
        image[0] = i as f32 / n as f32;
    }
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Dataset::new(images, labels, IMAGE_SIDE, IMAGE_SIDE).unwrap()
}

/// The burn trainer over `synthetic(n)`.
fn trainer(n: usize) -> Arc<BurnTrainer> {
    Arc::new(BurnTrainer::new(synthetic(n)))
}

#[test]
fn shards_are_disjoint_cover_the_data_and_are_reproducible() {
    let data = synthetic(103);
    let mut seen = Vec::new();
    for k in 1..=4 {
        let shard: Shard = format!("{k}/4").parse().unwrap();
        let part = select_local_data(&data, Some(shard), None, 9).unwrap();
        assert!(part.len() == 25 || part.len() == 26);
        let again = select_local_data(&data, Some(shard), None, 9).unwrap();
        assert_eq!(part, again, "same seed, same shard");
        seen.extend((0..part.len()).map(|i| part.image(i).unwrap()[0].to_bits()));
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 103, "every example in exactly one shard");
    let shard = Some("1/4".parse().unwrap());
    assert_ne!(
        select_local_data(&data, shard, None, 9).unwrap(),
        select_local_data(&data, shard, None, 10).unwrap(),
        "the seed drives the split"
    );
    assert_eq!(
        select_local_data(&data, shard, Some(10), 9).unwrap().len(),
        10
    );
    assert_eq!(select_local_data(&data, None, Some(7), 9).unwrap().len(), 7);
    assert!(select_local_data(&data, None, Some(0), 9).is_err());
}

fn identity(server_url: &str) -> Identity {
    let mut rng = rand::rng();
    let server = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
    Identity {
        device_id: DeviceId::random(&mut rng),
        device_name: "test".into(),
        server_url: server_url.into(),
        server_fingerprint: ServerFingerprint::compute(b"certificate", server.verifying_key()),
        server_certificate_sha256: sha256(b"certificate"),
        server_key: server.verifying_key().clone(),
        keys: DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng).unwrap(),
        key_version: 1,
        pending_keys: None,
        alternate_urls: Vec::new(),
    }
}

fn recorder() -> (Events, Arc<Mutex<Vec<DeviceEvent>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    (
        Events::from_fn(move |event| sink.lock().unwrap().push(event)),
        seen,
    )
}

#[tokio::test]
async fn an_unusable_configuration_fails_before_any_network() {
    let identity = identity("https://127.0.0.1:1");
    let empty_list = DeviceConfig::new(
        AttestationPolicy {
            allowed_measurements: Vec::new(),
            ..policy()
        },
        trainer(10),
    );
    assert!(matches!(
        run_device(&identity, empty_list, Events::none()).await,
        Err(EdgeError::Config(_))
    ));
    let no_mode = DeviceConfig::new(
        AttestationPolicy {
            allowed_modes: Vec::new(),
            ..policy()
        },
        trainer(10),
    );
    assert!(matches!(
        run_device(&identity, no_mode, Events::none()).await,
        Err(EdgeError::Config(_))
    ));
    let no_data = DeviceConfig::new(policy(), Arc::new(BurnTrainer::new(synthetic(10).head(0))));
    let err = run_device(&identity, no_data, Events::none())
        .await
        .unwrap_err();
    assert!(matches!(&err, EdgeError::Config(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "configuration: the local data set is empty"
    );
    let mut zero_rounds = DeviceConfig::new(policy(), trainer(10));
    zero_rounds.max_rounds = Some(0);
    let summary = run_device(&identity, zero_rounds, Events::none())
        .await
        .unwrap();
    assert_eq!(summary.stop, StopReason::MaxRounds);
    assert_eq!(summary.sessions_opened, 0);
}

#[tokio::test]
async fn an_unreachable_server_is_retried_with_back_off_then_given_up() {
    // Port 1 on loopback refuses connections at once.
    let identity = identity("https://127.0.0.1:1");
    let mut config = DeviceConfig::new(policy(), trainer(10));
    config.backoff = Backoff {
        initial: Duration::from_millis(5),
        cap: Duration::from_millis(20),
        max_attempts: Some(3),
    };
    let (events, seen) = recorder();
    let result = run_device(&identity, config, events).await;
    assert!(matches!(result, Err(EdgeError::Network(_))), "{result:?}");
    let seen = seen.lock().unwrap();
    let attempts: Vec<u32> = seen
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::Retrying { attempt, delay, .. } => {
                assert!(*delay <= Duration::from_millis(20));
                Some(*attempt)
            }
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert!(matches!(
        seen.last(),
        Some(DeviceEvent::Stopped(StopOutcome::Failed(_)))
    ));
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, DeviceEvent::SessionOpened { .. }))
    );
}
