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
    /// The server's process id.
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak and current resident set size.
    pub(super) fn memory(&self) -> anyhow::Result<Memory> {
        memory_of(self.child.id())
    }
}

/// Peak and current resident set size of process `pid`.
pub(super) fn memory_of(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (Linux only)"))?;
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

/// CPU seconds (user and system, all threads) process `pid` has used.
pub(super) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (Linux only)"))?;
    // The command name (field 2) may hold spaces; the fields after its
    // closing parenthesis are plain numbers: utime and stime are the 12th
    // and 13th of them (fields 14 and 15 of proc(5)).
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unreadable /proc stat")?;
    let ticks: Vec<u64> = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().context("unreadable /proc stat times"))
        .collect::<anyhow::Result<_>>()?;
    // USER_HZ, the unit of these fields, is 100 on every Linux ABI.
    Ok(ticks.iter().sum::<u64>() as f64 / 100.0)
}

/// The process ids whose parent is `pid` (the server's enclave).
pub(super) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
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

/// What a bench asks of the child server beyond the defaults.
pub(super) struct ChildConfig<'a> {
    /// The built-in model the federation trains.
    pub(super) architecture: &'a str,
    /// The rate-limit classes whose limits differ from the server's defaults.
    pub(super) rate_limits: &'a [(&'a str, RateLimit)],
    /// Devices per round (also the fewest updates that close a round).
    pub(super) clients_per_round: usize,
    /// Rounds start as soon as enough devices are enrolled; otherwise on
    /// [`ChildServer::start_training`].
    pub(super) auto_start: bool,
    /// Rounds to run (`None`: the server's default).
    pub(super) max_rounds: Option<u64>,
    /// `server.max_connections_per_address` (`None`: the default), for
    /// benches that put many devices behind 127.0.0.1.
    pub(super) max_connections_per_address: Option<usize>,
    /// `federation.update_encoding` (`None`: the default, f32).
    pub(super) update_encoding: Option<&'a str>,
    /// The `aggregation` section as a YAML flow map (`None`: the default).
    pub(super) aggregation: Option<&'a str>,
    /// `limits.uploads_in_memory_bytes` (`None`: the default).
    pub(super) uploads_in_memory_bytes: Option<u64>,
    /// `limits.downloads_in_memory_bytes` (`None`: the default).
    pub(super) downloads_in_memory_bytes: Option<u64>,
}

impl<'a> ChildConfig<'a> {
    /// One device per round, started as soon as it enrolls.
    pub(super) fn new(architecture: &'a str, rate_limits: &'a [(&'a str, RateLimit)]) -> Self {
        Self {
            architecture,
            rate_limits,
            clients_per_round: 1,
            auto_start: true,
            max_rounds: None,
            max_connections_per_address: None,
            update_encoding: None,
            aggregation: None,
            uploads_in_memory_bytes: None,
            downloads_in_memory_bytes: None,
        }
    }
}

/// Keys every server version since the federation landed reads, plus only
/// those a bench sets (`max_rounds`, `max_connections_per_address`, the
/// update encoding and the defense), so
/// `--server-bin` may be an older build.
fn minimal_config(state_dir: &Path, port: u16, settings: &ChildConfig<'_>) -> String {
    let mut config = format!(
        "server:\n  listen: 127.0.0.1:{port}\n  metrics_listen: null\n  state_dir: {}\n",
        state_dir.display()
    );
    if let Some(max) = settings.max_connections_per_address {
        config.push_str(&format!(
            "  max_connections_per_address: {max}\n  max_connections: {}\n",
            max.max(16_384)
        ));
    }
    if settings.uploads_in_memory_bytes.is_some() || settings.downloads_in_memory_bytes.is_some() {
        config.push_str("limits:\n");
    }
    if let Some(bytes) = settings.uploads_in_memory_bytes {
        config.push_str(&format!("  uploads_in_memory_bytes: {bytes}\n"));
    }
    if let Some(bytes) = settings.downloads_in_memory_bytes {
        config.push_str(&format!("  downloads_in_memory_bytes: {bytes}\n"));
    }
    if !settings.rate_limits.is_empty() {
        config.push_str("rate_limits:\n");
        for (class, limit) in settings.rate_limits {
            config.push_str(&format!(
                "  {class}: {{ per_minute: {}, burst: {} }}\n",
                limit.per_minute, limit.burst
            ));
        }
    }
    // One machine, no TEE: the enclave is a hardened process.
    config.push_str("enclave:\n  allow_software_mode: true\n");
    config.push_str(&format!(
        "federation:\n  enabled: true\n  architecture: {}\n  auto_start: {}\n  clients_per_round: {n}\n  min_updates: {n}\n  round_timeout_secs: 600\n  eval_data: null\n",
        settings.architecture,
        settings.auto_start,
        n = settings.clients_per_round,
    ));
    if let Some(rounds) = settings.max_rounds {
        config.push_str(&format!("  max_rounds: {rounds}\n"));
    }
    if let Some(encoding) = settings.update_encoding {
        config.push_str(&format!("  update_encoding: {encoding}\n"));
    }
    if let Some(aggregation) = settings.aggregation {
        config.push_str(&format!("aggregation: {aggregation}\n"));
    }
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
    /// named `prefix…`, configured by `settings`, and checks it against the
    /// fingerprint it prints.
    pub(super) async fn start(
        bin: &Path,
        prefix: &str,
        settings: &ChildConfig<'_>,
    ) -> anyhow::Result<Self> {
        let workdir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let port = free_port()?;
        let config = workdir.path().join("config.yaml");
        std::fs::write(
            &config,
            minimal_config(&workdir.path().join("state"), port, settings),
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

    /// Starts training through the admin API (for `auto_start: false`).
    pub(super) async fn start_training(&self) -> anyhow::Result<()> {
        self.admin
            .http
            .post(self.admin.url(routes::ADMIN_ROUNDS_START))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
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
                alternate_urls: Vec::new(),
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
