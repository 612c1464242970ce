//! Killing the server mid-round loses nothing (issue 11 item 13): real
//! processes throughout — `qflare server` with its enclave child, three
//! `qflare-edge` device processes training on MNIST — and `kill -9` of the
//! server after two devices' updates were accepted. The restarted server,
//! on the same state directory, resumes the same round in a new enclave
//! boot; the two devices re-seal the updates they kept (without training
//! again), the third joins, and the round completes with all three. Then:
//! every enrollment is still there, `qflare audit verify` vouches for the
//! ledger, the exported model verifies under the enclave's certificate, and
//! no envelope of the closed round is left in the database. The same holds
//! when only the enclave process is killed and the server restarts it.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/processes.rs"]
mod processes;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use processes::{Process, QFLARE, admin, edge_binary, start_server, succeeded, trainings};

/// What is killed with SIGKILL once two devices' updates were accepted.
#[derive(Clone, Copy, PartialEq)]
enum Victim {
    /// The server process (its enclave child goes with it); then restarted.
    Server,
    /// Only the enclave process; the server restarts it itself.
    Enclave,
}

#[test]
fn a_server_killed_mid_round_resumes_the_same_round_and_the_devices_finish_it() {
    kill_mid_round(Victim::Server);
}

#[test]
fn an_enclave_killed_mid_round_is_restarted_and_the_same_round_completes() {
    kill_mid_round(Victim::Enclave);
}

/// The enclave process the server spawned: its one child.
fn enclave_pid(server: &Process) -> String {
    let pid = server.child.id();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut children = children.split_whitespace();
    let child = children.next().expect("the server has an enclave child");
    assert!(children.next().is_none(), "one child only");
    child.to_owned()
}

fn kill_mid_round(victim: Victim) {
    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let Some(edge) = edge_binary() else {
        eprintln!("skipped: build qflare-edge (cargo build --release -p qflare-edge)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path();
    let state = workdir.join("state");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let config = workdir.join("qflare.yaml");
    // Three devices, all needed: the round stays open after two submitted,
    // which is when the server dies. The enclave is `qflare enclave`.
    std::fs::write(
        &config,
        format!(
            "server:\n  listen: 127.0.0.1:{port}\n  metrics_listen: null\n  state_dir: {state}\n\
             rate_limits:\n  enroll: {{ per_minute: 600, burst: 100 }}\n\
             \x20 sessions: {{ per_minute: 6000, burst: 1000 }}\n\
             \x20 public: {{ per_minute: 6000, burst: 1000 }}\n\
             enclave:\n  command: {QFLARE}\n  args: [enclave]\n  allow_software_mode: true\n\
             federation:\n  enabled: true\n  architecture: mnist-2nn\n  auto_start: true\n\
             \x20 clients_per_round: 3\n  min_updates: 3\n  max_rounds: 1\n\
             \x20 round_timeout_secs: 600\n  poll_interval_secs: 1\n\
             \x20 training: {{ learning_rate: 0.05, batch_size: 20, epochs: 1 }}\n\
             aggregation:\n  defense: \"off\"\n",
            state = state.display()
        ),
    )
    .unwrap();
    let measurement =
        hex::encode(qflare_enclave::backend::measure_file(Path::new(QFLARE)).unwrap());

    let (mut server, fingerprint) = start_server(workdir, &config, "server-1.log");
    let identities: Vec<PathBuf> = (1..=3)
        .map(|i| workdir.join(format!("device-{i}")))
        .collect();
    for (i, identity) in identities.iter().enumerate() {
        let created = admin(workdir, &config, &["token", "create", "--label", "restart"]);
        let token = created.lines().last().unwrap().trim().to_owned();
        let enrolled = Command::new(&edge)
            .env_clear()
            .arg("--identity")
            .arg(identity)
            .args(["enroll", "--server", &url, "--token", &token])
            .args([
                "--server-key",
                &fingerprint,
                "--name",
                &format!("device-{i}"),
            ])
            .output()
            .unwrap();
        succeeded(enrolled, "qflare-edge enroll");
    }
    let device = |i: usize| {
        let mut command = Command::new(&edge);
        command
            .env_clear()
            .env("RUST_LOG", "info")
            .arg("--identity")
            .arg(&identities[i])
            .arg("run")
            .arg("--data")
            .arg(&data)
            .args(["--partition", &format!("{}/3", i + 1), "--examples", "300"])
            .args(["--enclave-measurement", &measurement])
            .args(["--allow-software-attestation", "--threads", "1"]);
        Process::spawn(command, workdir.join(format!("device-{}.log", i + 1)))
    };
    let submitted = |l: &str| l.starts_with("round 1: update ");

    // Two devices train and submit; the round waits for the third.
    let mut first = vec![device(0), device(1)];
    for d in &mut first {
        let line = d.wait_for_line(submitted, false);
        assert!(!line.contains("rejected"), "{line}");
    }

    let (mut server, server_log) = match victim {
        Victim::Server => {
            // kill -9: no shutdown, no drain; its enclave child loses its pipes.
            server.kill();
            let (server, again) = start_server(workdir, &config, "server-2.log");
            assert_eq!(again, fingerprint, "the same identity from the same state");
            (server, "server-2.log")
        }
        Victim::Enclave => {
            let enclave = enclave_pid(&server);
            let killed = Command::new("kill")
                .args(["-KILL", &enclave])
                .status()
                .unwrap();
            assert!(killed.success());
            (server, "server-1.log")
        }
    };
    let mut third = device(2);

    for d in first.iter_mut().chain(std::iter::once(&mut third)) {
        let status = d.wait();
        assert!(status.success(), "a device failed: {status}; {}", d.log());
    }
    for d in &first {
        let output = d.seen.join("\n");
        assert!(
            output.contains("round 1: re-sealing the trained update"),
            "the kept update was re-sealed: {output}"
        );
        assert_eq!(trainings(&output), 1, "trained once: {output}");
        assert_eq!(
            output.matches("round 1: update ").count(),
            2,
            "delivered to both boots: {output}"
        );
        assert!(!output.contains("update rejected"), "{output}");
    }
    let third_output = third.seen.join("\n");
    assert_eq!(
        third_output.matches("round 1: update ").count(),
        1,
        "{third_output}"
    );
    assert!(!third_output.contains("re-sealing"), "{third_output}");

    // The same round completed, with all three.
    let status: serde_json::Value = serde_json::from_str(&admin(
        workdir,
        &config,
        &["round", "status", "--output", "json"],
    ))
    .unwrap();
    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "no round was failed or added: {status}");
    assert_eq!(rounds[0]["id"], 1, "{status}");
    assert_eq!(rounds[0]["state"], "completed", "{status}");
    assert_eq!(rounds[0]["outcome"]["accepted"], 3, "{status}");
    assert_eq!(rounds[0]["outcome"]["model_version"], 1, "{status}");

    // No enrollment lost.
    let devices: serde_json::Value = serde_json::from_str(&admin(
        workdir,
        &config,
        &["device", "list", "--output", "json"],
    ))
    .unwrap();
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), 3, "{devices:?}");
    assert!(
        devices.iter().all(|d| d["status"] == "active"),
        "{devices:?}"
    );

    // The final model verifies under the certificate of the enclave that made it.
    let exported = workdir.join("final.safetensors");
    admin(
        workdir,
        &config,
        &["model", "export", "--out", exported.to_str().unwrap()],
    );
    let verified = admin(
        workdir,
        &config,
        &[
            "model",
            "verify",
            exported.to_str().unwrap(),
            "--measurement",
            &measurement,
        ],
    );
    assert!(verified.contains("version 1 (round 1)"), "{verified}");

    server.terminate();
    let server_log = std::fs::read_to_string(workdir.join(server_log)).unwrap();
    assert!(server_log.contains("round resumed"), "{server_log}");
    let audit = admin(workdir, &config, &["audit", "verify"]);
    assert!(audit.contains("intact"), "{audit}");

    // The round is closed: attempt 2 of round 1, and its envelopes are gone.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let database = format!("sqlite://{}", state.join("qflare.db").display());
        let store = qflare_store::SqliteStore::open(&database).await.unwrap();
        let store: &dyn qflare_store::Store = &store;
        let round = store.get_round(1).await.unwrap().unwrap();
        assert_eq!(round.attempt, 2, "{round:?}");
        let participants = store.participants(1).await.unwrap();
        assert_eq!(participants.len(), 3);
        assert!(
            participants
                .iter()
                .all(|p| p.submitted_at.is_some() && p.envelope.is_none()),
            "{participants:?}"
        );
    });
}
