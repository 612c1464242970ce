//! `qflare bench attacks`: the attack table of issue 14. For every data
//! split, every attack (and none) and every aggregation column, train a
//! federation for a fixed number of rounds and report the final test
//! accuracy and the share of honest and malicious updates rejected.
//!
//! # What runs, and what does not
//!
//! The devices' training ([`qflare_ml::train`]), the attacks
//! ([`Attack::craft`], [`attack::tamper`]) and the round — validation,
//! defense, aggregator — ([`RoundAggregator`], the same value the enclave
//! process builds for each round) are the real code. What the table leaves
//! out is the transport: enrollment, sessions, sealing, signatures and the
//! enclave's process boundary, none of which changes a single weight (the
//! enclave opens exactly the update the device sealed). Going through them
//! would cost about 20 hours of this machine for the ~200 cells; `qflare
//! demo --attack` runs any one cell through the whole stack.
//!
//! Every cell of a split sees the same partition, the same devices selected
//! in each round, the same malicious devices and the same training seeds, so
//! the columns of a row differ only by the aggregation.
//!
//! The columns (each an `AggregationConfig`) are in `attacks/columns.rs`;
//! the rows, one federation's round loop and the table printing are here,
//! one experiment read top to bottom.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use qflare_cli::sim::{self, Attack, attack};
use qflare_enclave::config::{AggregationConfig, AggregatorKind};
use qflare_enclave::round::{RoundAggregator, RoundSpec};
use qflare_enclave::validate::CandidateUpdate;
use qflare_enclave::verdict::VerdictReason;
use qflare_ml::{Architecture, Dataset, Partition, Split, TrainConfig};
use qflare_protocol::identity::{DEVICE_ID_LEN, DeviceId};
use qflare_protocol::tensor::TensorMap;
use rand::SeedableRng;
use rand::seq::SliceRandom;

mod columns;

pub use columns::Column;
use columns::custom_column;

/// A data split of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    /// Shuffled, 600 examples per device.
    Iid,
    /// Per-label Dirichlet(α = 0.5) proportions.
    Dirichlet,
}

/// The table's rows: no attack, then the ten attacks.
const ROWS: &[Option<Attack>] = &[
    None,
    Some(Attack::SignFlip),
    Some(Attack::Scale(10.0)),
    Some(Attack::GaussianNoise(0.1)),
    Some(Attack::LabelFlip),
    Some(Attack::Alie),
    Some(Attack::Ipm(0.5)),
    Some(Attack::Ipm(100.0)),
    Some(Attack::MinMax),
    Some(Attack::MinSum),
    Some(Attack::Fang),
];

/// `qflare bench attacks` options.
#[derive(Debug, clap::Args)]
pub struct AttacksArgs {
    /// Devices (K).
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Devices selected per round, uniformly at random.
    #[arg(long, default_value_t = 20)]
    pub per_round: usize,
    /// Share of the devices that are malicious (the last ones).
    #[arg(long, default_value_t = 0.2)]
    pub malicious: f64,
    /// Rounds per cell.
    #[arg(long, default_value_t = 30)]
    pub rounds: u64,
    /// Data splits, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "iid,dirichlet"
    )]
    pub splits: Vec<SplitArg>,
    /// Columns, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fedavg,default,reject,trimmed-mean,median,multi-krum,fltrust"
    )]
    pub columns: Vec<Column>,
    /// More columns: an `aggregation` section as YAML (the format of
    /// `config/global_config.yaml`'s), one column per file, named by the
    /// file's stem. Repeatable; how to try a configuration of your own.
    #[arg(long = "aggregation", value_name = "FILE")]
    pub aggregation_files: Vec<PathBuf>,
    /// Rows, comma-separated attack names as for `qflare demo --attack`
    /// (`none` for the clean run); default: all eleven.
    #[arg(long, value_delimiter = ',')]
    pub attacks: Option<Vec<String>>,
    /// SGD learning rate (E = 1, B = 10).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// FLTrust's root data set: this many training examples drawn at random.
    #[arg(long, default_value_t = 100)]
    pub root_examples: usize,
    /// MNIST directory.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Devices trained at once.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seed of the partition, the selection and the training.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write every cell as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One cell's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cell {
    split: String,
    attack: String,
    column: String,
    accuracy: f64,
    honest_submitted: usize,
    honest_rejected: usize,
    malicious_submitted: usize,
    malicious_rejected: usize,
    failed_rounds: u64,
    /// Honest devices selected whose training diverged (no update sent).
    diverged: usize,
    seconds: f64,
}

impl Cell {
    fn honest_rejected_share(&self) -> f64 {
        self.honest_rejected as f64 / self.honest_submitted.max(1) as f64
    }
}

/// Everything a split's cells share.
struct Federation {
    parts: Vec<Dataset>,
    flipped: Vec<Dataset>,
    root: Dataset,
    test: Dataset,
    initial: TensorMap,
    /// Devices selected in each round, in ascending order.
    selections: Vec<Vec<usize>>,
    first_malicious: usize,
    train: TrainConfig,
    threads: usize,
    seed: u64,
}

/// Runs the table.
pub async fn run(args: AttacksArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(&args)).await?
}

fn run_blocking(args: &AttacksArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=args.devices).contains(&args.per_round),
        "--per-round must be in 1..=--devices"
    );
    anyhow::ensure!(
        (0.0..0.5).contains(&args.malicious),
        "--malicious must be in [0, 0.5)"
    );
    let rows: Vec<Option<Attack>> = match &args.attacks {
        None => ROWS.to_vec(),
        Some(names) => names
            .iter()
            .map(|name| match name.as_str() {
                "none" => Ok(None),
                other => other
                    .parse::<Attack>()
                    .map(Some)
                    .map_err(anyhow::Error::msg),
            })
            .collect::<anyhow::Result<_>>()?,
    };
    qflare_ml::set_compute_threads(1)?;
    let data_dir = sim::find_data(args.data.as_deref(), "qflare bench attacks")?;
    let train = Dataset::load(&data_dir, Split::Train)?;
    let test = Dataset::load(&data_dir, Split::Test)?;
    let malicious_devices = (args.malicious * args.devices as f64).round() as usize;
    eprintln!(
        "attack table: {} devices, {} per round, {malicious_devices} malicious, {} rounds, lr {}; \
         {} rows × {} columns × {} splits",
        args.devices,
        args.per_round,
        args.rounds,
        args.lr,
        rows.len(),
        args.columns.len() + args.aggregation_files.len(),
        args.splits.len()
    );
    let mut columns: Vec<(String, AggregationConfig)> = args
        .columns
        .iter()
        .map(|&c| {
            (
                c.name().to_owned(),
                c.config(args.malicious, args.per_round),
            )
        })
        .collect();
    for path in &args.aggregation_files {
        columns.push(custom_column(path)?);
    }
    let mut cells = Vec::new();
    let started = Instant::now();
    for &split in &args.splits {
        let federation = Federation::new(args, &train, &test, split, malicious_devices)?;
        for &row in &rows {
            for (name, config) in &columns {
                let cell = federation.run_cell(args, split, row, name, config)?;
                eprintln!(
                    "{:?} | {:<18} | {:<26} | {:6.2}% | honest rejected {}/{} | malicious rejected {}/{} | diverged {} | failed rounds {} | {:.0} s ({:.0} s in all)",
                    split,
                    cell.attack,
                    cell.column,
                    100.0 * cell.accuracy,
                    cell.honest_rejected,
                    cell.honest_submitted,
                    cell.malicious_rejected,
                    cell.malicious_submitted,
                    cell.diverged,
                    cell.failed_rounds,
                    cell.seconds,
                    started.elapsed().as_secs_f64()
                );
                cells.push(cell);
            }
        }
    }
    print_tables(args, &cells);
    if let Some(path) = &args.json {
        let summary = serde_json::json!({
            "devices": args.devices,
            "per_round": args.per_round,
            "malicious_devices": malicious_devices,
            "rounds": args.rounds,
            "learning_rate": args.lr,
            "root_examples": args.root_examples,
            "seed": args.seed,
            "cells": cells,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

impl Federation {
    fn new(
        args: &AttacksArgs,
        train: &Dataset,
        test: &Dataset,
        split: SplitArg,
        malicious_devices: usize,
    ) -> anyhow::Result<Self> {
        let scheme = match split {
            SplitArg::Iid => Partition::Iid,
            SplitArg::Dirichlet => Partition::Dirichlet { alpha: 0.5 },
        };
        let indices = qflare_ml::partition(train.labels(), args.devices, &scheme, args.seed)?;
        let parts = indices
            .iter()
            .map(|part| train.subset(part))
            .collect::<qflare_ml::Result<Vec<_>>>()?;
        let flipped = parts
            .iter()
            .map(attack::flip_labels)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(args.seed ^ 0x005e_1ec7);
        let mut all: Vec<usize> = (0..train.len()).collect();
        all.shuffle(&mut rng);
        let root = train.subset(&all[..args.root_examples.min(all.len())])?;
        let selections = (0..args.rounds)
            .map(|_| {
                let mut pool: Vec<usize> = (0..args.devices).collect();
                pool.shuffle(&mut rng);
                let mut chosen = pool[..args.per_round].to_vec();
                chosen.sort_unstable();
                chosen
            })
            .collect();
        Ok(Self {
            parts,
            flipped,
            root,
            test: test.clone(),
            initial: qflare_ml::initial_model(Architecture::Mnist2nn, args.seed)?,
            selections,
            first_malicious: args.devices - malicious_devices,
            train: TrainConfig {
                learning_rate: args.lr,
                batch_size: 10,
                epochs: 1,
                seed: 0,
            },
            threads: args.threads.max(1),
            seed: args.seed,
        })
    }

    fn is_malicious(&self, device: usize) -> bool {
        device >= self.first_malicious
    }

    /// Trains `device` from `global` on `data`: the delta.
    fn local_update(
        &self,
        global: &TensorMap,
        data: &Dataset,
        device: usize,
        round: u64,
    ) -> anyhow::Result<TensorMap> {
        let config = TrainConfig {
            seed: self.seed ^ round.rotate_left(20) ^ device as u64,
            ..self.train.clone()
        };
        let outcome = qflare_ml::train(Architecture::Mnist2nn, global, data, &config, None)?;
        Ok(qflare_ml::delta(&outcome.weights, global)?)
    }

    /// Every selected device's update for one round, in device order.
    fn round_updates(
        &self,
        global: &TensorMap,
        round: u64,
        attack: Option<Attack>,
    ) -> anyhow::Result<Vec<(usize, TensorMap)>> {
        let selected = &self.selections[(round - 1) as usize];
        let crafted = attack.is_some_and(Attack::is_crafted);
        // Crafted attackers send only what they craft: they need not train.
        let trained: Vec<usize> = selected
            .iter()
            .copied()
            .filter(|&d| !(crafted && self.is_malicious(d)))
            .collect();
        let mut updates: BTreeMap<usize, TensorMap> = BTreeMap::new();
        for chunk in trained.chunks(self.threads) {
            let results = std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|&device| {
                        let data = if attack == Some(Attack::LabelFlip) && self.is_malicious(device)
                        {
                            &self.flipped[device]
                        } else {
                            &self.parts[device]
                        };
                        scope.spawn(move || self.local_update(global, data, device, round))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .map_err(|_| anyhow::anyhow!("a training thread panicked"))
                    })
                    .collect::<anyhow::Result<Vec<anyhow::Result<TensorMap>>>>()
            })?;
            // A device whose training diverges (a poisoned global model can
            // make every loss NaN) sends nothing, as the real device would.
            for (&device, result) in chunk.iter().zip(results) {
                match result {
                    Ok(update) => {
                        updates.insert(device, update);
                    }
                    Err(err) if is_divergence(&err) => {}
                    Err(err) => return Err(err),
                }
            }
        }
        let attackers: Vec<usize> = selected
            .iter()
            .copied()
            .filter(|&d| self.is_malicious(d))
            .collect();
        match attack {
            Some(kind) if crafted && !attackers.is_empty() && !updates.is_empty() => {
                let honest: Vec<Vec<f32>> = updates.values().map(TensorMap::to_flat).collect();
                let seed = self.seed ^ round.rotate_left(32);
                let update = kind.craft(&honest, selected.len(), attackers.len(), seed)?;
                let update = global.with_flat(&update)?;
                for &device in &attackers {
                    updates.insert(device, update.clone());
                }
            }
            Some(kind) => {
                if let Some(hook) = attack::tamper(kind, self.seed ^ round) {
                    for &device in &attackers {
                        if let Some(update) = updates.remove(&device) {
                            updates.insert(device, hook(round, update));
                        }
                    }
                }
            }
            None => {}
        }
        Ok(updates.into_iter().collect())
    }

    fn run_cell(
        &self,
        args: &AttacksArgs,
        split: SplitArg,
        attack: Option<Attack>,
        column: &str,
        config: &AggregationConfig,
    ) -> anyhow::Result<Cell> {
        let started = Instant::now();
        let mut global = self.initial.clone();
        let mut previous: Option<TensorMap> = None;
        let mut cell = Cell {
            split: format!("{split:?}"),
            attack: attack.map_or_else(|| "none".to_owned(), |a| a.to_string()),
            column: column.to_owned(),
            accuracy: 0.0,
            honest_submitted: 0,
            honest_rejected: 0,
            malicious_submitted: 0,
            malicious_rejected: 0,
            failed_rounds: 0,
            diverged: 0,
            seconds: 0.0,
        };
        for round in 1..=args.rounds {
            let updates = self.round_updates(&global, round, attack)?;
            cell.diverged += self.selections[(round - 1) as usize].len() - updates.len();
            let trusted_reference = if config.aggregator == AggregatorKind::Fltrust {
                let outcome = qflare_ml::train(
                    Architecture::Mnist2nn,
                    &global,
                    &self.root,
                    &self.train,
                    None,
                )?;
                Some(qflare_ml::delta(&outcome.weights, &global)?)
            } else {
                None
            };
            let mut aggregator = RoundAggregator::new(RoundSpec {
                round_id: round,
                base_model_version: round - 1,
                global: global.clone(),
                previous_global_update: previous.take(),
                trusted_reference,
                config: config.clone(),
                expected_participants: None,
            })?;
            let mut devices = BTreeMap::new();
            for (device, delta) in updates {
                let id = device_id(device);
                devices.insert(id, device);
                aggregator.submit(CandidateUpdate {
                    device_id: id,
                    round_id: round,
                    base_model_version: round - 1,
                    example_count: self.parts[device].len() as u64,
                    delta,
                })?;
            }
            if devices.is_empty() {
                cell.failed_rounds += 1;
                continue;
            }
            let (verdicts, outcome) = match aggregator.finalize() {
                Ok(result) => (
                    result.verdicts,
                    Some((result.new_global, result.aggregated_update)),
                ),
                Err(failure) => (failure.verdicts, None),
            };
            for verdict in &verdicts {
                let device = devices
                    .get(&verdict.device_id)
                    .copied()
                    .context("a verdict for a device that did not submit")?;
                let rejected = !matches!(
                    verdict.reason,
                    VerdictReason::Accepted | VerdictReason::Clipped
                );
                let malicious = attack.is_some() && self.is_malicious(device);
                if malicious {
                    cell.malicious_submitted += 1;
                    cell.malicious_rejected += usize::from(rejected);
                } else {
                    cell.honest_submitted += 1;
                    cell.honest_rejected += usize::from(rejected);
                }
            }
            match outcome {
                Some((new_global, aggregated_update)) => {
                    global = new_global;
                    previous = Some(aggregated_update);
                }
                None => cell.failed_rounds += 1,
            }
        }
        cell.accuracy = qflare_ml::evaluate(Architecture::Mnist2nn, &global, &self.test)?.accuracy;
        cell.seconds = started.elapsed().as_secs_f64();
        Ok(cell)
    }
}

fn is_divergence(err: &anyhow::Error) -> bool {
    matches!(
        err.downcast_ref::<qflare_ml::MlError>(),
        Some(qflare_ml::MlError::Diverged { .. })
    )
}

/// A device id that encodes the device's index (the benches' devices).
pub(super) fn device_id(device: usize) -> DeviceId {
    let mut bytes = [0u8; DEVICE_ID_LEN];
    bytes[..8].copy_from_slice(&(device as u64).to_be_bytes());
    DeviceId::from_bytes(bytes)
}

/// One markdown table per split: accuracy, and under it the honest share
/// rejected, for every row and column.
fn print_tables(args: &AttacksArgs, cells: &[Cell]) {
    let splits: Vec<&str> = dedup(cells.iter().map(|c| c.split.as_str()));
    let attacks: Vec<&str> = dedup(cells.iter().map(|c| c.attack.as_str()));
    let columns: Vec<&str> = dedup(cells.iter().map(|c| c.column.as_str()));
    for split in splits {
        println!(
            "\n### {split}: test accuracy after {} rounds (honest updates rejected)\n",
            args.rounds
        );
        println!("| attack | {} |", columns.join(" | "));
        println!("|---|{}", "--:|".repeat(columns.len()));
        for attack in &attacks {
            let row: Vec<String> = columns
                .iter()
                .map(|column| {
                    cells
                        .iter()
                        .find(|c| c.split == split && c.attack == *attack && c.column == *column)
                        .map_or_else(
                            || "–".to_owned(),
                            |c| {
                                format!(
                                    "{:.2}% ({:.1}%)",
                                    100.0 * c.accuracy,
                                    100.0 * c.honest_rejected_share()
                                )
                            },
                        )
                })
                .collect();
            println!("| {attack} | {} |", row.join(" | "));
        }
    }
}

fn dedup<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = Vec::new();
    for item in items {
        if !seen.contains(&item) {
            seen.push(item);
        }
    }
    seen
}
