//! A whole federation in one process, for `qflare demo`, `qflare bench
//! fedavg` and the end-to-end tests: the real server over real HTTPS on
//! loopback, the real enclave process, and N simulated devices — each with
//! its own token, keys, identity directory and data partition — running the
//! real device loop ([`qflare_edge::run_device`]) as concurrent clients.
//!
//! Nothing here bypasses the protocol: devices enroll with tokens, open
//! sessions, verify the enclave's attestation and the model certificate,
//! train, sign and seal their updates exactly as a separate machine would.

pub mod attack;
mod collusion;
pub mod crafted;
mod federation;

use std::path::{Path, PathBuf};

use anyhow::Context;
use qflare_edge::run::RoundTimings;
use qflare_enclave::AggregationConfig;
use qflare_ml::Architecture;
use qflare_protocol::federation::TrainingPlan;
use qflare_protocol::update_encoding::UpdateEncoding;

pub use self::attack::Attack;
pub use self::federation::Simulation;

/// How the training data is split among devices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DataSplit {
    /// IID: shuffled, equal shares.
    Iid,
    /// The FedAvg paper's pathological non-IID: 2 label-sorted shards of 300 each.
    Shards,
    /// Per-label Dirichlet proportions.
    Dirichlet(f64),
}

/// A simulation's settings.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Simulated devices.
    pub devices: usize,
    /// Aggregated rounds to run.
    pub rounds: u64,
    /// Devices per round.
    pub clients_per_round: usize,
    /// The model.
    pub architecture: Architecture,
    /// The data split.
    pub split: DataSplit,
    /// Cap on each device's examples (after the split).
    pub examples_per_device: Option<usize>,
    /// Local training.
    pub training: TrainingPlan,
    /// MNIST (or Fashion-MNIST) IDX directory.
    pub data_dir: PathBuf,
    /// Test examples each new model is evaluated on.
    pub eval_examples: usize,
    /// Malicious devices: `attackers` of them (the last ones) run `attack`.
    pub attack: Option<(usize, Attack)>,
    /// Defense and aggregator.
    pub aggregation: AggregationConfig,
    /// How to run the enclave: the executable and its leading arguments.
    pub enclave_program: PathBuf,
    /// Leading arguments (e.g. `["enclave"]` for the `qflare` binary).
    pub enclave_args: Vec<String>,
    /// Where the server keeps its state (a fresh directory).
    pub state_dir: PathBuf,
    /// Seconds a round stays open.
    pub round_timeout_secs: u64,
    /// Threads all devices' training shares.
    pub compute_threads: usize,
    /// Seed for the split and the initial model.
    pub seed: u64,
    /// The longest the server holds a device's poll until its round
    /// changes (`federation.long_poll_secs`); 0: answer every poll at once,
    /// devices then poll every second.
    pub long_poll_secs: u64,
    /// How devices encode their updates (`federation.update_encoding`).
    pub update_encoding: UpdateEncoding,
}

/// One round's row of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundRow {
    /// Round id.
    pub round_id: u64,
    /// `completed` or `failed`.
    pub state: String,
    /// Devices selected.
    pub selected: u32,
    /// Updates accepted by the enclave.
    pub accepted: usize,
    /// Updates rejected.
    pub rejected: usize,
    /// Rejection codes, in device order.
    pub rejections: Vec<String>,
    /// Test accuracy of the model the round produced.
    pub accuracy: Option<f64>,
    /// Test loss of that model.
    pub loss: Option<f64>,
    /// Seconds from opening to aggregation.
    pub seconds: f64,
    /// Sealed update bytes devices sent.
    pub bytes_sent: u64,
}

/// What a simulation measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimReport {
    /// One row per round.
    pub rounds: Vec<RoundRow>,
    /// Test accuracy of the initial model.
    pub initial_accuracy: Option<f64>,
    /// Test accuracy of the last model.
    pub final_accuracy: Option<f64>,
    /// Wall time of the training part, seconds.
    pub wall_seconds: f64,
    /// Device-side time per phase, summed over devices and rounds, seconds.
    pub device_seconds: PhaseSeconds,
    /// Time the server spent waiting on the enclave (submissions and aggregation), seconds.
    pub enclave_seconds: f64,
    /// Rounds to reach each requested accuracy target, if reached.
    pub rounds_to_target: Vec<(f64, Option<u64>)>,
}

/// Device time by phase.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PhaseSeconds {
    /// Handshakes.
    pub session: f64,
    /// Checking attestation reports.
    pub attestation: f64,
    /// Verifying model certificates.
    pub model_verify: f64,
    /// Signing and sealing updates.
    pub sealing: f64,
    /// Local training.
    pub training: f64,
    /// Everything (the wall time of the device's rounds).
    pub total: f64,
}

impl PhaseSeconds {
    fn add(&mut self, t: &RoundTimings) {
        self.session += t.session.as_secs_f64();
        self.attestation += t.attestation.as_secs_f64();
        self.model_verify += t.model_verify.as_secs_f64();
        self.sealing += t.sealing.as_secs_f64();
        self.training += t.training.as_secs_f64();
        self.total += t.wall.as_secs_f64();
    }

    /// Handshake, attestation, certificate and sealing time.
    pub fn cryptography(&self) -> f64 {
        self.session + self.attestation + self.model_verify + self.sealing
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `qflare` executable and the arguments that make it the enclave.
pub fn self_as_enclave() -> anyhow::Result<(PathBuf, Vec<String>)> {
    let exe = std::env::current_exe()?;
    let sibling = exe.with_file_name("qflare-enclave");
    if sibling.exists() {
        return Ok((sibling, Vec::new()));
    }
    Ok((exe, vec!["enclave".into()]))
}

/// Finds the MNIST directory: the flag, then `QFLARE_DATA_DIR`, `./data/mnist`, `./data`.
/// `command` is the subcommand whose `--data` flag named `flag` (e.g.
/// `qflare demo`): the library's message cannot know the flag, so the error
/// names it here.
pub fn find_data(flag: Option<&Path>, command: &str) -> anyhow::Result<PathBuf> {
    let source = qflare_ml::DataSource::from_env().with_explicit(flag.map(Path::to_path_buf));
    let located = source
        .locate(qflare_ml::DatasetKind::Mnist)
        .with_context(|| {
            format!(
                "no MNIST data for `{command}`: pass `{command} --data <DIR>` or set {}",
                qflare_ml::source::DATA_DIR_ENV
            )
        })?;
    Ok(located.dir)
}

/// Unix seconds now (for reports).
pub fn now() -> u64 {
    unix_now()
}
