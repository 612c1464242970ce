//! `qflare bench overhead`: what the framework itself costs per round, with
//! training taken out.
//!
//! About 680 lines in one file on purpose: one benchmark's arguments, its
//! echo trainer, the run and the report it prints read top to bottom; the
//! parts shared with other benches (the child server, `/proc` readings)
//! already live in `child_server.rs`.
//!
//! The server runs as a child process (`--server-bin`, default this
//! executable) with its enclave as its own child, so each process's CPU time
//! and peak memory are read from `/proc` separately. N devices enroll through
//! the admin API and the real enrollment protocol, then each runs the real
//! device loop ([`qflare_edge::run_device`]) in this process: its own keys,
//! its own pinned TLS client (so its own connection), its own session; it
//! verifies the enclave's report and the model certificate, and signs and
//! seals its update to the enclave exactly as a deployed device does. Only
//! training is replaced: [`EchoTrainer`] returns a small deterministic delta
//! of the model's layout at once (the Flower comparison's clients return the
//! model plus a small delta, with `num_examples = 600`). Every device is
//! selected each round; the enclave's defense and FedAvg run as configured by
//! default.
//!
//! A round's time is measured from the moment the first device is told to
//! train in it to the moment the first device is told to train in the next
//! (or that training finished): configuration, downloads, sealing, the
//! enclave's checks, aggregation, the model's signing and the wake-up of the
//! waiting devices all fall inside it. Round 1 also holds every device's
//! first session and first attestation check, so the figures are of rounds
//! 2..R; CPU time and loopback bytes are the difference between snapshots
//! taken when round 2 opens and when training finishes, divided by R − 1.
//!
//! About 670 lines in one file: the echo trainer, the event recorder, the
//! summary and the printed report share a few private types (`Recorder`,
//! `Snapshot`, `Report`); split apart, each would need the others' fields.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use qflare_edge::{
    DeviceConfig, DeviceEvent, Events, FitResult, FitTask, LocalTrainer, RoundTimings, TrainError,
};
use qflare_protocol::attestation::{AttestationMode, AttestationPolicy};
use qflare_protocol::federation::RoundStatus;
use qflare_server::ratelimit::RateLimit;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::child_server::{self, ChildConfig, ChildServer, mib};

/// `qflare bench overhead` options.
#[derive(Debug, clap::Args)]
pub struct OverheadArgs {
    /// The built-in model: mnist-cnn or mnist-2nn.
    #[arg(long, default_value = "mnist-cnn")]
    pub model: String,
    /// Devices, all selected every round.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Rounds; rounds 2..R are measured, so at least 3.
    #[arg(long, default_value_t = 6)]
    pub rounds: u64,
    /// Enrollments in flight at once while the devices are set up.
    #[arg(long, default_value_t = 16)]
    pub enroll_concurrency: usize,
    /// How devices encode their updates: f32, f16 or int8.
    #[arg(long, default_value = "f32")]
    pub update_encoding: qflare_protocol::update_encoding::UpdateEncoding,
    /// The enclave's aggregation: `recommended` (the default: a norm bound
    /// relative to the round's median, then centered clipping, so the
    /// enclave holds the round's updates), `absolute-norm` (FedAvg after
    /// refusing update norms above 1.0, decided as each arrives, so the
    /// enclave folds and drops them: memory flat in the number of devices)
    /// or `off` (FedAvg, no defense; streams too).
    #[arg(long, default_value = "recommended")]
    pub defense: BenchDefense,
    /// The server's `limits.uploads_in_memory_bytes`, in MiB: how much of
    /// the update bodies waiting for the enclave it holds at once (default:
    /// the server's, 1 GiB); devices beyond it are told to retry.
    #[arg(long, value_name = "MIB")]
    pub uploads_in_memory_mib: Option<u64>,
    /// The server's `limits.downloads_in_memory_bytes`, in MiB: how much of
    /// the model copies sealed for devices it holds at once (default: the
    /// server's, 256 MiB); downloads beyond it wait their turn.
    #[arg(long, value_name = "MIB")]
    pub downloads_in_memory_mib: Option<u64>,
    /// The server executable to measure (default: this one). Its enclave
    /// executable must sit beside it, as in a build directory.
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Also write the results as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// The defenses `--defense` chooses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchDefense {
    /// The server's default.
    Recommended,
    /// A fixed norm bound, decided on arrival: the enclave streams.
    AbsoluteNorm,
    /// None.
    Off,
}

impl BenchDefense {
    /// The `aggregation` section as YAML, if it differs from the default.
    fn yaml(self) -> Option<&'static str> {
        match self {
            Self::Recommended => None,
            // The echo deltas' norms are about 0.03 (2NN) to 0.07 (CNN).
            Self::AbsoluteNorm => Some(
                "{ aggregator: fed_avg, defense: { norm_bound: { action: reject, median_multiple: null, absolute_max: 1.0 }, similarity: { reference: \"off\" } } }",
            ),
            Self::Off => Some("{ aggregator: fed_avg, defense: \"off\" }"),
        }
    }
}

/// The examples each device claims, as the Flower comparison's clients do.
const EXAMPLES_PER_DEVICE: u64 = 600;

/// A "trainer" that does not train: it answers at once with a small delta
/// that depends only on the seed, round and position, so each device sends a
/// different but reproducible update the defense accepts.
#[derive(Debug)]
struct EchoTrainer;

impl LocalTrainer for EchoTrainer {
    fn fit(
        &self,
        task: &FitTask<'_>,
        _progress: &dyn Fn(usize, usize),
    ) -> Result<FitResult, TrainError> {
        let flat: Vec<f32> = (0..task.global.num_parameters())
            .map(|index| small_delta(task.seed, task.round_id, index as u64))
            .collect();
        let update = task
            .global
            .with_flat(&flat)
            .map_err(|err| TrainError::Failed(err.to_string()))?;
        Ok(FitResult {
            update,
            examples: EXAMPLES_PER_DEVICE,
            metrics: BTreeMap::new(),
        })
    }
}

/// A value in [-1e-4, 1e-4) from a SplitMix64 hash of its coordinates.
fn small_delta(seed: u64, round_id: u64, index: u64) -> f32 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(round_id.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(index);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // The top 24 bits as a fraction in [0, 1), then centred and scaled.
    let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
    (unit - 0.5) * 2e-4
}

/// CPU time and loopback traffic at one moment.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    server_cpu: f64,
    enclave_cpu: f64,
    devices_cpu: f64,
    loopback_bytes: u64,
}

impl Snapshot {
    fn take(server_pid: u32, enclave_pid: u32) -> anyhow::Result<Self> {
        Ok(Self {
            server_cpu: child_server::cpu_seconds(server_pid)?,
            enclave_cpu: child_server::cpu_seconds(enclave_pid)?,
            devices_cpu: child_server::cpu_seconds(std::process::id())?,
            loopback_bytes: loopback_bytes()?,
        })
    }
}

/// Bytes received on the loopback interface so far (each byte sent over
/// loopback is received once): TLS records, HTTP and TCP/IP headers.
fn loopback_bytes() -> anyhow::Result<u64> {
    let dev = std::fs::read_to_string("/proc/net/dev").context("reading /proc/net/dev")?;
    dev.lines()
        .find_map(|line| {
            let (name, counters) = line.split_once(':')?;
            (name.trim() == "lo").then(|| counters.split_whitespace().next()?.parse().ok())?
        })
        .context("no loopback interface in /proc/net/dev")
}

/// What the devices' events tell, as they happen.
#[derive(Debug, Default)]
struct Recorder {
    /// When the first device was told to train in each round.
    opened: BTreeMap<u64, Instant>,
    /// When the first device was told training finished.
    finished: Option<Instant>,
    /// When the last receipt of each round arrived.
    last_receipt: BTreeMap<u64, Instant>,
    /// Device phases summed over rounds 2..R.
    phases: RoundTimings,
    /// Snapshots when round 2 opened and when training finished.
    at_round_two: Option<Snapshot>,
    at_finish: Option<Snapshot>,
    snapshot_error: Option<String>,
    /// Model bytes downloaded (not served from a device's cache).
    downloaded: u64,
    /// Sealed update bytes (KEM ciphertext and sealed payload).
    sealed: u64,
    /// Submissions, and those the enclave did not accept or hold.
    submissions: u64,
    refused: BTreeSet<String>,
    failures: Vec<String>,
}

/// The measured figures, printed as markdown and optionally written as JSON.
#[derive(Debug, Serialize)]
struct Report {
    model: String,
    devices: usize,
    rounds: u64,
    update_encoding: &'static str,
    defense: BenchDefense,
    /// Seconds to enroll every device.
    enroll_seconds: f64,
    /// Seconds of round 1 (first sessions, attestation checks, downloads).
    first_round_seconds: f64,
    /// Seconds of each of rounds 2..R.
    round_seconds: Vec<f64>,
    round_seconds_median: f64,
    /// Median over rounds 2..R of the seconds from a round's last receipt
    /// to the next round's first device told to train: closing, the
    /// enclave's aggregation and signing, storing the model, opening the
    /// next round and waking the devices.
    close_seconds_median: f64,
    /// Mean milliseconds per device and round (rounds 2..R) of each phase
    /// of the device loop, and the device's whole round.
    device_phases_ms: Vec<(&'static str, f64)>,
    /// CPU-seconds per round (rounds 2..R).
    server_cpu_per_round: f64,
    enclave_cpu_per_round: f64,
    devices_cpu_per_round: f64,
    /// Peak resident set sizes, bytes.
    server_peak_rss: u64,
    enclave_peak_rss: u64,
    devices_peak_rss: u64,
    /// Loopback bytes per round (rounds 2..R).
    loopback_bytes_per_round: f64,
    /// Application bytes per round, all rounds: model downloads and sealed updates.
    model_bytes_per_round: f64,
    update_bytes_per_round: f64,
}

/// Runs the benchmark; prints a markdown table.
pub async fn run(args: OverheadArgs) -> anyhow::Result<()> {
    if args.rounds < 3 {
        bail!("--rounds must be at least 3 (rounds 2..R are measured)");
    }
    if args.devices == 0 || args.enroll_concurrency == 0 {
        bail!("--devices and --enroll-concurrency must be at least 1");
    }
    if !matches!(args.model.as_str(), "mnist-cnn" | "mnist-2nn") {
        bail!("--model must be mnist-cnn or mnist-2nn");
    }
    let bin = child_server::server_bin(args.server_bin.clone())?;
    let policy = device_policy(&bin)?;
    // Every device is behind 127.0.0.1: the per-address limits would
    // measure the limiter, not the framework.
    let unlimited = RateLimit {
        per_minute: 100_000_000,
        burst: 10_000_000,
    };
    let limits: Vec<(&str, RateLimit)> = [
        "enroll",
        "sessions",
        "device",
        "public",
        "admin",
        "connections",
    ]
    .into_iter()
    .map(|class| (class, unlimited))
    .collect();
    let server = Arc::new(
        ChildServer::start(
            &bin,
            "qflare-bench-overhead-",
            &ChildConfig {
                clients_per_round: args.devices,
                auto_start: false,
                max_rounds: Some(args.rounds),
                max_connections_per_address: Some(2 * args.devices + 64),
                update_encoding: Some(args.update_encoding.as_str()),
                aggregation: args.defense.yaml(),
                uploads_in_memory_bytes: args.uploads_in_memory_mib.map(|mib| mib << 20),
                downloads_in_memory_bytes: args.downloads_in_memory_mib.map(|mib| mib << 20),
                ..ChildConfig::new(&args.model, &limits)
            },
        )
        .await?,
    );
    eprintln!("server up; enrolling {} devices", args.devices);
    let enroll_started = Instant::now();
    let identities = enroll_all(&server, args.devices, args.enroll_concurrency).await?;
    let enroll_seconds = enroll_started.elapsed().as_secs_f64();
    eprintln!(
        "enrolled in {enroll_seconds:.1} s; starting {} rounds",
        args.rounds
    );

    let server_pid = server.process.pid();
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let mut devices = tokio::task::JoinSet::new();
    for (index, identity) in identities.into_iter().enumerate() {
        let mut config = DeviceConfig::new(policy.clone(), Arc::new(EchoTrainer));
        config.stop_when_finished = true;
        config.train_seed = index as u64;
        let events = record_events(recorder.clone(), server_pid);
        devices.spawn(async move { qflare_edge::run_device(&identity, config, events).await });
    }
    server.start_training().await?;
    let patience = Duration::from_secs(600 + 60 * args.rounds);
    let finished = tokio::time::timeout(patience, async {
        let mut failed = Vec::new();
        while let Some(joined) = devices.join_next().await {
            match joined {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => failed.push(err.to_string()),
                Err(err) => failed.push(err.to_string()),
            }
        }
        failed
    })
    .await
    .with_context(|| format!("the rounds did not finish within {patience:?}"))?;
    if let Some(first) = finished.first() {
        bail!("{} devices failed; the first: {first}", finished.len());
    }
    let enclave_pid = enclave_pid(server_pid)?;
    let recorder = recorder
        .lock()
        .map_err(|_| anyhow::anyhow!("the event recorder was poisoned"))?;
    let report = summarize(&args, enroll_seconds, &recorder, &server, enclave_pid)?;
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The policy a deployed device would hold for this build: the measurement
/// of the enclave executable the server starts (its sibling `qflare-enclave`,
/// else the server executable itself), software mode, the sandbox required.
fn device_policy(server_bin: &Path) -> anyhow::Result<AttestationPolicy> {
    let sibling = server_bin.with_file_name("qflare-enclave");
    let enclave = if sibling.exists() {
        sibling
    } else {
        server_bin.to_path_buf()
    };
    Ok(AttestationPolicy {
        allowed_measurements: vec![qflare_enclave::backend::measure_file(&enclave)?],
        allowed_modes: vec![AttestationMode::Software],
        max_age_secs: 600,
        require_sandbox: true,
        hardware: Default::default(),
    })
}

/// Enrolls `count` devices, `concurrency` at a time.
async fn enroll_all(
    server: &Arc<ChildServer>,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<qflare_edge::Identity>> {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut enrolling = tokio::task::JoinSet::new();
    for index in 0..count {
        let (server, permits) = (server.clone(), permits.clone());
        enrolling.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let identity = server
                .enroll(
                    &format!("bench-{index:05}"),
                    &format!("devices/device-{index:05}"),
                )
                .await
                .with_context(|| format!("enrolling device {index}"))?;
            anyhow::Ok((index, identity))
        });
    }
    let mut identities = Vec::with_capacity(count);
    while let Some(joined) = enrolling.join_next().await {
        identities.push(joined??);
    }
    identities.sort_by_key(|(index, _)| *index);
    Ok(identities
        .into_iter()
        .map(|(_, identity)| identity)
        .collect())
}

/// The enclave: the server's one child process.
fn enclave_pid(server_pid: u32) -> anyhow::Result<u32> {
    match child_server::children_of(server_pid).as_slice() {
        [pid] => Ok(*pid),
        others => bail!(
            "expected the server to have one child (its enclave), found {}",
            others.len()
        ),
    }
}

/// The devices' event sink: round openings, bytes, refusals, and the two
/// snapshots (taken by whichever device sees the moment first).
fn record_events(recorder: Arc<Mutex<Recorder>>, server_pid: u32) -> Events {
    Events::from_fn(move |event| {
        let Ok(mut rec) = recorder.lock() else { return };
        let now = Instant::now();
        match event {
            DeviceEvent::RoundSeen {
                round_id: Some(round_id),
                status: RoundStatus::Train,
            } => {
                if rec.opened.contains_key(&round_id) {
                    return;
                }
                rec.opened.insert(round_id, now);
                if rec.opened.len() == 2 {
                    snapshot_into(&mut rec, server_pid, |rec, s| rec.at_round_two = Some(s));
                }
            }
            DeviceEvent::RoundSeen {
                status: RoundStatus::Finished,
                ..
            } if rec.finished.is_none() => {
                rec.finished = Some(now);
                snapshot_into(&mut rec, server_pid, |rec, s| rec.at_finish = Some(s));
            }
            DeviceEvent::ModelVerified {
                bytes,
                cached: false,
                ..
            } => rec.downloaded += bytes as u64,
            DeviceEvent::Submitted {
                round_id,
                status,
                code,
                sealed_bytes,
                timings,
            } => {
                rec.submissions += 1;
                rec.last_receipt.insert(round_id, now);
                if rec
                    .opened
                    .keys()
                    .next()
                    .is_some_and(|first| *first != round_id)
                {
                    add_timings(&mut rec.phases, &timings);
                }
                rec.sealed += sealed_bytes.unwrap_or(0);
                if status != "accepted" && status != "pending" {
                    rec.refused.insert(format!("{status}/{code}"));
                }
            }
            DeviceEvent::Stopped(qflare_edge::StopOutcome::Failed(err)) => rec.failures.push(err),
            _ => {}
        }
    })
}

fn add_timings(sum: &mut RoundTimings, t: &RoundTimings) {
    sum.round_query += t.round_query;
    sum.attestation += t.attestation;
    sum.download += t.download;
    sum.model_verify += t.model_verify;
    sum.model_decode += t.model_decode;
    sum.training += t.training;
    sum.update_encode += t.update_encode;
    sum.sealing += t.sealing;
    sum.submission += t.submission;
    sum.wall += t.wall;
}

fn snapshot_into(rec: &mut Recorder, server_pid: u32, store: impl FnOnce(&mut Recorder, Snapshot)) {
    let taken = enclave_pid(server_pid).and_then(|pid| Snapshot::take(server_pid, pid));
    match taken {
        Ok(snapshot) => store(rec, snapshot),
        Err(err) => rec.snapshot_error = Some(err.to_string()),
    }
}

fn summarize(
    args: &OverheadArgs,
    enroll_seconds: f64,
    rec: &Recorder,
    server: &ChildServer,
    enclave_pid: u32,
) -> anyhow::Result<Report> {
    if let Some(err) = &rec.snapshot_error {
        bail!("a CPU snapshot failed: {err}");
    }
    if let Some(err) = rec.failures.first() {
        bail!("a device failed: {err}");
    }
    if !rec.refused.is_empty() {
        bail!("the enclave refused updates: {:?}", rec.refused);
    }
    let expected = args.devices as u64 * args.rounds;
    if rec.submissions != expected || rec.opened.len() as u64 != args.rounds {
        bail!(
            "expected {} rounds of {} submissions, saw {} rounds and {} submissions",
            args.rounds,
            args.devices,
            rec.opened.len(),
            rec.submissions
        );
    }
    let (Some(start), Some(end), Some(finished)) = (rec.at_round_two, rec.at_finish, rec.finished)
    else {
        bail!("training finished without the round-2 and final snapshots");
    };
    let mut boundaries: Vec<Instant> = rec.opened.values().copied().collect();
    boundaries.push(finished);
    let all_rounds: Vec<f64> = boundaries
        .windows(2)
        .map(|pair| pair[1].duration_since(pair[0]).as_secs_f64())
        .collect();
    let round_seconds = all_rounds[1..].to_vec();
    let closes: Vec<f64> = rec
        .last_receipt
        .iter()
        .skip(1)
        .filter_map(|(round_id, receipt)| {
            let next = rec
                .opened
                .range(round_id + 1..)
                .next()
                .map_or(finished, |(_, at)| *at);
            Some(next.checked_duration_since(*receipt)?.as_secs_f64())
        })
        .collect();
    let per_device = (args.devices as f64 * (args.rounds - 1) as f64).max(1.0);
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / per_device;
    let p = &rec.phases;
    let device_phases_ms = vec![
        ("round query", ms(p.round_query)),
        ("attestation", ms(p.attestation)),
        ("download", ms(p.download)),
        ("model verify", ms(p.model_verify)),
        ("model decode", ms(p.model_decode)),
        ("training (echo)", ms(p.training)),
        ("update encode", ms(p.update_encode)),
        ("sealing", ms(p.sealing)),
        ("submission", ms(p.submission)),
        ("whole round", ms(p.wall)),
    ];
    let measured = (args.rounds - 1) as f64;
    let per_round = |a: f64, b: f64| (b - a) / measured;
    Ok(Report {
        model: args.model.clone(),
        update_encoding: args.update_encoding.as_str(),
        defense: args.defense,
        devices: args.devices,
        rounds: args.rounds,
        enroll_seconds,
        first_round_seconds: all_rounds[0],
        round_seconds_median: median(&round_seconds),
        round_seconds,
        close_seconds_median: median(&closes),
        device_phases_ms,
        server_cpu_per_round: per_round(start.server_cpu, end.server_cpu),
        enclave_cpu_per_round: per_round(start.enclave_cpu, end.enclave_cpu),
        devices_cpu_per_round: per_round(start.devices_cpu, end.devices_cpu),
        server_peak_rss: server.memory()?.peak,
        enclave_peak_rss: child_server::memory_of(enclave_pid)?.peak,
        devices_peak_rss: child_server::memory_of(std::process::id())?.peak,
        loopback_bytes_per_round: end.loopback_bytes.saturating_sub(start.loopback_bytes) as f64
            / measured,
        model_bytes_per_round: rec.downloaded as f64 / args.rounds as f64,
        update_bytes_per_round: rec.sealed as f64 / args.rounds as f64,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn print_report(r: &Report) {
    let (min, max) = r
        .round_seconds
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), s| {
            (lo.min(*s), hi.max(*s))
        });
    let mb = |bytes: f64| bytes / 1e6;
    println!(
        "## qflare bench overhead: {}, {} devices, {} rounds, {} updates, defense {:?}\n",
        r.model, r.devices, r.rounds, r.update_encoding, r.defense
    );
    println!("| measure | value |");
    println!("|---|--:|");
    println!("| enrollment of all devices | {:.2} s |", r.enroll_seconds);
    println!(
        "| round 1 (first sessions and attestation checks) | {:.3} s |",
        r.first_round_seconds
    );
    println!(
        "| **round time, rounds 2..{}: median (min–max)** | **{:.3} s** ({min:.3}–{max:.3}) |",
        r.rounds, r.round_seconds_median
    );
    println!(
        "| of which: last receipt to the next round's first device (median) | {:.3} s |",
        r.close_seconds_median
    );
    println!(
        "| CPU-seconds per round: server / enclave / devices | {:.2} / {:.2} / {:.2} |",
        r.server_cpu_per_round, r.enclave_cpu_per_round, r.devices_cpu_per_round
    );
    println!(
        "| peak RSS: server / enclave / all devices (one process) | {:.0} / {:.0} / {:.0} MiB |",
        mib(r.server_peak_rss),
        mib(r.enclave_peak_rss),
        mib(r.devices_peak_rss)
    );
    println!(
        "| bytes per round: on loopback / model downloads / sealed updates | {:.1} / {:.1} / {:.1} MB |",
        mb(r.loopback_bytes_per_round),
        mb(r.model_bytes_per_round),
        mb(r.update_bytes_per_round)
    );
    let phases: Vec<String> = r
        .device_phases_ms
        .iter()
        .map(|(name, ms)| format!("{name} {ms:.0}"))
        .collect();
    println!(
        "| a device's round, mean ms (rounds 2..R) | {} |",
        phases.join(" · ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_echo_delta_is_small_reproducible_and_not_constant() {
        let first: Vec<f32> = (0..1000).map(|i| small_delta(7, 3, i)).collect();
        let again: Vec<f32> = (0..1000).map(|i| small_delta(7, 3, i)).collect();
        assert_eq!(first, again);
        assert!(first.iter().all(|v| v.abs() <= 1e-4));
        let other_device: Vec<f32> = (0..1000).map(|i| small_delta(8, 3, i)).collect();
        assert_ne!(first, other_device);
        let mean = first.iter().sum::<f32>() / first.len() as f32;
        assert!(mean.abs() < 1e-5, "centred: mean {mean}");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn cpu_and_loopback_are_readable_for_this_process() {
        assert!(child_server::cpu_seconds(std::process::id()).is_ok_and(|s| s >= 0.0));
        assert!(loopback_bytes().is_ok());
    }
}
