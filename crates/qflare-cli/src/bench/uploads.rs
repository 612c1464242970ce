//! `qflare bench uploads`: what one enrolled device can make the server hold
//! in memory by sending many update uploads at once.
//!
//! The server runs as a child process (its own peak RSS is the measure, read
//! from `/proc/<pid>/status` `VmHWM`), started from `--server-bin` (default:
//! this executable) with a minimal configuration that any version of the
//! server reads, so that an older build can be measured the same way. One
//! device enrolls, training starts, and once the device is selected for the
//! open round it opens `--uploads` sessions and sends, on all of them at
//! once, a sealed body as large as the update limit allows. The bodies are
//! sealed correctly (they pass the session layer) but hold no valid
//! envelope: what is measured is the memory the server commits before it can
//! tell, not the enclave's work.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use qflare_edge::transport::Transport;
use qflare_edge::{EnrollOptions, Identity, Session};
use qflare_protocol::api::routes;
use qflare_protocol::federation::{ModelQuery, RoundInfo, RoundQuery, RoundStatus};
use qflare_protocol::identity::{EnrollmentToken, ServerFingerprint};
use qflare_protocol::wire::{self, limits};
use qflare_server::api::CreatedToken;

/// How long the server and the round may take to come up.
const PATIENCE: Duration = Duration::from_secs(120);

/// The admin token the child server is started with.
const ADMIN_TOKEN: &str = "bench-uploads-admin-token-0123456789abcdef";

/// `qflare bench uploads` options.
#[derive(Debug, clap::Args)]
pub struct UploadsArgs {
    /// Concurrent uploads from the one device.
    #[arg(long, default_value_t = 50)]
    pub uploads: usize,
    /// The server executable to measure (default: this one). Its enclave
    /// executable must sit beside it, as in a build directory.
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// The built-in model the federation trains (sets the update size).
    #[arg(long, default_value = "mnist-cnn")]
    pub architecture: String,
}

/// The server child process, killed when dropped.
struct ServerProcess {
    child: Child,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    /// Peak and current resident set size, in bytes.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
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
        Ok((field("VmHWM:")?, field("VmRSS:")?))
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Keys every server version since the federation landed reads; nothing
/// newer, so `--server-bin` may be an older build.
fn minimal_config(state_dir: &Path, port: u16, architecture: &str) -> String {
    format!(
        "server:\n  listen: 127.0.0.1:{port}\n  metrics_listen: null\n  state_dir: {}\n\
         rate_limits:\n  sessions: {{ per_minute: 60000, burst: 10000 }}\n  device: {{ per_minute: 60000, burst: 10000 }}\n\
         federation:\n  enabled: true\n  architecture: {architecture}\n  auto_start: true\n  clients_per_round: 1\n  min_updates: 1\n  round_timeout_secs: 600\n  eval_data: null\n",
        state_dir.display()
    )
}

fn start_server(
    bin: &Path,
    workdir: &Path,
    config: &Path,
) -> anyhow::Result<(ServerProcess, String)> {
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

async fn poll(session: &mut Session) -> anyhow::Result<RoundInfo> {
    let nonce: [u8; 32] = rand::random();
    Ok(session
        .call(
            routes::CURRENT_ROUND,
            &RoundQuery { nonce: Some(nonce) },
            1 << 20,
        )
        .await?)
}

/// Runs the benchmark; prints a markdown table.
pub async fn run(args: UploadsArgs) -> anyhow::Result<()> {
    if args.uploads == 0 {
        bail!("--uploads must be at least 1");
    }
    let bin = match args.server_bin {
        Some(bin) => bin,
        None => std::env::current_exe().context("locating this executable")?,
    };
    let workdir = tempfile::Builder::new()
        .prefix("qflare-bench-uploads-")
        .tempdir()?;
    let port = free_port()?;
    let config = workdir.path().join("config.yaml");
    std::fs::write(
        &config,
        minimal_config(&workdir.path().join("state"), port, &args.architecture),
    )?;
    let (server, fingerprint) = start_server(&bin, workdir.path(), &config)?;
    let url = format!("https://127.0.0.1:{port}");
    let pin = ServerFingerprint::parse(&fingerprint).context("the printed fingerprint")?;
    let discovered = Transport::discover(&url, &pin).await?;
    let admin = Transport::pinned(&url, discovered.certificate_sha256, Duration::from_secs(60))?;
    let created: CreatedToken = admin
        .http
        .post(admin.url(routes::ADMIN_TOKENS))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({ "label": "bench" }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let device_dir = workdir.path().join("device");
    let identity: Identity = qflare_edge::enroll(
        EnrollOptions {
            server_url: url.clone(),
            token: EnrollmentToken::parse(&created.token)?,
            fingerprint: pin,
            device_name: "bench-uploader".into(),
            kem_suite: None,
            signature_suite: None,
        },
        &device_dir,
    )
    .await?;
    let transport = qflare_edge::transport_for(&identity)?;
    let mut first = qflare_edge::open_session(&identity, &transport).await?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let info = poll(&mut first).await?;
        if info.status == RoundStatus::Train {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the device was not selected for a round within {PATIENCE:?} ({:?})",
                info.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The update limit follows the model: as large a body as it admits.
    let download = first
        .call_raw(
            routes::CURRENT_MODEL,
            wire::encode(&ModelQuery::default())?,
            1 << 30,
        )
        .await?;
    let (_, model) = qflare_protocol::federation::decode_model_download(&download)?;
    let body_limit = limits::sealed_record_for(limits::update_envelope_for(model.len()));
    let plaintext = body_limit.saturating_sub(qflare_protocol::channel::RECORD_OVERHEAD);

    let mut sessions = vec![first];
    for _ in 1..args.uploads {
        sessions.push(qflare_edge::open_session(&identity, &transport).await?);
    }
    let (peak_before, _) = server.memory()?;
    eprintln!(
        "flooding: {} concurrent uploads of {:.1} MB from one device",
        args.uploads,
        plaintext as f64 / 1e6
    );
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut session in sessions {
        tasks.spawn(async move {
            let body = vec![0x5a_u8; plaintext];
            match session.call_raw(routes::UPDATES, body, 1 << 16).await {
                Ok(_) => "200".to_owned(),
                Err(err) => match err.error_code() {
                    Some(code) => code.as_str().to_owned(),
                    None => format!("no answer ({err})"),
                },
            }
        });
    }
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    while let Some(outcome) = tasks.join_next().await {
        *outcomes.entry(outcome?).or_default() += 1;
    }
    let elapsed = started.elapsed();
    let (peak_after, rss_after) = server.memory()?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "| server | uploads × body | answers | server peak RSS before | during the flood | RSS after | flood time |"
    );
    println!("|---|---|---|---|---|---|---|");
    let answers = outcomes
        .iter()
        .map(|(code, n)| format!("{n}× {code}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "| {} | {} × {:.1} MB | {answers} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.1} s |",
        bin.display(),
        args.uploads,
        plaintext as f64 / 1e6,
        mib(peak_before),
        mib(peak_after),
        mib(rss_after),
        elapsed.as_secs_f64()
    );
    drop(server);
    Ok(())
}
