//! Replicas survive the coordinator's death (issue 12 goal 4), with real
//! processes throughout: two `qflare server` replicas sharing one state
//! directory (one identity), one PostgreSQL schema and Redis; three
//! `qflare-edge` devices training on MNIST, spread over both replicas and
//! each told of the other (`--also-server`).
//!
//! Replica A takes the coordinator lease; B serves its devices by
//! forwarding what needs the enclave to A. Once two devices' updates were
//! accepted (one of them through B), A is killed with SIGKILL. B takes the
//! lease when A's lapses, starts its own enclave, and resumes the same
//! round; the device whose replica died fails over to B, the two re-seal
//! the updates they kept without training again, the third joins, and the
//! round completes with all three. Then: every enrollment is there, the
//! ledger verifies and records both elections, and B answers as the
//! coordinator. The test prints how long the takeover and the rest of the
//! round took (`-- --nocapture`).
//!
//! Needs `QFLARE_TEST_POSTGRES_URL`, `QFLARE_TEST_REDIS_URL` and the MNIST
//! data; skipped, saying so, without them.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/processes.rs"]
mod processes;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use processes::{
    PATIENCE, Process, QFLARE, admin, edge_binary, start_server, succeeded, trainings,
};

/// The lease the replicas hold, in seconds: short, so the test is quick.
const LEASE_SECS: u64 = 3;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `url` with every connection's `search_path` set to `schema`.
fn in_schema(url: &str, schema: &str) -> String {
    let joiner = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joiner}options[search_path]={schema}")
}

fn replica_config(dir: &Path, name: &str, port: u16, database: &str, redis: &str) -> PathBuf {
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!(
            "server:\n  listen: 127.0.0.1:{port}\n  metrics_listen: null\n  state_dir: {state}\n\
             \x20 database_url: \"{database}\"\n  redis_url: \"{redis}\"\n\
             rate_limits:\n  enroll: {{ per_minute: 600, burst: 100 }}\n\
             \x20 sessions: {{ per_minute: 6000, burst: 1000 }}\n\
             \x20 public: {{ per_minute: 6000, burst: 1000 }}\n\
             enclave:\n  command: {QFLARE}\n  args: [enclave]\n  allow_software_mode: true\n\
             federation:\n  enabled: true\n  lease_secs: {LEASE_SECS}\n  architecture: mnist-2nn\n\
             \x20 auto_start: true\n  clients_per_round: 3\n  min_updates: 3\n  max_rounds: 1\n\
             \x20 round_timeout_secs: 600\n  poll_interval_secs: 1\n\
             \x20 training: {{ learning_rate: 0.05, batch_size: 20, epochs: 1 }}\n\
             aggregation:\n  defense: \"off\"\n",
            state = dir.join("state").display()
        ),
    )
    .unwrap();
    config
}

/// `qflare round status` as JSON, through the replica `config` names.
fn status(dir: &Path, config: &Path) -> serde_json::Value {
    serde_json::from_str(&admin(
        dir,
        config,
        &["round", "status", "--output", "json"],
    ))
    .unwrap()
}

/// Waits until the replica at `port` holds the lease with `epoch`; returns
/// how long that took.
fn wait_for_coordinator(dir: &Path, config: &Path, port: u16, epoch: u64) -> Duration {
    let started = Instant::now();
    let address = format!("127.0.0.1:{port}");
    loop {
        let view = status(dir, config);
        if view["coordinator"]["address"] == address.as_str()
            && view["coordinator"]["epoch"] == epoch
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{address} never coordinated: {view}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_replica_takes_over_when_the_coordinator_is_killed_and_the_round_completes() {
    let (Ok(postgres), Ok(redis)) = (
        std::env::var("QFLARE_TEST_POSTGRES_URL"),
        std::env::var("QFLARE_TEST_REDIS_URL"),
    ) else {
        eprintln!("skipped: set QFLARE_TEST_POSTGRES_URL and QFLARE_TEST_REDIS_URL");
        return;
    };
    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let Some(edge) = edge_binary() else {
        eprintln!("skipped: build qflare-edge (cargo build --release -p qflare-edge)");
        return;
    };
    let schema = format!("qflare_replicas_{}", std::process::id());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        qflare_store::drop_postgres_schema(&postgres, &schema)
            .await
            .unwrap();
        qflare_store::open_postgres_in_schema(&postgres, &schema)
            .await
            .unwrap();
    });
    let database = in_schema(&postgres, &schema);

    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path();
    let (port_a, port_b) = (free_port(), free_port());
    let config_a = replica_config(workdir, "a", port_a, &database, &redis);
    let config_b = replica_config(workdir, "b", port_b, &database, &redis);
    let (url_a, url_b) = (
        format!("https://127.0.0.1:{port_a}"),
        format!("https://127.0.0.1:{port_b}"),
    );

    // A first: it creates the shared identity, then takes the lease.
    let (mut replica_a, fingerprint) = start_server(workdir, &config_a, "replica-a.log");
    wait_for_coordinator(workdir, &config_a, port_a, 1);
    let (mut replica_b, fingerprint_b) = start_server(workdir, &config_b, "replica-b.log");
    assert_eq!(fingerprint_b, fingerprint, "one identity, shared");
    assert_eq!(
        status(workdir, &config_b)["coordinator"]["address"],
        format!("127.0.0.1:{port_a}").as_str(),
        "B sees A coordinating"
    );

    // Device 1 enrolls at A, devices 2 and 3 at B; each knows the other.
    let homes = [(&url_a, &url_b), (&url_b, &url_a), (&url_b, &url_a)];
    let identities: Vec<PathBuf> = (1..=3)
        .map(|i| workdir.join(format!("device-{i}")))
        .collect();
    for (i, (identity, (home, other))) in identities.iter().zip(homes).enumerate() {
        let config = if home == &url_a { &config_a } else { &config_b };
        let created = admin(workdir, config, &["token", "create", "--label", "replicas"]);
        let token = created.lines().last().unwrap().trim().to_owned();
        let enrolled = Command::new(&edge)
            .env_clear()
            .arg("--identity")
            .arg(identity)
            .args(["enroll", "--server", home, "--token", &token])
            .args(["--server-key", &fingerprint, "--also-server", other])
            .args(["--name", &format!("device-{i}")])
            .output()
            .unwrap();
        succeeded(enrolled, "qflare-edge enroll");
    }
    let measurement =
        hex::encode(qflare_enclave::backend::measure_file(Path::new(QFLARE)).unwrap());
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

    // Device 1 submits to A directly, device 2 through B; the round waits
    // for the third.
    let mut first = vec![device(0), device(1)];
    for d in &mut first {
        let line = d.wait_for_line(submitted, false);
        assert!(!line.contains("rejected"), "{line}");
    }

    let view = status(workdir, &config_b);
    assert_eq!(
        (
            &view["coordinator"]["address"],
            &view["coordinator"]["epoch"]
        ),
        (
            &serde_json::json!(format!("127.0.0.1:{port_a}")),
            &serde_json::json!(1)
        ),
        "A has coordinated throughout: {view}"
    );

    // kill -9 the coordinator: its lease is left to lapse.
    let killed = Instant::now();
    replica_a.kill();
    let takeover = wait_for_coordinator(workdir, &config_b, port_b, 2);
    let mut third = device(2);

    for d in first.iter_mut().chain(std::iter::once(&mut third)) {
        let status = d.wait();
        assert!(status.success(), "a device failed: {status}; {}", d.log());
    }
    let completed = killed.elapsed();
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
            "delivered to both enclaves: {output}"
        );
        assert!(!output.contains("update rejected"), "{output}");
    }
    let device_1_log = std::fs::read_to_string(workdir.join("device-1.log")).unwrap();
    assert!(
        device_1_log.contains("failing over"),
        "device 1 lost A and moved to B: {device_1_log}"
    );

    // The same round completed, with all three, at B.
    let view = status(workdir, &config_b);
    let rounds = view["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "no round was failed or added: {view}");
    assert_eq!(rounds[0]["id"], 1, "{view}");
    assert_eq!(rounds[0]["state"], "completed", "{view}");
    assert_eq!(rounds[0]["outcome"]["accepted"], 3, "{view}");
    assert_eq!(rounds[0]["outcome"]["model_version"], 1, "{view}");

    // No enrollment lost.
    let devices: serde_json::Value = serde_json::from_str(&admin(
        workdir,
        &config_b,
        &["device", "list", "--output", "json"],
    ))
    .unwrap();
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), 3, "{devices:?}");
    assert!(
        devices.iter().all(|d| d["status"] == "active"),
        "{devices:?}"
    );

    replica_b.terminate();
    let audit = admin(workdir, &config_b, &["audit", "verify"]);
    assert!(audit.contains("intact"), "{audit}");
    runtime.block_on(async {
        let store = qflare_store::open(&database).await.unwrap();
        let entries = store.audit_entries(0, 10_000).await.unwrap();
        let elected: Vec<&str> = entries
            .iter()
            .filter(|e| e.kind == "coordinator_elected")
            .map(|e| e.detail_json.as_str())
            .collect();
        assert_eq!(elected.len(), 2, "A, then B: {elected:?}");
        assert!(
            elected[1].contains(&format!("127.0.0.1:{port_b}")),
            "{elected:?}"
        );
        let lease = store.coordinator_lease().await.unwrap().unwrap();
        assert_eq!(lease.epoch, 2);
        assert!(
            !lease.is_live(i64::try_from(qflare_edge::client::unix_now()).unwrap()),
            "B released the lease when it stopped: {lease:?}"
        );
        drop(store);
        qflare_store::drop_postgres_schema(&postgres, &schema)
            .await
            .unwrap();
    });
    eprintln!(
        "failover: lease {LEASE_SECS} s; replica B coordinated {:.1} s after A was killed; \
         the round completed {:.1} s after the kill",
        takeover.as_secs_f64(),
        completed.as_secs_f64()
    );
}

/// The coordinator's internal routes, in process on a single server (which
/// always coordinates): with the replicas' key they attest for the nonce
/// asked, certify the stored model and judge an envelope (refusing one that
/// is not); without the key, or with a wrong one, they answer 401 and do
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinators_internal_routes_answer_only_the_replicas() {
    use qflare_cli::sim::{DataSplit, SimOptions, Simulation};
    use qflare_protocol::api::ErrorCode;
    use qflare_protocol::crypto::sha256;
    use qflare_server::coordination::link::{self, ReplicaLink};

    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let sim = Simulation::start(SimOptions {
        devices: 1,
        rounds: 1,
        clients_per_round: 1,
        architecture: qflare_ml::Architecture::Mnist2nn,
        split: DataSplit::Iid,
        examples_per_device: Some(100),
        training: qflare_protocol::federation::TrainingPlan {
            learning_rate: 0.1,
            batch_size: 10,
            epochs: 1,
        },
        data_dir: data,
        eval_examples: 100,
        attack: None,
        aggregation: Default::default(),
        enclave_program: PathBuf::from(QFLARE),
        enclave_args: vec!["enclave".into()],
        state_dir: state.path().join("run"),
        round_timeout_secs: 120,
        compute_threads: 1,
        seed: 7,
        long_poll_secs: 25,
        update_encoding: Default::default(),
    })
    .await
    .unwrap();
    let address = sim.url.trim_start_matches("https://").to_owned();
    let replica = ReplicaLink::new(&sim.state.identity, Duration::from_secs(60)).unwrap();

    let nonce = [7u8; 32];
    let attested = replica.attest(&address, Some(nonce)).await.unwrap();
    assert_eq!(
        attested.report.unwrap().nonce,
        nonce,
        "a report for this nonce"
    );

    let certified = replica.model(&address).await.unwrap();
    let stored = sim
        .state
        .store
        .get_model(certified.version)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(certified.certificate.model_sha256, sha256(&stored.bytes));

    let device = sim.identity(0).unwrap().device_id.to_hex();
    let refused = replica
        .submit(&address, &device, b"not an envelope".to_vec())
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::MalformedRequest);

    // A client that trusts the server but holds no (or a wrong) key.
    let certificate = &sim.state.identity.certificate_chain[0];
    let outsider = qflare_edge::transport::Transport::pinned(
        &sim.url,
        sha256(certificate.as_ref()),
        Duration::from_secs(60),
    )
    .unwrap();
    for bearer in [None, Some("Bearer 00"), Some("Bearer ")] {
        let mut request = outsider
            .http
            .post(outsider.url(link::ATTEST))
            .body(r#"{"nonce":null}"#);
        if let Some(bearer) = bearer {
            request = request.header("authorization", bearer);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{bearer:?}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized", "{bearer:?}");
    }
}
