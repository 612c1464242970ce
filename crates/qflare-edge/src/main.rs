//! `qflare-edge`: enroll a device, open a session, rotate its keys, and run
//! the federated-learning loop.
//!
//! Exit codes: 0 when the run ended because training finished or `--rounds`
//! were done (and for the other commands on success), [`EXIT_REVOKED`] when
//! the admin revoked the device, 130 on Ctrl-C, 1 on any error.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qflare_edge::identity::DEFAULT_IDENTITY_DIR;
use qflare_edge::run::{DeviceEvent, StopOutcome};
use qflare_edge::{
    Backoff, BurnTrainer, DEFAULT_PARTITION_SEED, DeviceConfig, EnrollOptions, Events, Identity,
    RoundTimings, Shard, StopReason,
};
use qflare_protocol::attestation::hardware::HardwarePolicy;
use qflare_protocol::attestation::{
    AttestationMode, AttestationPolicy, MEASUREMENT_LEN, hardware_modes,
};
use qflare_protocol::identity::{EnrollmentToken, ServerFingerprint};
use qflare_protocol::{KemSuite, SignatureSuite};

/// Exit code of `run` when the device has been revoked (distinct from
/// errors, so a supervisor does not restart a revoked device).
const EXIT_REVOKED: u8 = 3;
/// Exit code on Ctrl-C (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

/// A QFLARE edge device: post-quantum enrollment, sessions and federated training.
#[derive(Debug, Parser)]
#[command(name = "qflare-edge", version, about, long_about = None)]
#[command(after_help = "Exit codes: 0 done, 3 device revoked (run), 130 interrupted, 1 error.")]
struct Cli {
    /// The identity directory (created by `enroll`, read by everything else).
    #[arg(long, global = true, default_value = DEFAULT_IDENTITY_DIR, env = "QFLARE_EDGE_IDENTITY")]
    identity: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll with a one-time token: generate key pairs, register the public halves.
    Enroll {
        /// The server, e.g. https://127.0.0.1:8443
        #[arg(long)]
        server: String,
        /// The enrollment token from `qflare token create`. It is base64url,
        /// so one in 64 begins with `-`: such a value is taken as the token,
        /// not as an option.
        #[arg(
            long,
            env = "QFLARE_ENROLL_TOKEN",
            hide_env_values = true,
            allow_hyphen_values = true
        )]
        token: String,
        /// The server fingerprint (64 hex characters) printed by `qflare server`.
        #[arg(long = "server-key")]
        server_key: String,
        /// A name for this device (A-Z a-z 0-9 . _ -).
        #[arg(long, default_value = "edge")]
        name: String,
        /// KEM suite: ml-kem-768, ml-kem-1024, frodokem-640-aes, frodokem-976-aes, x25519-ml-kem-768.
        #[arg(long)]
        kem: Option<KemSuite>,
        /// Signature suite: ml-dsa-65 or ml-dsa-87.
        #[arg(long)]
        signature: Option<SignatureSuite>,
        /// Another replica of the same server (same fingerprint), tried in
        /// turn when the one in use cannot be reached; repeatable.
        #[arg(long = "also-server", value_name = "URL")]
        also_server: Vec<String>,
    },
    /// Open and confirm a session, then prove the sealed channel with a ping.
    Session,
    /// Replace this device's keys (signed by the old and the new key).
    RotateKeys,
    /// Take part in federated training: poll rounds, verify the enclave and
    /// the global model, train locally, submit sealed updates.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Directory with the MNIST-format IDX training files
    /// (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz).
    #[arg(long, env = "QFLARE_DATA_DIR", value_name = "DIR")]
    data: PathBuf,
    /// Train on this IID shard only: K of N equal shards, K counting from 1
    /// (e.g. 3/10). Devices using the same N and --partition-seed get
    /// disjoint shards.
    #[arg(long, value_name = "K/N")]
    partition: Option<Shard>,
    /// Seed of the IID split behind --partition (all devices must agree).
    #[arg(long, value_name = "SEED", default_value_t = DEFAULT_PARTITION_SEED)]
    partition_seed: u64,
    /// Keep only the first N examples (of the shard, if --partition is given).
    #[arg(long, value_name = "N")]
    examples: Option<usize>,
    /// A software-mode enclave measurement (SHA-384 of its executable, 96
    /// hex characters) to trust; repeat for several. Reports with any other
    /// are refused.
    #[arg(
        long = "enclave-measurement",
        value_name = "HEX",
        required_unless_present = "hardware_policy"
    )]
    enclave_measurements: Vec<String>,
    /// Accept enclaves in AMD SEV-SNP, Intel TDX or AWS Nitro Enclaves on the
    /// terms of this JSON file (per kind: the measurement allow-list and
    /// minimum security versions; see docs/enclave.md §5.5). Their hardware
    /// evidence is verified offline against the vendors' roots.
    #[arg(long, value_name = "FILE")]
    hardware_policy: Option<PathBuf>,
    /// Accept software-mode attestation (a self-signed report from a hardened
    /// process; a host controlling the machine could forge it). Without this
    /// flag software reports are refused.
    #[arg(long)]
    allow_software_attestation: bool,
    /// Accept an enclave whose signed report says its system-call sandbox
    /// is off (started with `--seccomp log`, say) or says nothing about it.
    /// Without this flag such an enclave is refused.
    #[arg(long)]
    allow_unsandboxed_enclave: bool,
    /// Refuse attestation reports older than this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    max_report_age: u64,
    /// Stop after submitting to this many rounds.
    #[arg(long, value_name = "N")]
    rounds: Option<u64>,
    /// Keep polling after the server says training has finished.
    #[arg(long)]
    keep_running: bool,
    /// Stop at the first refused report, model or round instead of skipping the round.
    #[arg(long)]
    strict: bool,
    /// Give up after this many consecutive retryable failures (default: never).
    #[arg(long, value_name = "N")]
    max_retries: Option<u32>,
    /// Compute threads for training (default: all available cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

fn parse_measurement(text: &str) -> anyhow::Result<[u8; MEASUREMENT_LEN]> {
    qflare_protocol::attestation::parse_measurement(text).context("--enclave-measurement")
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // A progress bar is drawn only on a terminal; then only warnings are
    // logged (to stderr) unless RUST_LOG says otherwise, so the bar stays legible.
    let interactive = matches!(cli.command, Command::Run(_)) && std::io::stdout().is_terminal();
    let default_filter = if interactive { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli, interactive).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, interactive: bool) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Enroll {
            server,
            token,
            server_key,
            name,
            kem,
            signature,
            also_server,
        } => {
            let options = EnrollOptions {
                server_url: server,
                token: EnrollmentToken::parse(token.trim()).context("the token")?,
                fingerprint: ServerFingerprint::parse(&server_key).context("--server-key")?,
                device_name: name,
                kem_suite: kem,
                signature_suite: signature,
                alternate_urls: also_server,
            };
            let identity = qflare_edge::enroll(options, &cli.identity).await?;
            println!(
                "enrolled as device {} ({} + {}); identity written to {}",
                identity.device_id,
                identity.keys.kem.public.suite(),
                identity.keys.signing.suite(),
                Identity::path(&cli.identity).display()
            );
        }
        Command::Session => {
            let identity = qflare_edge::load_identity(&cli.identity).await?;
            let transport = qflare_edge::transport_for(&identity)?;
            let mut session = qflare_edge::open_session(&identity, &transport).await?;
            let pong = session.ping().await?;
            println!(
                "session {} established (expires at {}); sealed ping answered: {pong}",
                session.session_id(),
                session.expires_at()
            );
        }
        Command::RotateKeys => {
            let mut identity = qflare_edge::load_identity(&cli.identity).await?;
            let transport = qflare_edge::transport_for(&identity)?;
            let mut session = qflare_edge::open_session(&identity, &transport).await?;
            let version =
                qflare_edge::rotate_keys(&mut identity, &mut session, &cli.identity).await?;
            println!("keys rotated; key version {version}");
        }
        Command::Run(args) => return run_device(&cli.identity, args, interactive).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_device(
    identity_dir: &std::path::Path,
    args: RunArgs,
    interactive: bool,
) -> anyhow::Result<ExitCode> {
    let identity = qflare_edge::load_identity(identity_dir).await?;
    let allowed_measurements = args
        .enclave_measurements
        .iter()
        .map(|m| parse_measurement(m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut allowed_modes = Vec::new();
    if args.allow_software_attestation {
        allowed_modes.push(AttestationMode::Software);
    }
    let hardware = match &args.hardware_policy {
        Some(path) => {
            let text = std::fs::read(path)
                .with_context(|| format!("reading --hardware-policy {}", path.display()))?;
            let policy: HardwarePolicy = serde_json::from_slice(&text)
                .with_context(|| format!("--hardware-policy {}", path.display()))?;
            allowed_modes.extend(hardware_modes(&policy));
            policy
        }
        None => HardwarePolicy::default(),
    };
    if allowed_modes.is_empty() {
        // Every report would be refused: say so now, not per round.
        anyhow::bail!(
            "no attestation mode is allowed: give --hardware-policy for SEV-SNP, TDX or Nitro \
             enclaves, or --allow-software-attestation for a software-mode one"
        );
    }
    if let Some(threads) = args.threads {
        qflare_ml::set_compute_threads(threads).context("--threads")?;
    }
    let data_dir = args.data.clone();
    let (shard, examples, seed) = (args.partition, args.examples, args.partition_seed);
    let data = tokio::task::spawn_blocking(move || {
        qflare_edge::load_local_data(&data_dir, shard, examples, seed)
    })
    .await
    .context("loading the data")?
    .with_context(|| format!("loading the training data from {}", args.data.display()))?;
    let shard_text = shard.map_or_else(|| "all".to_owned(), |s| s.to_string());
    let local_examples = data.len();
    let mut config = DeviceConfig::new(
        AttestationPolicy {
            allowed_measurements,
            allowed_modes,
            max_age_secs: args.max_report_age,
            require_sandbox: !args.allow_unsandboxed_enclave,
            hardware,
        },
        Arc::new(BurnTrainer::new(data)),
    );
    config.max_rounds = args.rounds;
    config.stop_when_finished = !args.keep_running;
    config.fail_on_refusal = args.strict;
    config.backoff = Backoff {
        max_attempts: args.max_retries,
        ..Backoff::default()
    };

    let reporter = Arc::new(Reporter::new(interactive));
    reporter.line(format!(
        "device {} ({}) -> {}: {} local examples (shard {shard_text}), {} compute threads",
        identity.device_id,
        identity.device_name,
        identity.server_url,
        local_examples,
        qflare_ml::compute_threads(),
    ));
    let events = {
        let reporter = reporter.clone();
        Events::from_fn(move |event| reporter.handle(event))
    };
    let outcome = tokio::select! {
        outcome = qflare_edge::run_device(&identity, config, events) => outcome,
        _ = tokio::signal::ctrl_c() => {
            reporter.finish("interrupted");
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
    };
    let summary = outcome?;
    let count = |status: &str| summary.rounds.iter().filter(|r| r.status == status).count();
    reporter.finish(&format!(
        "stopped: {}; {} updates submitted ({} accepted, {} pending, {} rejected), {} refusals, \
         {} skipped rounds, {} retries",
        summary.stop,
        summary.rounds.len(),
        count("accepted"),
        count("pending"),
        count("rejected"),
        summary.refusals,
        summary.skipped,
        summary.retries
    ));
    Ok(match summary.stop {
        StopReason::Revoked => ExitCode::from(EXIT_REVOKED),
        StopReason::Finished | StopReason::MaxRounds => ExitCode::SUCCESS,
    })
}

fn millis(d: Duration) -> String {
    if d.is_zero() {
        "0 ms".to_owned()
    } else if d >= Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else if d >= Duration::from_millis(10) {
        format!("{} ms", d.as_millis())
    } else {
        // Signature checks take a fraction of a millisecond; keep them visible.
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

fn describe_timings(t: &RoundTimings) -> String {
    format!(
        "{} total, training {}, crypto {:.1} % (session {}, attestation {}, model check {}, sealing {}), network {}",
        millis(t.total()),
        millis(t.training),
        t.cryptography_share() * 100.0,
        millis(t.session),
        millis(t.attestation),
        millis(t.model_verify),
        millis(t.sealing),
        millis(t.round_query + t.download + t.submission),
    )
}

/// Shows events: an indicatif bar on a terminal, plain lines otherwise.
struct Reporter {
    bar: Option<ProgressBar>,
    /// True while the bar shows training progress rather than a spinner.
    training: AtomicBool,
    /// The last tenth of training progress printed (plain mode).
    last_tenth: AtomicUsize,
}

impl Reporter {
    fn new(interactive: bool) -> Self {
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            bar.set_style(Self::spinner_style());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            bar,
            training: AtomicBool::new(false),
            last_tenth: AtomicUsize::new(usize::MAX),
        }
    }

    fn spinner_style() -> ProgressStyle {
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
    }

    fn bar_style() -> ProgressStyle {
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:32}] {pos}/{len} examples, {elapsed} elapsed, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    /// The bar's status line; nothing in plain mode.
    fn status(&self, text: String) {
        if let Some(bar) = &self.bar {
            if self.training.swap(false, Ordering::Relaxed) {
                bar.set_style(Self::spinner_style());
            }
            bar.set_message(text);
        }
    }

    fn finish(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(text.to_owned()),
            None => println!("{text}"),
        }
    }

    fn handle(&self, event: DeviceEvent) {
        match event {
            DeviceEvent::SessionOpened {
                session_id,
                elapsed,
                ..
            } => self.line(format!(
                "session {}… opened in {}",
                session_id.get(..12).unwrap_or(&session_id),
                millis(elapsed)
            )),
            // Polls repeat; on a terminal they update the status line, in
            // plain mode only what leads to work is printed.
            DeviceEvent::RoundSeen { round_id, status } if self.bar.is_some() => {
                let round = round_id.map_or_else(|| "-".to_owned(), |r| r.to_string());
                self.status(format!("round {round}: {status:?}"));
            }
            DeviceEvent::EnclaveAttested {
                round_id,
                measurement,
                mode,
            } => self.line(format!(
                "round {round_id}: enclave attested, {} (measurement {}…)",
                if mode == AttestationMode::Software {
                    "software mode: self-signed by a hardened process, no hardware vouches for it"
                        .to_owned()
                } else {
                    format!("{} mode", mode.as_str())
                },
                measurement.get(..16).unwrap_or(&measurement)
            )),
            DeviceEvent::ModelVerified {
                version,
                architecture,
                bytes,
                cached,
            } => self.line(format!(
                "model v{version} ({architecture}, {bytes} bytes) {}",
                if cached {
                    "from cache"
                } else {
                    "downloaded and verified"
                }
            )),
            DeviceEvent::Training {
                round_id,
                done,
                total,
            } => match &self.bar {
                Some(bar) => {
                    if !self.training.swap(true, Ordering::Relaxed) {
                        bar.set_style(Self::bar_style());
                        bar.reset();
                        bar.set_message(format!("round {round_id}: training"));
                    }
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                }
                None => {
                    let tenth = done * 10 / total.max(1);
                    if self.last_tenth.swap(tenth, Ordering::Relaxed) != tenth {
                        println!("round {round_id}: training {done}/{total} examples");
                    }
                }
            },
            DeviceEvent::Resealing { round_id } => self.line(format!(
                "round {round_id}: re-sealing the trained update to the enclave"
            )),
            DeviceEvent::Submitted {
                round_id,
                status,
                code,
                timings,
                ..
            } => {
                self.last_tenth.store(usize::MAX, Ordering::Relaxed);
                self.status(format!("round {round_id}: {status}"));
                self.line(format!(
                    "round {round_id}: update {status} ({code}); {}",
                    describe_timings(&timings)
                ));
            }
            DeviceEvent::Skipped { round_id, code } => self.line(format!(
                "round {}: skipped ({code})",
                round_id.map_or_else(|| "-".to_owned(), |r| r.to_string())
            )),
            DeviceEvent::Refused { round_id, reason } => self.line(format!(
                "round {}: REFUSED, nothing trained or sent: {reason}",
                round_id.map_or_else(|| "-".to_owned(), |r| r.to_string())
            )),
            DeviceEvent::Retrying {
                attempt,
                delay,
                error,
            } => {
                let text = format!("retry {attempt} in {}: {error}", millis(delay));
                if self.bar.is_some() {
                    self.status(text);
                } else {
                    println!("{text}");
                }
            }
            DeviceEvent::Waiting { secs } => {
                if let Some(bar) = &self.bar {
                    let message = bar.message();
                    let base = message.split(" — ").next().unwrap_or("").to_owned();
                    self.status(format!("{base} — next poll in {secs} s"));
                }
            }
            DeviceEvent::Stopped(StopOutcome::Failed(error)) => {
                // main prints the error itself; only the bar needs closing.
                if let Some(bar) = &self.bar {
                    bar.abandon_with_message(format!("stopped: {error}"));
                }
            }
            DeviceEvent::Stopped(StopOutcome::Stopped(_)) => {}
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base64url token may begin with `-`; clap would take it for an
    /// option and refuse the command line.
    #[test]
    fn a_token_beginning_with_a_hyphen_is_a_token() {
        let cli = Cli::try_parse_from([
            "qflare-edge",
            "enroll",
            "--server",
            "https://127.0.0.1:8443",
            "--token",
            "-cZ3token",
            "--server-key",
            "00",
        ])
        .expect("parses");
        let Command::Enroll { token, .. } = cli.command else {
            panic!("not enroll");
        };
        assert_eq!(token, "-cZ3token");
    }
}
