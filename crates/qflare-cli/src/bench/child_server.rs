//! The server as a child process, for the benches whose measure is the
//! server's own process (`uploads`, `flood`): its configuration, its start,
//! its memory as `/proc` reports it, and what setting up a federation on it
//! takes (an enrollment token from the admin API, one enrolled device, the
//! wait until that device is selected for a round).
//!
//! The server is started from `--server-bin` (default: this executable) with
//! a minimal configuration that any version of the server reads, so that an
//! older build can be measured the same way.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use qflare_edge::transport::Transport;
use qflare_edge::{EnrollOptions, Identity, Session};
use qflare_protocol::api::routes;
use qflare_protocol::federation::{RoundInfo, RoundQuery, RoundStatus};
use qflare_protocol::identity::{EnrollmentToken, ServerFingerprint};
use qflare_server::api::CreatedToken;
use qflare_server::ratelimit::RateLimit;
use serde::Serialize;

/// How long the server and the round may take to come up.
pub(super) const PATIENCE: Duration = Duration::from_secs(120);

/// The admin token the child server is started with.
pub(super) const ADMIN_TOKEN: &str = "bench-uploads-admin-token-0123456789abcdef";

/// The server child process, killed when dropped.
pub(super) struct ServerProcess {
    child: Child,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server's resident set size, in bytes.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Memory {
    /// `VmHWM`: the most it has held since it started.
    pub(super) peak: u64,
    /// `VmRSS`: what it holds now.
    pub(super) current: u64,
}

impl ServerProcess {
    /// Peak and current resident set size.
    pub(super) fn memory(&self) -> anyhow::Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("reading the server's /proc status (Linux only)")?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc status"))?;
            let kib: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("unreadable {name}"))?;
            Ok(kib * 1024)
        };
        Ok(Memory {
            peak: field("VmHWM:")?,
            current: field("VmRSS:")?,
        })
    }
}

/// Mebibytes, for the reports.
pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// `--server-bin`, or this executable.
pub(super) fn server_bin(chosen: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match chosen {
        Some(bin) => Ok(bin),
        None => std::env::current_exe().context("locating this executable"),
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Keys every server version since the federation landed reads; nothing
/// newer, so `--server-bin` may be an older build. `rate_limits` names the
/// classes whose limits differ from the server's defaults.
fn minimal_config(
    state_dir: &Path,
    port: u16,
    architecture: &str,
    rate_limits: &[(&str, RateLimit)],
) -> String {
    let mut config = format!(
        "server:\n  listen: 127.0.0.1:{port}\n  metrics_listen: null\n  state_dir: {}\n",
        state_dir.display()
    );
    if !rate_limits.is_empty() {
        config.push_str("rate_limits:\n");
        for (class, limit) in rate_limits {
            config.push_str(&format!(
                "  {class}: {{ per_minute: {}, burst: {} }}\n",
                limit.per_minute, limit.burst
            ));
        }
    }
    config.push_str(&format!(
        "federation:\n  enabled: true\n  architecture: {architecture}\n  auto_start: true\n  clients_per_round: 1\n  min_updates: 1\n  round_timeout_secs: 600\n  eval_data: null\n"
    ));
    config
}

fn spawn(bin: &Path, workdir: &Path, config: &Path) -> anyhow::Result<(ServerProcess, String)> {
    let log = std::fs::File::create(workdir.join("server.log"))?;
    let mut child = Command::new(bin)
        .current_dir(workdir)
        .arg("--config")
        .arg(config)
        .arg("server")
        .env("QFLARE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("the server's stdout")?;
    let server = ServerProcess { child };
    let (tx, rx) = std::sync::mpsc::channel();
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
    let fingerprint = rx.recv_timeout(PATIENCE).with_context(|| {
        format!(
            "the server printed no fingerprint; see {}",
            workdir.join("server.log").display()
        )
    })?;
    Ok((server, fingerprint))
}

/// A running child server, its working directory, and a pinned admin client.
pub(super) struct ChildServer {
    // Declared first, so dropped first: the process dies before its
    // working directory is removed.
    pub(super) process: ServerProcess,
    pub(super) workdir: tempfile::TempDir,
    /// `https://127.0.0.1:<port>`.
    pub(super) url: String,
    pub(super) fingerprint: ServerFingerprint,
    admin: Transport,
}

impl ChildServer {
    /// Starts `bin` on a free port of 127.0.0.1 in a new temporary directory
    /// named `prefix…`, training `architecture`, and checks it against the
    /// fingerprint it prints.
    pub(super) async fn start(
        bin: &Path,
        prefix: &str,
        architecture: &str,
        rate_limits: &[(&str, RateLimit)],
    ) -> anyhow::Result<Self> {
        let workdir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let port = free_port()?;
        let config = workdir.path().join("config.yaml");
        std::fs::write(
            &config,
            minimal_config(
                &workdir.path().join("state"),
                port,
                architecture,
                rate_limits,
            ),
        )?;
        let (process, fingerprint) = spawn(bin, workdir.path(), &config)?;
        let url = format!("https://127.0.0.1:{port}");
        let fingerprint =
            ServerFingerprint::parse(&fingerprint).context("the printed fingerprint")?;
        let discovered = Transport::discover(&url, &fingerprint).await?;
        let admin =
            Transport::pinned(&url, discovered.certificate_sha256, Duration::from_secs(60))?;
        Ok(Self {
            process,
            workdir,
            url,
            fingerprint,
            admin,
        })
    }

    /// Peak and current resident set size of the server.
    pub(super) fn memory(&self) -> anyhow::Result<Memory> {
        self.process.memory()
    }

    /// The server's log (its stderr).
    pub(super) fn log(&self) -> PathBuf {
        self.workdir.path().join("server.log")
    }

    /// Enrolls a device named `device_name` with a token fresh from the admin
    /// API; its identity is written to `dir` in the working directory.
    pub(super) async fn enroll(&self, device_name: &str, dir: &str) -> anyhow::Result<Identity> {
        let created: CreatedToken = self
            .admin
            .http
            .post(self.admin.url(routes::ADMIN_TOKENS))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({ "label": "bench" }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(qflare_edge::enroll(
            EnrollOptions {
                server_url: self.url.clone(),
                token: EnrollmentToken::parse(&created.token)?,
                fingerprint: self.fingerprint,
                device_name: device_name.into(),
                kem_suite: None,
                signature_suite: None,
            },
            &self.workdir.path().join(dir),
        )
        .await?)
    }
}

/// One `POST /v1/rounds/current`, as a device polls.
pub(super) async fn poll(session: &mut Session) -> anyhow::Result<RoundInfo> {
    let nonce: [u8; 32] = rand::random();
    Ok(session
        .call(
            routes::CURRENT_ROUND,
            &RoundQuery {
                nonce: Some(nonce),
                wait_while: None,
            },
            1 << 20,
        )
        .await?)
}

/// Polls until the device is selected for the open round.
pub(super) async fn wait_for_training(session: &mut Session) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let info = poll(session).await?;
        if info.status == RoundStatus::Train {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the device was not selected for a round within {PATIENCE:?} ({:?})",
                info.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
