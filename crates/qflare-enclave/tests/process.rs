//! The real `qflare-enclave` process: attested, sandboxed, robust to bad
//! frames, and survivable — killed mid-round with SIGKILL, restarted by the
//! host, and the retried round completes (once: its id is then spent).
//!
//! About 640 lines: every test here starts the same real process through
//! one set of helpers (start, fleet, seal, submit), which a split would have
//! to share through a second module for no gain in reading.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use qflare_enclave::AggregationConfig;
use qflare_enclave::backend::measure_file;
use qflare_enclave::frame::{ErrorMeta, Frame, FrameReader, Kind};
use qflare_enclave::host::{EnclaveClient, EnclaveCommand, EnclaveError};
use qflare_enclave::messages::{
    AttestRequest, BeginRoundRequest, CertifyRequest, FatalAttempt, InitModelRequest,
    LedgerVerdict, ModelAnswer, OutcomeAnswer, ProbeAnswer, ProbeRequest, RoundDevice,
    SubmitRequest,
};
use qflare_protocol::attestation::{self, AttestationMode, AttestationPolicy, SeccompState};
use qflare_protocol::envelope::{self, UpdateMetadata};
use qflare_protocol::identity::DeviceId;
use qflare_protocol::model::{self, ModelCertificate};
use qflare_protocol::sig::SigningKey;
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::update_encoding::{self, UpdateEncoding};
use qflare_protocol::{ProtocolError, SignatureSuite};
use rand::SeedableRng;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qflare-enclave"))
}

fn policy() -> AttestationPolicy {
    AttestationPolicy {
        allowed_measurements: vec![measure_file(&binary()).unwrap()],
        allowed_modes: vec![AttestationMode::Software],
        max_age_secs: 300,
        require_sandbox: true,
        hardware: Default::default(),
    }
}

fn command() -> EnclaveCommand {
    EnclaveCommand {
        program: binary(),
        args: vec!["--threads".into(), "1".into()],
    }
}

async fn start() -> EnclaveClient {
    EnclaveClient::start(command(), policy(), Duration::from_secs(60))
        .await
        .unwrap()
}

#[tokio::test]
async fn attested_hardened_and_sandboxed() {
    let client = start().await;
    let info = client.info().await.unwrap();
    assert_eq!(info.report.mode, AttestationMode::Software);
    assert!(info.hardening.not_dumpable);
    assert!(info.hardening.no_core_files);
    assert!(info.hardening.seccomp);
    // The same, signed: the arguments the host gave and the sandbox's state.
    let runtime = info.verified.runtime.clone().unwrap();
    assert_eq!(runtime.seccomp, SeccompState::Enforce);
    assert!(runtime.sandboxed() && runtime.not_dumpable && runtime.no_core_files);
    assert_eq!(runtime.arguments, command().args);
    assert_eq!(runtime.root_data_sha256, None);

    // From inside, the forbidden operations fail.
    let answer = client
        .call_expecting(
            Frame::new(Kind::Probe, &ProbeRequest::default(), Vec::new()),
            Kind::ProbeResult,
        )
        .await
        .unwrap();
    let probe: ProbeAnswer = answer.meta().unwrap();
    assert!(probe.open_blocked, "open(2) must fail inside the sandbox");
    assert!(
        probe.exec_blocked,
        "spawning a process must fail inside the sandbox"
    );

    // And the process still works afterwards.
    let nonce = [7u8; 32];
    let report = client.attest(nonce).await.unwrap();
    attestation::verify_report(&report, &policy(), Some(&nonce), now()).unwrap();
    client.shutdown().await;
}

/// The host sees the enclave die of `SIGSYS` when it makes a call the
/// sandbox kills for (tests/sandbox.rs covers each such call).
#[test]
fn the_real_enclave_is_killed_by_a_forbidden_socket() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(binary())
        .args(&command().args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A plain probe first: the sandbox is up once it is answered.
    Frame::new(Kind::Probe, &ProbeRequest::default(), Vec::new())
        .write_to(&mut stdin)
        .unwrap();
    let mut stdout = FrameReader::new(child.stdout.take().unwrap());
    assert_eq!(stdout.read().unwrap().kind, Kind::ProbeResult);
    let fatal = ProbeRequest {
        fatal_attempt: Some(FatalAttempt::Socket),
    };
    Frame::new(Kind::Probe, &fatal, Vec::new())
        .write_to(&mut stdin)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}

#[tokio::test]
async fn an_enclave_started_with_its_sandbox_off_says_so_in_its_signed_report() {
    let mut log_only = command();
    log_only.args.extend(["--seccomp".into(), "log".into()]);
    // A verifier that requires the sandbox (a device, by default) refuses it...
    let err = EnclaveClient::start(log_only.clone(), policy(), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EnclaveError::Attestation(ProtocolError::AttestationRefused(m)) if m.contains("sandbox")),
        "{err}"
    );
    // ...and one that allows it sees what the host asked for.
    let lenient = AttestationPolicy {
        require_sandbox: false,
        ..policy()
    };
    let client = EnclaveClient::start(log_only.clone(), lenient, Duration::from_secs(60))
        .await
        .unwrap();
    let runtime = client.info().await.unwrap().verified.runtime.unwrap();
    assert_eq!(runtime.seccomp, SeccompState::Log);
    assert!(!runtime.sandboxed());
    assert_eq!(runtime.arguments, log_only.args);
    client.shutdown().await;
}

/// Set in the copy of this test binary that
/// [`the_enclave_inherits_only_allow_listed_environment`] starts.
const PLANTED: &str = "QFLARE_TEST_PLANTED_SECRET";

#[tokio::test]
async fn the_enclave_inherits_only_allow_listed_environment() {
    // Changing this process's environment needs `unsafe` (other test
    // threads read it), so the test runs itself again in a child process
    // that starts with a planted secret, as a server starts with its token.
    if std::env::var_os(PLANTED).is_none() {
        let output = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "the_enclave_inherits_only_allow_listed_environment",
                "--test-threads",
                "1",
            ])
            .env(PLANTED, "hunter2-admin-token")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        return;
    }
    let client = start().await;
    let answer = client
        .call_expecting(
            Frame::new(Kind::Probe, &ProbeRequest::default(), Vec::new()),
            Kind::ProbeResult,
        )
        .await
        .unwrap();
    let probe: ProbeAnswer = answer.meta().unwrap();
    assert!(
        !probe.environment.iter().any(|name| name == PLANTED),
        "{:?}",
        probe.environment
    );
    // Only allow-listed names; the log filter among them.
    assert!(probe.environment.iter().any(|name| name == "RUST_LOG"));
    for name in &probe.environment {
        assert!(
            qflare_enclave::host::INHERITED_ENV.contains(&name.as_str()),
            "{name}"
        );
    }
    client.shutdown().await;
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn the_verifier_refuses_wrong_measurement_nonce_and_mode() {
    let mut wrong = policy();
    wrong.allowed_measurements = vec![[0u8; 48]];
    let err = EnclaveClient::start(command(), wrong, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(err, EnclaveError::Attestation(ProtocolError::AttestationRefused(m)) if m.contains("measurement")),
        "{err}"
    );

    let mut no_software = policy();
    no_software.allowed_modes.clear();
    let err = EnclaveClient::start(command(), no_software, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(err, EnclaveError::Attestation(ProtocolError::AttestationRefused(m)) if m.contains("mode")),
        "{err}"
    );

    let client = start().await;
    let report = client.attest([1u8; 32]).await.unwrap();
    let err = attestation::verify_report(&report, &policy(), Some(&[2u8; 32]), now()).unwrap_err();
    assert!(matches!(err, ProtocolError::AttestationRefused(m) if m.contains("nonce")));
    client.shutdown().await;
}

#[test]
fn malformed_frames_get_error_frames_and_the_process_goes_on() {
    let mut child = Command::new(binary())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut reader = FrameReader::new(child.stdout.take().unwrap());
    let attest = Frame::new(Kind::Attest, &AttestRequest { nonce: [3; 32] }, Vec::new())
        .encode()
        .unwrap();

    let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
    let mut unknown = attest.clone();
    unknown[5] = 0x42;
    cases.push((unknown, "unknown_kind"));
    let mut version = attest.clone();
    version[4] = 9;
    cases.push((version, "bad_header"));
    cases.push((
        Frame {
            kind: Kind::Attest,
            meta: b"{not json".to_vec(),
            blobs: vec![],
        }
        .encode()
        .unwrap(),
        "malformed_metadata",
    ));
    cases.push((
        Frame::new(
            Kind::Submit,
            &serde_json::json!({"device_id": "00"}),
            vec![vec![]],
        )
        .encode()
        .unwrap(),
        "malformed_metadata",
    ));
    cases.push((
        Frame::new(
            Kind::Submit,
            &SubmitRequest {
                device_id: DeviceId::from_bytes([1; 16]),
            },
            vec![vec![1]],
        )
        .encode()
        .unwrap(),
        "bad_state",
    ));
    cases.push((
        Frame::new(
            Kind::Attest,
            &AttestRequest { nonce: [3; 32] },
            vec![vec![]],
        )
        .encode()
        .unwrap(),
        "malformed_body",
    ));
    let mut lying = Frame::new(Kind::Attest, &AttestRequest { nonce: [3; 32] }, Vec::new())
        .encode()
        .unwrap();
    lying.push(0);
    let n = lying.len() as u32 - 12;
    lying[8..12].copy_from_slice(&n.to_be_bytes());
    cases.push((lying, "malformed_body"));

    for (bytes, code) in cases {
        stdin.write_all(&bytes).unwrap();
        stdin.flush().unwrap();
        let answer = reader.read().unwrap();
        assert_eq!(answer.kind, Kind::Error);
        let meta: ErrorMeta = answer.meta().unwrap();
        assert_eq!(meta.code, code, "{}", meta.message);
    }
    // Still alive and serving.
    stdin.write_all(&attest).unwrap();
    stdin.flush().unwrap();
    assert_eq!(reader.read().unwrap().kind, Kind::Report);

    // A frame claiming an absurd length leaves the stream unaligned: the
    // enclave answers and stops cleanly rather than guessing.
    let mut huge = attest.clone();
    huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    stdin.write_all(&huge[..12]).unwrap();
    stdin.flush().unwrap();
    let answer = reader.read().unwrap();
    let meta: ErrorMeta = answer.meta().unwrap();
    assert_eq!(meta.code, "too_large");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(4));
    let mut rest = Vec::new();
    let _ = child.stdout.take().map(|mut s| s.read_to_end(&mut rest));
}

struct Fleet {
    devices: Vec<(DeviceId, SigningKey)>,
    updates: Vec<Vec<u8>>,
}

/// 20 devices with honest updates: a shared direction plus small noise.
fn fleet(global: &TensorMap) -> Fleet {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(99);
    let direction: Vec<f32> = global.to_flat().iter().map(|w| -0.01 * w).collect();
    let mut devices = Vec::new();
    let mut updates = Vec::new();
    for _ in 0..20 {
        let key = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
        devices.push((DeviceId::random(&mut rng), key));
        let noisy: Vec<f32> = direction
            .iter()
            .map(|d| d * (1.0 + 0.1 * (rand::RngExt::random::<f32>(&mut rng) - 0.5)))
            .collect();
        updates.push(global.with_flat(&noisy).unwrap().to_safetensors());
    }
    Fleet { devices, updates }
}

/// The enclave's initial 2NN (seed 7) and its certificate.
async fn init_2nn(client: &EnclaveClient) -> (Vec<u8>, ModelCertificate) {
    let answer = client
        .call_expecting(
            Frame::new(
                Kind::InitModel,
                &InitModelRequest {
                    architecture: "mnist-2nn".into(),
                    seed: 7,
                },
                Vec::new(),
            ),
            Kind::Model,
        )
        .await
        .unwrap();
    let certificate = answer.meta::<ModelAnswer>().unwrap().certificate;
    (answer.blobs[0].clone(), certificate)
}

async fn begin(client: &EnclaveClient, fleet: &Fleet, model: &[u8]) {
    begin_encoded(client, fleet, model, UpdateEncoding::F32).await;
}

async fn begin_encoded(
    client: &EnclaveClient,
    fleet: &Fleet,
    model: &[u8],
    update_encoding: UpdateEncoding,
) {
    let request = BeginRoundRequest {
        round_id: 1,
        model_version: 0,
        architecture: "mnist-2nn".into(),
        config: AggregationConfig::default(),
        update_encoding,
        devices: fleet
            .devices
            .iter()
            .map(|(id, key)| RoundDevice {
                device_id: *id,
                signature_suite: key.suite(),
                verifying_key: key.verifying_key().as_bytes().to_vec(),
            })
            .collect(),
        reference_training: None,
        expected_participants: None,
    };
    client
        .call_expecting(
            Frame::new(Kind::BeginRound, &request, vec![model.to_vec()]),
            Kind::Ack,
        )
        .await
        .unwrap();
}

async fn submit(
    client: &EnclaveClient,
    fleet: &Fleet,
    index: usize,
) -> Result<LedgerVerdict, EnclaveError> {
    submit_bytes(client, fleet, index, &fleet.updates[index]).await
}

/// Seals `update` (already encoded) for device `index` and submits its
/// envelope in the binary encoding devices send.
async fn submit_bytes(
    client: &EnclaveClient,
    fleet: &Fleet,
    index: usize,
    update: &[u8],
) -> Result<LedgerVerdict, EnclaveError> {
    let enclave_key = client.info().await.unwrap().verified.kem_public_key;
    let (device_id, key) = &fleet.devices[index];
    let meta = UpdateMetadata {
        round_id: 1,
        device_id: *device_id,
        model_version: 0,
        example_count: 600,
    };
    let sealed = envelope::seal(&meta, update, key, &enclave_key, &mut rand::rng()).unwrap();
    let answer = client
        .call_expecting(
            Frame::new(
                Kind::Submit,
                &SubmitRequest {
                    device_id: *device_id,
                },
                vec![sealed.to_bytes()],
            ),
            Kind::Verdict,
        )
        .await?;
    Ok(answer.meta().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_round_restarted_and_the_retried_round_completes() {
    let client = start().await;
    let first = client.info().await.unwrap();
    let (model_bytes, certificate) = init_2nn(&client).await;
    model::verify(&certificate, &model_bytes, &first.verified.verifying_key).unwrap();
    let global = TensorMap::from_safetensors(&model_bytes, 1 << 26).unwrap();
    let fleet = fleet(&global);

    begin(&client, &fleet, &model_bytes).await;
    for i in 0..10 {
        let verdict = submit(&client, &fleet, i).await.unwrap();
        assert_ne!(verdict.status, "rejected", "{verdict:?}");
    }

    // SIGKILL mid-round.
    let pid = first.pid.unwrap();
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let err = submit(&client, &fleet, 10).await.unwrap_err();
    assert!(matches!(err, EnclaveError::Died(_)), "{err}");

    // The host restarts and re-attests it: new generation, new keys.
    let second = client.ensure_running().await.unwrap();
    assert_eq!(second.generation, first.generation + 1);
    assert_ne!(
        second.verified.kem_public_key,
        first.verified.kem_public_key
    );
    assert_ne!(second.pid, first.pid);

    // The new enclave aggregates only on a model it certified: it refuses the
    // old round until the model is re-certified with the previous boot's key.
    let refused = client
        .call(Frame::new(
            Kind::BeginRound,
            &BeginRoundRequest {
                round_id: 1,
                model_version: 0,
                architecture: "mnist-2nn".into(),
                config: AggregationConfig::default(),
                update_encoding: Default::default(),
                devices: vec![],
                reference_training: None,
                expected_participants: None,
            },
            vec![model_bytes.clone()],
        ))
        .await
        .unwrap_err();
    assert!(matches!(refused, EnclaveError::Refused { .. }), "{refused}");
    let recertified = client
        .call_expecting(
            Frame::new(
                Kind::Certify,
                &CertifyRequest {
                    certificate: certificate.clone(),
                    previous_report: first.report.clone(),
                },
                vec![model_bytes.clone()],
            ),
            Kind::Model,
        )
        .await
        .unwrap()
        .meta::<ModelAnswer>()
        .unwrap()
        .certificate;
    model::verify(&recertified, &model_bytes, &second.verified.verifying_key).unwrap();

    // The retried round: every device re-seals to the new key; all 20 land.
    begin(&client, &fleet, &model_bytes).await;
    for i in 0..20 {
        let verdict = submit(&client, &fleet, i).await.unwrap();
        assert_ne!(verdict.status, "rejected", "device {i}: {verdict:?}");
    }
    // An envelope sealed to the dead enclave's key is refused, not a crash.
    let answer = client
        .call_expecting(
            Frame::new(Kind::Finalize, &serde_json::json!({}), Vec::new()),
            Kind::Outcome,
        )
        .await
        .unwrap();
    // What crosses to the host: per device a status and a code, per round
    // counts and the aggregate's norm; no device's norm, cosine, score,
    // weight or example count.
    let raw: serde_json::Value = answer.meta().unwrap();
    for verdict in raw["verdicts"].as_array().unwrap() {
        let mut keys: Vec<&str> = verdict
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["code", "device_id", "status"], "{verdict}");
    }
    for secret in [
        "norm",
        "cosine",
        "score",
        "weight",
        "example",
        "median",
        "similarity_mad",
    ] {
        let leaked: Vec<&String> = raw["stats"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|key| key.contains(secret) && key.as_str() != "aggregated_norm")
            .collect();
        assert!(leaked.is_empty(), "round statistics leak {leaked:?}");
    }
    let outcome: OutcomeAnswer = answer.meta().unwrap();
    assert!(outcome.aggregated, "{:?}", outcome.error);
    let accepted = outcome
        .verdicts
        .iter()
        .filter(|v| v.status == "accepted")
        .count();
    assert_eq!(accepted, 20, "{:?}", outcome.verdicts);
    let new_model = &answer.blobs[0];
    model::verify(
        outcome.certificate.as_ref().unwrap(),
        new_model,
        &second.verified.verifying_key,
    )
    .unwrap();
    assert_eq!(outcome.certificate.unwrap().model_version, 1);

    // Finished, round 1 cannot be begun again in this boot: a host keeping
    // the envelopes cannot re-run it with fewer devices to single one out.
    let again = client
        .call(Frame::new(
            Kind::BeginRound,
            &BeginRoundRequest {
                round_id: 1,
                model_version: 0,
                architecture: "mnist-2nn".into(),
                config: AggregationConfig::default(),
                update_encoding: Default::default(),
                devices: vec![],
                reference_training: None,
                expected_participants: None,
            },
            vec![model_bytes.clone()],
        ))
        .await
        .unwrap_err();
    match &again {
        EnclaveError::Refused { message, .. } => {
            assert!(message.contains("round 1 received updates"), "{message}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_int8_round_takes_int8_updates_and_refuses_exact_ones() {
    let client = start().await;
    let (model_bytes, _) = init_2nn(&client).await;
    let global = TensorMap::from_safetensors(&model_bytes, 1 << 26).unwrap();
    let fleet = fleet(&global);
    begin_encoded(&client, &fleet, &model_bytes, UpdateEncoding::Int8).await;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
    for index in 0..3 {
        let delta = TensorMap::from_safetensors(&fleet.updates[index], 1 << 26).unwrap();
        let int8 = update_encoding::encode(&delta, UpdateEncoding::Int8, &mut rng).unwrap();
        assert!(int8.len() < fleet.updates[index].len() / 3);
        let verdict = submit_bytes(&client, &fleet, index, &int8).await.unwrap();
        assert_ne!(verdict.status, "rejected", "{verdict:?}");
    }
    // The same kind of update, exact: not what this federation chose.
    let verdict = submit(&client, &fleet, 3).await.unwrap();
    assert_eq!(
        (verdict.status.as_str(), verdict.code.as_str()),
        ("rejected", "malformed_update")
    );
}
