//! Trains one model on a slice of real MNIST and reports speed and accuracy.
//!
//! ```text
//! cargo run --release -p qflare-ml --example train_mnist -- \
//!     --arch mnist-2nn --examples 60000 --test-examples 10000 --epochs 1 --batch 10 --lr 0.05 --threads 2
//! ```
//!
//! Every flag is optional; the values above are the defaults. `--test-stride N`
//! evaluates on every Nth test example (up to `--test-examples`) instead of
//! the first ones, `--seed` seeds the shuffle and `--init-seed` the initial
//! weights. The data are
//! found as the library finds them (flag `--data-dir`, `QFLARE_DATA_DIR`,
//! `./data/`, `/usr/share/datasets/`), without downloading unless
//! `--download` is given (into `./data/mnist`, where `qflare demo` also
//! downloads it).

use std::path::PathBuf;
use std::time::Instant;

use qflare_ml::{
    Architecture, DataSource, DatasetKind, Download, Split, TrainConfig, evaluate, initial_model,
    set_compute_threads, train,
};

struct Args {
    arch: Architecture,
    dataset: DatasetKind,
    data_dir: Option<PathBuf>,
    download: bool,
    examples: usize,
    test_examples: usize,
    test_stride: usize,
    threads: usize,
    config: TrainConfig,
    init_seed: u64,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        arch: Architecture::Mnist2nn,
        dataset: DatasetKind::Mnist,
        data_dir: None,
        download: false,
        examples: 60_000,
        test_examples: 10_000,
        test_stride: 1,
        threads: 2,
        config: TrainConfig::default(),
        init_seed: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--download" {
            args.download = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--arch" => args.arch = value.parse().map_err(|e| bad(&e))?,
            "--dataset" => args.dataset = value.parse().map_err(|e| bad(&e))?,
            "--data-dir" => args.data_dir = Some(PathBuf::from(&value)),
            "--examples" => args.examples = value.parse().map_err(|e| bad(&e))?,
            "--test-examples" => args.test_examples = value.parse().map_err(|e| bad(&e))?,
            "--test-stride" => args.test_stride = value.parse().map_err(|e| bad(&e))?,
            "--threads" => args.threads = value.parse().map_err(|e| bad(&e))?,
            "--epochs" => args.config.epochs = value.parse().map_err(|e| bad(&e))?,
            "--batch" => args.config.batch_size = value.parse().map_err(|e| bad(&e))?,
            "--lr" => args.config.learning_rate = value.parse().map_err(|e| bad(&e))?,
            "--seed" => args.config.seed = value.parse().map_err(|e| bad(&e))?,
            "--init-seed" => args.init_seed = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse()?;
    set_compute_threads(args.threads)?;
    let download = if args.download {
        Download::CanonicalMirror
    } else {
        Download::Never
    };
    let found = DataSource::from_env()
        .with_explicit(args.data_dir)
        .with_download(download)
        .locate(args.dataset)
        .map_err(|e| format!("{e}\nThis example takes the directory as --data-dir <DIR>."))?;
    let train_set = found.load(Split::Train)?.head(args.examples);
    let test_all = found.load(Split::Test)?;
    let picked: Vec<usize> = (0..test_all.len())
        .step_by(args.test_stride.max(1))
        .take(args.test_examples)
        .collect();
    let test_set = test_all.subset(&picked)?;
    let global = initial_model(args.arch, args.init_seed)?;
    println!(
        "{} on {} {} examples ({}), {} epoch(s), B={}, lr {}, {} thread(s)",
        args.arch,
        train_set.len(),
        args.dataset,
        found.dir.display(),
        args.config.epochs,
        args.config.batch_size,
        args.config.learning_rate,
        args.threads
    );
    let started = Instant::now();
    let outcome = train(args.arch, &global, &train_set, &args.config, None)?;
    let seconds = started.elapsed().as_secs_f64();
    let samples = (train_set.len() * args.config.epochs) as f64;
    let metrics = evaluate(args.arch, &outcome.weights, &test_set)?;
    println!(
        "trained in {seconds:.2} s ({:.0} samples/s), mean train loss {:.4}",
        samples / seconds,
        outcome.mean_loss
    );
    println!(
        "test: accuracy {:.2}% loss {:.4} on {} examples",
        100.0 * metrics.accuracy,
        metrics.loss,
        metrics.examples
    );
    Ok(())
}
