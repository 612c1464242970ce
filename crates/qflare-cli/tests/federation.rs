//! End-to-end federated training: the real server over real HTTPS, the real
//! enclave process (`qflare enclave`, sandboxed and attested), and real
//! devices training the MNIST 2NN on their own slices of MNIST.
//!
//! Over 600 lines because every scenario here shares one expensive fixture
//! (`options`, `simulate`) and the refusal helpers below; split by topic,
//! each file would repeat them.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use qflare_cli::sim::{Attack, DataSplit, SimOptions, SimReport, Simulation};
use qflare_enclave::AggregationConfig;
use qflare_ml::Architecture;
use qflare_protocol::federation::TrainingPlan;
use qflare_protocol::update_encoding::UpdateEncoding;

fn options(
    data_dir: PathBuf,
    state: &tempfile::TempDir,
    devices: usize,
    rounds: u64,
) -> SimOptions {
    SimOptions {
        devices,
        rounds,
        clients_per_round: devices,
        architecture: Architecture::Mnist2nn,
        split: DataSplit::Iid,
        examples_per_device: Some(500),
        training: TrainingPlan {
            learning_rate: 0.1,
            batch_size: 10,
            epochs: 1,
        },
        data_dir,
        eval_examples: 10_000,
        attack: None,
        aggregation: AggregationConfig::default(),
        enclave_program: PathBuf::from(env!("CARGO_BIN_EXE_qflare")),
        enclave_args: vec!["enclave".into()],
        state_dir: state.path().join("run"),
        round_timeout_secs: 120,
        compute_threads: 2,
        seed: 7,
        long_poll_secs: 25,
        update_encoding: Default::default(),
    }
}

async fn simulate(options: SimOptions) -> SimReport {
    let mut sim = Simulation::start(options).await.unwrap();
    let report = sim.run(&[], |_| {}).await.unwrap();
    sim.stop().await.unwrap();
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_federation_trains_the_2nn_over_real_https_with_the_enclave() {
    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut sim = Simulation::start(options(data, &state, 4, 3))
        .await
        .unwrap();
    let report = sim.run(&[], |_| {}).await.unwrap();
    // The permanent ledger holds what the host may learn: per device a
    // code, per round counts and the aggregate's norm, nothing measured on
    // one device's update.
    let ledger = sim.state.store.audit_entries(0, 10_000).await.unwrap();
    let mut verdicts = 0;
    let mut attestations = 0;
    for entry in &ledger {
        let detail: serde_json::Value = serde_json::from_str(&entry.detail_json).unwrap();
        match entry.kind.as_str() {
            "update_accepted" | "update_rejected" => {
                verdicts += 1;
                let mut keys: Vec<&String> = detail.as_object().unwrap().keys().collect();
                keys.sort_unstable();
                assert_eq!(keys, ["code", "round_id"], "{}", entry.detail_json);
            }
            "round_aggregated" => {
                // The attested enclave that made the model is named.
                assert_eq!(detail["enclave_mode"], "software", "{detail}");
                assert_eq!(
                    detail["enclave_measurement"].as_str().map(str::len),
                    Some(96)
                );
                assert!(detail["enclave_evidence_sha384"].is_null(), "{detail}");
                let stats = detail["stats"].as_object().unwrap();
                for key in stats.keys() {
                    assert!(
                        ![
                            "median", "cosine", "score", "weight", "example", "bound", "mad"
                        ]
                        .iter()
                        .any(|secret| key.contains(secret)),
                        "round statistics leak {key}"
                    );
                }
            }
            "enclave_attested" => {
                // The sandbox state recorded is the one the enclave signed.
                attestations += 1;
                assert_eq!(detail["runtime"]["seccomp"], "enforce", "{detail}");
                assert_eq!(detail["runtime"]["not_dumpable"], true, "{detail}");
            }
            _ => {}
        }
    }
    assert!(attestations >= 1, "the enclave's attestation is audited");
    assert_eq!(
        verdicts, 12,
        "every verdict of three rounds is in the ledger"
    );
    sim.stop().await.unwrap();
    assert_eq!(report.rounds.len(), 3, "{report:?}");
    for row in &report.rounds {
        assert_eq!(row.state, "completed");
        assert_eq!(row.accepted, 4, "{row:?}");
        assert!(
            row.bytes_sent > 4 * 199_210 * 4,
            "sealed updates carry the whole delta"
        );
    }
    let initial = report.initial_accuracy.unwrap();
    let last = report.final_accuracy.unwrap();
    assert!(
        initial < 0.2,
        "an untrained model is near chance: {initial}"
    );
    // Runs land around 0.8, a little either side (threaded float sums make
    // training vary); a broken aggregation or sealing path stays near chance.
    assert!(
        last > 0.70,
        "three rounds on 2,000 examples pass 70%: {last}"
    );
    assert!(report.device_seconds.cryptography() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_updates_train_the_2nn_and_are_smaller_on_the_wire() {
    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let exact_bytes = 4 * 199_210 * 4;
    for (encoding, most_bytes) in [
        (UpdateEncoding::F16, exact_bytes / 2 + 4 * 20_000),
        (UpdateEncoding::Int8, exact_bytes / 4 + 4 * 20_000),
    ] {
        let state = tempfile::tempdir().unwrap();
        let report = simulate(SimOptions {
            update_encoding: encoding,
            ..options(data.clone(), &state, 4, 2)
        })
        .await;
        assert_eq!(report.rounds.len(), 2, "{encoding}: {report:?}");
        for row in &report.rounds {
            assert_eq!(row.accepted, 4, "{encoding}: {row:?}");
            // Sealed bytes: the encoded delta plus signatures and the KEM
            // ciphertext, well under the exact encoding's size.
            assert!(
                row.bytes_sent < most_bytes as u64,
                "{encoding}: {} bytes sealed",
                row.bytes_sent
            );
        }
        let last = report.final_accuracy.unwrap();
        assert!(last > 0.6, "{encoding}: two rounds still learn: {last}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_malicious_devices_of_ten_leave_accuracy_within_two_points() {
    use qflare_enclave::config::{AggregatorKind, DefenseConfig};

    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    // Compared near a plateau (3 rounds of 10,000 examples), not on the steep
    // first rounds where run-to-run noise alone exceeds two points.
    let plateau = |state: &tempfile::TempDir, aggregation: &AggregationConfig| {
        let mut o = options(data.clone(), state, 10, 3);
        o.examples_per_device = Some(1000);
        o.aggregation = aggregation.clone();
        o
    };
    let reject_rules = AggregationConfig {
        aggregator: AggregatorKind::FedAvg,
        defense: DefenseConfig::reject_outliers(),
        ..AggregationConfig::default()
    };
    for aggregation in [AggregationConfig::default(), reject_rules] {
        let clean_state = tempfile::tempdir().unwrap();
        let clean = simulate(plateau(&clean_state, &aggregation)).await;
        let rejects = aggregation.aggregator == AggregatorKind::FedAvg;
        for attack in [
            Attack::SignFlip,
            Attack::Scale(10.0),
            Attack::GaussianNoise(0.1),
        ] {
            let state = tempfile::tempdir().unwrap();
            let mut attacked = plateau(&state, &aggregation);
            attacked.attack = Some((2, attack));
            let report = simulate(attacked).await;
            for row in &report.rounds {
                // The reject rules drop both attackers. The default keeps
                // every update and bounds what each does, rejecting only the
                // blatant: noise of σ = 0.1 (hundreds of times an honest
                // norm), and ×10 scaling when it lands above 10× the median.
                match (rejects, attack) {
                    (true, _) | (false, Attack::GaussianNoise(_)) => {
                        assert_eq!(row.rejected, 2, "{attack}: {row:?}")
                    }
                    (false, Attack::SignFlip) => {
                        assert_eq!(row.rejected, 0, "{attack}: {row:?}")
                    }
                    (false, _) => assert!(row.rejected <= 2, "{attack}: {row:?}"),
                }
                assert_eq!(row.accepted + row.rejected, 10, "{row:?}");
            }
            let (clean_accuracy, attacked_accuracy) = (
                clean.final_accuracy.unwrap(),
                report.final_accuracy.unwrap(),
            );
            assert!(
                (clean_accuracy - attacked_accuracy).abs() <= 0.02,
                "{attack} ({:?}): accuracy {attacked_accuracy} within 2 points of the clean {clean_accuracy}",
                aggregation.aggregator
            );
        }
    }
}

/// Central DP end to end: the controller samples every device with q = 1
/// (all four of four), the enclave clips and adds noise, each round's ledger
/// entry carries the cumulative ε the accountant gives, and training stops
/// when the next round would pass the budget (here: after two rounds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_privacy_budget_stops_training_and_the_ledger_records_epsilon() {
    use qflare_enclave::config::{AggregatorKind, DefenseConfig};
    use qflare_enclave::privacy::PrivacyConfig;
    use qflare_enclave::privacy::accountant::RdpAccountant;

    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let epsilon = |rounds| {
        RdpAccountant::new()
            .epsilon_after(1.0, 1.0, rounds, 1e-5)
            .unwrap()
    };
    let budget = (epsilon(2) + epsilon(3)) / 2.0;
    let state = tempfile::tempdir().unwrap();
    let mut o = options(data, &state, 4, 10);
    o.aggregation = AggregationConfig {
        aggregator: AggregatorKind::FedAvg,
        defense: DefenseConfig::off(),
        privacy: Some(PrivacyConfig {
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            delta: 1e-5,
            epsilon_budget: Some(budget),
        }),
        ..AggregationConfig::default()
    };
    let mut sim = Simulation::start(o).await.unwrap();
    let report = sim.run(&[], |_| {}).await.unwrap();
    assert_eq!(
        report.rounds.len(),
        2,
        "two rounds fit the budget: {report:?}"
    );
    assert!(sim.status().borrow().finished);
    let ledger = sim.state.store.audit_entries(0, 10_000).await.unwrap();
    let spent: Vec<f64> = ledger
        .iter()
        .filter(|e| e.kind == "round_aggregated")
        .map(|e| {
            let detail: serde_json::Value = serde_json::from_str(&e.detail_json).unwrap();
            assert_eq!(detail["stats"]["privacy"]["expected_participants"], 4.0);
            detail["privacy"]["epsilon"].as_f64().unwrap()
        })
        .collect();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b;
    assert_eq!(spent.len(), 2);
    assert!(
        close(spent[0], epsilon(1)) && close(spent[1], epsilon(2)),
        "{spent:?}"
    );
    let reached: Vec<serde_json::Value> = ledger
        .iter()
        .filter(|e| e.kind == "privacy_budget_reached")
        .map(|e| serde_json::from_str(&e.detail_json).unwrap())
        .collect();
    assert_eq!(reached.len(), 1, "said once");
    let next = reached[0]["next_round_epsilon"].as_f64().unwrap();
    assert!(close(next, epsilon(3)), "{next}");
    sim.stop().await.unwrap();
}

// ------------------------------------------------------------ refusals

use qflare_edge::run::{verify_model_download, verify_round_report};
use qflare_edge::{EdgeError, Identity, Session};
use qflare_protocol::attestation::VerifiedEnclave;
use qflare_protocol::envelope::{self, UpdateMetadata};
use qflare_protocol::federation::{ModelQuery, RoundInfo, RoundQuery, SubmitReceipt};
use qflare_protocol::tensor::TensorMap;
use qflare_store::RoundState;

async fn session(identity: &Identity) -> Session {
    let transport = qflare_edge::transport_for(identity).unwrap();
    qflare_edge::open_session(identity, &transport)
        .await
        .unwrap()
}

/// Asks for the round with a fresh nonce and verifies the enclave's report.
async fn round(sim: &Simulation, session: &mut Session) -> (RoundInfo, VerifiedEnclave) {
    let mut nonce = [0u8; 32];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
    let info: RoundInfo = session
        .call(
            "/v1/rounds/current",
            &RoundQuery {
                nonce: Some(nonce),
                wait_while: None,
            },
            1 << 20,
        )
        .await
        .unwrap();
    let verified = verify_round_report(
        info.report.as_ref().unwrap(),
        &sim.device_policy().unwrap(),
        &nonce,
        qflare_cli::sim::now(),
    )
    .unwrap();
    (info, verified)
}

/// Seals an all-zero update (valid in every respect but content) and submits it.
async fn submit_zero(
    identity: &Identity,
    session: &mut Session,
    enclave: &VerifiedEnclave,
    round_id: u64,
    model_version: u64,
) -> Result<SubmitReceipt, EdgeError> {
    let layout = qflare_ml::initial_model(Architecture::Mnist2nn, 0).unwrap();
    let zero = layout
        .with_flat(&vec![0.0; layout.num_parameters()])
        .unwrap();
    let sealed = envelope::seal(
        &UpdateMetadata {
            round_id,
            device_id: identity.device_id,
            model_version,
            example_count: 10,
        },
        &zero.to_safetensors(),
        &identity.keys.signing,
        &enclave.kem_public_key,
        &mut rand::rng(),
    )
    .unwrap();
    session.call("/v1/updates", &sealed, 4096).await
}

async fn wait_for(
    sim: &Simulation,
    what: impl Fn(&qflare_server::federation::FederationStatus) -> bool,
) {
    let mut status = sim.status();
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        status.wait_for(|s| what(s)),
    )
    .await
    .expect("the federation reached the expected state in time")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unselected_late_and_revoked_devices_cannot_submit() {
    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut o = options(data, &state, 3, 5);
    o.clients_per_round = 2;
    o.round_timeout_secs = 3;
    let sim = Simulation::start(o).await.unwrap();
    let federation = sim.state.federation.clone().unwrap();
    federation.start_training().await.unwrap();
    wait_for(&sim, |s| s.round_state == Some(RoundState::Open)).await;
    let round_id = sim.status().borrow().round_id;
    let participants = sim.state.store.participants(round_id).await.unwrap();
    let ids: Vec<String> = (0..3)
        .map(|i| sim.identity(i).unwrap().device_id.to_hex())
        .collect();
    let outsider = ids
        .iter()
        .position(|id| !participants.iter().any(|p| &p.device_id == id))
        .unwrap();
    let insiders: Vec<usize> = (0..3).filter(|i| *i != outsider).collect();

    // Not selected: the answer carries no report (the enclave is not asked
    // for one when there is no work), and an update sealed to the enclave
    // anyway is refused before its body is read, nothing stored.
    let identity = sim.identity(outsider).unwrap();
    let mut s = session(&identity).await;
    let info: RoundInfo = s
        .call(
            "/v1/rounds/current",
            &RoundQuery {
                nonce: Some([7; 32]),
                wait_while: None,
            },
            1 << 20,
        )
        .await
        .unwrap();
    assert_eq!(
        info.status,
        qflare_protocol::federation::RoundStatus::NotSelected
    );
    assert!(info.report.is_none());
    let mut insider_session = session(&sim.identity(insiders[0]).unwrap()).await;
    let (_, enclave) = round(&sim, &mut insider_session).await;
    let err = submit_zero(&identity, &mut s, &enclave, round_id, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("not_selected"), "{err}");

    // Revoked mid-round: its open session dies and it cannot open another.
    let revoked = sim.identity(insiders[0]).unwrap();
    let mut revoked_session = session(&revoked).await;
    let (_, enclave) = round(&sim, &mut revoked_session).await;
    assert!(
        sim.state
            .store
            .revoke_device(&revoked.device_id.to_hex(), sim.state.now_i64())
            .await
            .unwrap()
    );
    let err = submit_zero(&revoked, &mut revoked_session, &enclave, round_id, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Some("authentication_failed" | "device_revoked")),
        "{err}"
    );
    let transport = qflare_edge::transport_for(&revoked).unwrap();
    let err = qflare_edge::open_session(&revoked, &transport)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("device_revoked"));

    // Late: the last device waits out the deadline; the round fails (only
    // one of two could submit) and its update is refused.
    let late = sim.identity(insiders[1]).unwrap();
    let mut late_session = session(&late).await;
    let (_, enclave) = round(&sim, &mut late_session).await;
    wait_for(&sim, |s| s.round_id > round_id).await;
    let err = submit_zero(&late, &mut late_session, &enclave, round_id, 0)
        .await
        .unwrap_err();
    // Refused before its body is read: the next round may be open already,
    // and then the answer is whether the device is awaited in that one.
    assert!(
        matches!(
            err.code(),
            Some("deadline_passed" | "round_closed" | "not_selected")
        ),
        "{err}"
    );
    let round = sim.state.store.get_round(round_id).await.unwrap().unwrap();
    assert_eq!(
        round.state,
        RoundState::Failed,
        "the minimum was not met by the deadline"
    );
    let stored = sim.state.store.participants(round_id).await.unwrap();
    assert!(
        stored.iter().all(|p| p.envelope.is_none()),
        "no refused update was stored"
    );
    sim.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_side_bit_flip_in_the_global_model_is_refused_by_the_device() {
    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let sim = Simulation::start(options(data, &state, 2, 1))
        .await
        .unwrap();
    sim.state
        .federation
        .clone()
        .unwrap()
        .start_training()
        .await
        .unwrap();
    wait_for(&sim, |s| s.round_state == Some(RoundState::Open)).await;
    let identity = sim.identity(0).unwrap();
    let mut s = session(&identity).await;
    let (info, enclave) = round(&sim, &mut s).await;
    let download = s
        .call_raw(
            "/v1/models/current",
            serde_json::to_vec(&ModelQuery {}).unwrap(),
            64 << 20,
        )
        .await
        .unwrap();
    let version = info.model_version.unwrap();

    // As served, the model verifies against the attested enclave key.
    let (certificate, model) =
        verify_model_download(&download, &enclave, version, "mnist-2nn").unwrap();
    assert_eq!(certificate.model_version, version);
    assert_eq!(model.num_parameters(), 199_210);

    // One flipped bit anywhere in the weights, as a compromised host would serve it.
    for offset in [200usize, download.len() / 2, download.len() - 1] {
        let mut tampered = download.clone();
        tampered[offset] ^= 0x01;
        let err = verify_model_download(&tampered, &enclave, version, "mnist-2nn").unwrap_err();
        assert!(
            matches!(err, EdgeError::ModelRefused(_)),
            "offset {offset}: {err}"
        );
    }
    let _: TensorMap = model;
    sim.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_server_resumes_at_the_right_round_with_the_right_model() {
    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut sim = Simulation::start(options(data.clone(), &state, 3, 2))
        .await
        .unwrap();
    sim.run(&[], |_| {}).await.unwrap();
    let before = sim.state.store.get_model(2).await.unwrap().unwrap();
    sim.kill().await;

    // A new server process on the same state directory and database.
    let mut sim = Simulation::start(options(data, &state, 3, 3))
        .await
        .unwrap();
    let report = sim.run(&[], |_| {}).await.unwrap();
    let rounds = sim.state.store.list_rounds(10).await.unwrap();
    let newest = &rounds[0];
    assert_eq!(newest.id, 3, "numbering continues");
    assert_eq!(
        newest.base_model_version, 2,
        "from the model the killed server had made"
    );
    assert_eq!(newest.state, RoundState::Completed);
    let resumed = sim.state.store.get_model(2).await.unwrap().unwrap();
    assert_eq!(resumed.bytes, before.bytes, "model 2 is unchanged");
    assert_eq!(report.rounds.len(), 1);
    assert!(sim.state.store.get_model(3).await.unwrap().is_some());
    sim.stop().await.unwrap();
}

/// A long poll: held while nothing changes, answered at once when the
/// device's last answer is already stale, and woken when a round opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_poll_answers_when_the_round_changes() {
    use qflare_protocol::federation::{RoundPosition, RoundStatus};
    use std::time::{Duration, Instant};

    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let sim = Simulation::start(options(data, &state, 2, 1))
        .await
        .unwrap();
    let mut s = session(&sim.identity(0).unwrap()).await;
    let waiting = |max_wait_secs| RoundQuery {
        nonce: None,
        wait_while: Some(RoundPosition {
            status: RoundStatus::Waiting,
            round_id: None,
            max_wait_secs,
        }),
    };

    // Nothing changes: held for the time asked, then the same answer.
    let asked = Instant::now();
    let info: RoundInfo = s
        .call("/v1/rounds/current", &waiting(1), 1 << 20)
        .await
        .unwrap();
    assert_eq!(info.status, RoundStatus::Waiting);
    assert!(
        asked.elapsed() >= Duration::from_millis(950),
        "{:?}",
        asked.elapsed()
    );

    // Waiting on a position the device is no longer in: answered at once.
    let stale = RoundQuery {
        nonce: None,
        wait_while: Some(RoundPosition {
            status: RoundStatus::Submitted,
            round_id: Some(41),
            max_wait_secs: 30,
        }),
    };
    let asked = Instant::now();
    let info: RoundInfo = s.call("/v1/rounds/current", &stale, 1 << 20).await.unwrap();
    assert_eq!(info.status, RoundStatus::Waiting);
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );

    // Held while no round is open; training starts; the held poll answers
    // with the new round long before its 25 s hold is over.
    let held = tokio::spawn(async move {
        let asked = Instant::now();
        let info: RoundInfo = s
            .call("/v1/rounds/current", &waiting(30), 1 << 20)
            .await
            .unwrap();
        (info, asked.elapsed())
    });
    let gauge = sim.state.metrics.long_polls_held.clone();
    tokio::time::timeout(Duration::from_secs(30), async {
        while gauge.get() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the poll is held");
    sim.state
        .federation
        .clone()
        .unwrap()
        .start_training()
        .await
        .unwrap();
    let (info, elapsed) = held.await.unwrap();
    assert_eq!(info.status, RoundStatus::Train, "{info:?}");
    assert!(info.round_id.is_some());
    assert!(
        elapsed < Duration::from_secs(20),
        "woken, not timed out: {elapsed:?}"
    );
    assert_eq!(gauge.get(), 0);
}
