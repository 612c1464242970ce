//! End-to-end test of the real `qflare` binary: `qflare server` runs as a
//! child process with its own state directory, the admin commands talk to it
//! over HTTPS as an operator would, a device enrolls through the edge
//! library, SIGTERM stops the server gracefully, and `qflare audit verify`
//! first vouches for the ledger and then names the entry edited behind its
//! back.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qflare_edge::EnrollOptions;
use qflare_edge::transport::Transport;
use qflare_protocol::identity::{EnrollmentToken, ServerFingerprint};

const QFLARE: &str = env!("CARGO_BIN_EXE_qflare");

/// How long the server may take to start or to stop; generous, because the
/// machine running the tests may be busy.
const PATIENCE: Duration = Duration::from_secs(60);

/// A `qflare` invocation isolated from the caller's environment: no
/// `QFLARE_*` variables, and a working directory without `.env` or
/// `config/global_config.yaml`.
fn qflare(workdir: &Path, config: &Path) -> Command {
    let mut command = Command::new(QFLARE);
    command
        .env_clear()
        .env("RUST_LOG", "warn")
        .current_dir(workdir)
        .arg("--config")
        .arg(config);
    command
}

/// Runs an admin command to completion.
fn run(workdir: &Path, config: &Path, args: &[&str]) -> Output {
    qflare(workdir, config).args(args).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts success and returns stdout.
fn succeeded(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(output)
}

/// A port that was free a moment ago (the server binds it itself, from its config).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server child process; killed if a test fails before stopping it.
struct ServerProcess {
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (what systemd and `docker stop` send) and waits for the exit.
    fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop within {PATIENCE:?} of SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `qflare server` and returns it with the fingerprint it printed.
fn start_server(workdir: &Path, config: &Path) -> (ServerProcess, String) {
    start_server_with_env(workdir, config, &[])
}

/// [`start_server`] with extra environment variables.
fn start_server_with_env(
    workdir: &Path,
    config: &Path,
    env: &[(&str, &str)],
) -> (ServerProcess, String) {
    let log = workdir.join("server.log");
    let mut child = qflare(workdir, config)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .arg("server")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = ServerProcess { child, log };
    // The server prints its fingerprint on the line after this header; the
    // listener is bound before anything is printed.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut header_seen = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if header_seen {
                let _ = tx.send(line.trim().to_owned());
                header_seen = false;
            } else {
                header_seen = line.starts_with("server fingerprint");
            }
        }
    });
    let fingerprint = match rx.recv_timeout(PATIENCE) {
        Ok(line) => line,
        Err(_) => panic!(
            "the server printed no fingerprint within {PATIENCE:?}; log:\n{}",
            server.log()
        ),
    };
    (server, fingerprint)
}

/// Polls `/healthz` through the pinned client until it answers 200.
async fn wait_healthy(transport: &Transport, server: &ServerProcess) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(response) = transport.http.get(transport.url("/healthz")).send().await
            && response.status() == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz did not answer within {PATIENCE:?}; log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The data rows of a table printed by `token list` or `device list`.
fn row<'a>(table: &'a str, id: &str) -> &'a str {
    table
        .lines()
        .find(|line| line.starts_with(id))
        .unwrap_or_else(|| panic!("{id} not listed in:\n{table}"))
}

#[test]
fn server_admin_enrollment_shutdown_and_audit() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path();
    let state = workdir.join("state");
    let port = free_port();
    let config = workdir.join("qflare.yaml");
    // No enclave: this test covers administration, enrollment, sessions,
    // shutdown and the ledger, none of which involves the round controller.
    std::fs::write(
        &config,
        format!(
            "server:\n  listen: 127.0.0.1:{port}\n  metrics_listen: null\n  state_dir: {}\n\
             federation:\n  enabled: false\n",
            state.display()
        ),
    )
    .unwrap();
    let url = format!("https://127.0.0.1:{port}");

    // Start-up: the printed fingerprint must verify the server it came from.
    let (server, fingerprint) = start_server(workdir, &config);
    let fingerprint = ServerFingerprint::parse(&fingerprint)
        .unwrap_or_else(|e| panic!("not a fingerprint: {fingerprint:?}: {e}"));
    let verified = runtime
        .block_on(Transport::discover(&url, &fingerprint))
        .unwrap();
    let pinned = Transport::pinned(&url, verified.certificate_sha256, PATIENCE).unwrap();
    runtime.block_on(wait_healthy(&pinned, &server));
    drop(pinned);

    // Tokens: created with the token alone on the last line, then listed.
    let created = succeeded(
        &run(workdir, &config, &["token", "create", "--label", "x"]),
        "token create",
    );
    let lines: Vec<&str> = created.lines().collect();
    let token = *lines.last().unwrap();
    assert_eq!(token.len(), 43, "a 256-bit token in base64url: {token:?}");
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "base64url without padding: {token:?}"
    );
    assert_eq!(
        created.matches(token).count(),
        1,
        "the token is printed exactly once"
    );
    let token_id = lines[0]
        .strip_prefix("token ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token id in {:?}", lines[0]))
        .to_owned();
    let listed = succeeded(&run(workdir, &config, &["token", "list"]), "token list");
    let token_row = row(&listed, &token_id);
    assert!(token_row.contains("active"), "{token_row}");
    assert!(token_row.ends_with(" x"), "{token_row}");
    assert!(!listed.contains(token), "token list never shows a token");
    // Scripts ask for JSON: the server's view, pretty-printed, alone on stdout.
    let json = succeeded(
        &run(workdir, &config, &["token", "list", "--output", "json"]),
        "token list --output json",
    );
    let tokens: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("not JSON ({e}):\n{json}"));
    assert_eq!(tokens[0]["id"], token_id.as_str(), "{json}");
    assert_eq!(tokens[0]["status"], "active", "{json}");
    assert!(json.contains("\n  "), "pretty-printed: {json}");

    // A device enrolls with that token and the printed fingerprint, and
    // opens a working session.
    let identity = runtime
        .block_on(qflare_edge::enroll(
            EnrollOptions {
                server_url: url.clone(),
                token: EnrollmentToken::parse(token).unwrap(),
                fingerprint,
                device_name: "cli-test-device".into(),
                kem_suite: None,
                signature_suite: None,
                alternate_urls: Vec::new(),
            },
            &workdir.join("device"),
        ))
        .unwrap();
    let device_id = identity.device_id.to_hex();
    let transport = qflare_edge::transport_for(&identity).unwrap();
    runtime.block_on(async {
        let mut session = qflare_edge::open_session(&identity, &transport)
            .await
            .unwrap();
        let pong = session.ping().await.unwrap();
        assert_eq!(pong["device_id"], device_id.as_str());
    });
    let listed = succeeded(&run(workdir, &config, &["token", "list"]), "token list");
    let token_row = row(&listed, &token_id);
    assert!(token_row.contains("used"), "{token_row}");
    assert!(token_row.contains(&device_id), "{token_row}");

    // Devices: listed, revoked, and then refused a session.
    let devices = succeeded(&run(workdir, &config, &["device", "list"]), "device list");
    let device_row = row(&devices, &device_id);
    let json = succeeded(
        &run(workdir, &config, &["device", "list", "--output", "json"]),
        "device list --output json",
    );
    let listed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(listed[0]["id"], device_id.as_str(), "{json}");
    assert_eq!(listed[0]["name"], "cli-test-device", "{json}");
    assert!(device_row.contains("active"), "{device_row}");
    assert!(device_row.ends_with("cli-test-device"), "{device_row}");
    let revoked = succeeded(
        &run(workdir, &config, &["device", "revoke", &device_id]),
        "device revoke",
    );
    assert_eq!(revoked.trim(), "revoked");
    let again = succeeded(
        &run(workdir, &config, &["device", "revoke", &device_id]),
        "device revoke (again)",
    );
    assert!(again.starts_with("not revoked"), "{again}");
    let devices = succeeded(&run(workdir, &config, &["device", "list"]), "device list");
    assert!(row(&devices, &device_id).contains("revoked"), "{devices}");
    let refused = runtime
        .block_on(qflare_edge::open_session(&identity, &transport))
        .unwrap_err();
    assert!(
        matches!(&refused, qflare_edge::EdgeError::Server { status: 403, code, .. } if code == "device_revoked"),
        "{refused:?}"
    );
    drop(transport);

    // SIGTERM: a graceful shutdown exits 0.
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "exit status {status}");

    // The ledger verifies offline, from the state directory alone.
    let verify = run(workdir, &config, &["audit", "verify"]);
    let report = succeeded(&verify, "audit verify");
    assert!(report.contains("intact"), "{report}");

    // Someone with write access to the database rewrites who did something.
    let database = format!("sqlite://{}", state.join("qflare.db").display());
    let edited = runtime.block_on(async {
        let store = qflare_store::SqliteStore::open(&database).await.unwrap();
        store
            .execute_raw("UPDATE audit_log SET actor='mallory' WHERE seq=2")
            .await
            .unwrap()
    });
    assert_eq!(edited, 1, "entry 2 exists");
    let verify = run(workdir, &config, &["audit", "verify"]);
    let report = stdout(&verify);
    assert_eq!(
        verify.status.code(),
        Some(3),
        "a broken ledger exits 3 (2 is clap's usage error): {report}"
    );
    assert!(report.contains("BROKEN at entry 2"), "{report}");
}

/// `qflare` takes `QFLARE_ADMIN_TOKEN` out of its environment at start-up
/// (so nothing it starts inherits it); the server and the admin commands
/// still use the token they took.
#[test]
fn an_admin_token_from_the_environment_opens_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path();
    let state = workdir.join("state");
    let port = free_port();
    let config = workdir.join("qflare.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  listen: 127.0.0.1:{port}\n  metrics_listen: null\n  state_dir: {}\n\
             federation:\n  enabled: false\n",
            state.display()
        ),
    )
    .unwrap();
    let token = "an-admin-token-of-forty-characters-00001";
    let (server, _) = start_server_with_env(workdir, &config, &[("QFLARE_ADMIN_TOKEN", token)]);
    assert!(
        !state.join("admin-token").exists(),
        "no token file when the environment gives one"
    );
    let listed = qflare(workdir, &config)
        .env("QFLARE_ADMIN_TOKEN", token)
        .args(["token", "list"])
        .output()
        .unwrap();
    succeeded(&listed, "token list with the environment's token");
    let wrong = qflare(workdir, &config)
        .env(
            "QFLARE_ADMIN_TOKEN",
            "another-admin-token-of-forty-characters0",
        )
        .args(["token", "list"])
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "{}", stdout(&wrong));
    assert!(server.terminate().success());
}
