//! `qflare bench privacy`: what central differential privacy costs in
//! accuracy. For each target ε, the noise multiplier that keeps --rounds
//! rounds at sampling rate q within it (at δ) is calibrated with the
//! server's accountant, and the MNIST 2NN is trained with DP-FedAvg exactly
//! as a private federation runs it: Poisson sampling of the devices each
//! round, and the enclave's own `RoundAggregator` with
//! `aggregation.privacy` (clip, weight 1, noise, fixed denominator). The
//! baseline row is the same sampling without DP (FedAvg, no clip). As in
//! `qflare bench attacks`, the transport is left out: it changes no weight.

use std::path::PathBuf;
use std::time::Instant;

use qflare_cli::sim;
use qflare_enclave::config::{AggregationConfig, AggregatorKind, DefenseConfig};
use qflare_enclave::privacy::PrivacyConfig;
use qflare_enclave::round::{RoundAggregator, RoundSpec};
use qflare_enclave::validate::CandidateUpdate;
use qflare_ml::{Architecture, Dataset, Partition, Split, TrainConfig};
use qflare_protocol::tensor::TensorMap;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::attacks::device_id;
use crate::commands::privacy::calibrate;

/// `qflare bench privacy` options.
#[derive(Debug, clap::Args)]
pub struct PrivacyArgs {
    /// Devices (N); MNIST's 60,000 training examples are split IID among them.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// q: each device's chance of taking part in a round.
    #[arg(long, default_value_t = 0.1)]
    pub sampling_rate: f64,
    /// Rounds per run.
    #[arg(long, default_value_t = 50)]
    pub rounds: u64,
    /// Target ε values, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,3,8")]
    pub epsilons: Vec<f64>,
    /// δ.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// C: every update is clipped to this L2 norm.
    #[arg(long, default_value_t = 0.5)]
    pub clip_norm: f64,
    /// SGD learning rate on the devices (E = 1, B = 10).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// MNIST directory.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Devices trained at once.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seed of the split, the sampling, the training and the noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs the benchmark.
pub async fn run(args: PrivacyArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(&args)).await?
}

fn run_blocking(args: &PrivacyArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.sampling_rate > 0.0 && args.sampling_rate <= 1.0,
        "--sampling-rate must be in (0, 1]"
    );
    qflare_ml::set_compute_threads(1)?;
    let data_dir = sim::find_data(args.data.as_deref(), "qflare bench privacy")?;
    let train = Dataset::load(&data_dir, Split::Train)?;
    let test = Dataset::load(&data_dir, Split::Test)?;
    let parts = qflare_ml::partition(train.labels(), args.devices, &Partition::Iid, args.seed)?
        .iter()
        .map(|part| train.subset(part))
        .collect::<qflare_ml::Result<Vec<_>>>()?;
    let initial = qflare_ml::initial_model(Architecture::Mnist2nn, args.seed)?;
    eprintln!(
        "DP-FedAvg: {} devices, q = {} ({:.0} expected per round), {} rounds, C = {}, δ = {}",
        args.devices,
        args.sampling_rate,
        args.sampling_rate * args.devices as f64,
        args.rounds,
        args.clip_norm,
        args.delta
    );
    println!(
        "| ε (δ = {:e}) | noise multiplier z | test accuracy after {} rounds | released noise std per coordinate |",
        args.delta, args.rounds
    );
    println!("|--:|--:|--:|--:|");
    let mut runs: Vec<Option<f64>> = vec![None];
    runs.extend(args.epsilons.iter().map(|&e| Some(e)));
    for target in runs {
        let started = Instant::now();
        let privacy = match target {
            Some(epsilon) => Some(PrivacyConfig {
                noise_multiplier: calibrate(epsilon, args.sampling_rate, args.rounds, args.delta)?,
                clip_norm: args.clip_norm,
                delta: args.delta,
                epsilon_budget: None,
            }),
            None => None,
        };
        let (accuracy, median_norm) = train_federation(args, &parts, &test, &initial, &privacy)?;
        let expected = args.sampling_rate * args.devices as f64;
        match &privacy {
            Some(p) => println!(
                "| {} | {:.3} | {:.2}% | {:.2e} |",
                target.unwrap_or_default(),
                p.noise_multiplier,
                100.0 * accuracy,
                p.noise_std() / expected
            ),
            None => println!("| ∞ (no DP) | – | {:.2}% | – |", 100.0 * accuracy),
        }
        eprintln!(
            "ε {}: {:.2}% in {:.0} s (median update norm {median_norm:.3})",
            target.map_or_else(|| "∞".to_owned(), |e| e.to_string()),
            100.0 * accuracy,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Trains `args.rounds` rounds; the final test accuracy and the median norm
/// of the updates (before clipping), which says whether C clips much.
fn train_federation(
    args: &PrivacyArgs,
    parts: &[Dataset],
    test: &Dataset,
    initial: &TensorMap,
    privacy: &Option<PrivacyConfig>,
) -> anyhow::Result<(f64, f64)> {
    let mut sampling = ChaCha20Rng::seed_from_u64(args.seed ^ 0x00d9_5a3e);
    let mut noise = ChaCha20Rng::seed_from_u64(args.seed ^ 0x0000_5eed);
    let expected = args.sampling_rate * parts.len() as f64;
    let config = AggregationConfig {
        aggregator: AggregatorKind::FedAvg,
        defense: DefenseConfig::off(),
        privacy: privacy.clone(),
        ..AggregationConfig::default()
    };
    let mut global = initial.clone();
    let mut norms = Vec::new();
    for round in 1..=args.rounds {
        let selected: Vec<usize> = (0..parts.len())
            .filter(|_| sampling.random_bool(args.sampling_rate))
            .collect();
        if selected.is_empty() {
            continue;
        }
        let updates = train_all(args, parts, &global, &selected, round)?;
        let mut aggregator = RoundAggregator::new(RoundSpec {
            round_id: round,
            base_model_version: round - 1,
            global: global.clone(),
            previous_global_update: None,
            trusted_reference: None,
            config: config.clone(),
            expected_participants: Some(expected),
        })?;
        for (&device, delta) in selected.iter().zip(updates) {
            norms.push(
                delta
                    .iter()
                    .flat_map(|(_, t)| t.data().iter())
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    .sqrt(),
            );
            aggregator.submit(CandidateUpdate {
                device_id: device_id(device),
                round_id: round,
                base_model_version: round - 1,
                example_count: parts[device].len() as u64,
                delta,
            })?;
        }
        global = aggregator
            .finalize_with_noise(&mut noise)
            .map_err(|failure| anyhow::anyhow!("round {round}: {failure}"))?
            .new_global;
    }
    let accuracy = qflare_ml::evaluate(Architecture::Mnist2nn, &global, test)?.accuracy;
    Ok((
        accuracy,
        qflare_enclave::defense::median(&norms).unwrap_or(0.0),
    ))
}

/// The selected devices' deltas, trained `threads` at a time.
fn train_all(
    args: &PrivacyArgs,
    parts: &[Dataset],
    global: &TensorMap,
    selected: &[usize],
    round: u64,
) -> anyhow::Result<Vec<TensorMap>> {
    let mut out = Vec::with_capacity(selected.len());
    for chunk in selected.chunks(args.threads.max(1)) {
        let trained = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&device| {
                    scope.spawn(move || -> anyhow::Result<TensorMap> {
                        let config = TrainConfig {
                            learning_rate: args.lr,
                            batch_size: 10,
                            epochs: 1,
                            seed: args.seed ^ round.rotate_left(20) ^ device as u64,
                        };
                        let outcome = qflare_ml::train(
                            Architecture::Mnist2nn,
                            global,
                            &parts[device],
                            &config,
                            None,
                        )?;
                        Ok(qflare_ml::delta(&outcome.weights, global)?)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a training thread panicked"))?
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        out.extend(trained);
    }
    Ok(out)
}
