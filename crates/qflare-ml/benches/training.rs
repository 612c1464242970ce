//! Local training throughput on real MNIST: the 2NN and the CNN at batch
//! size 10 (FedAvg's B), one epoch over a small slice per iteration.
//!
//! Needs the data (`QFLARE_DATA_DIR=/path/to/mnist`, else `./data/`, which
//! for a bench is `crates/qflare-ml/data/`: cargo runs benches in the
//! package directory); it never downloads, and without the data the benchmark
//! prints a skip line and measures nothing. From the repository root, after
//! `qflare demo` has downloaded MNIST into `./data/mnist`:
//!
//! ```text
//! QFLARE_DATA_DIR=$PWD/data/mnist cargo bench -p qflare-ml --bench training
//! ```
//!
//! Criterion reports time per iteration and, through `Throughput::Elements`,
//! samples per second.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qflare_ml::{
    Architecture, DataSource, Dataset, Download, Split, TrainConfig, compute_threads,
    initial_model, train,
};

/// Examples per training iteration for each architecture: enough for a
/// stable rate, few enough that ten samples take well under a minute.
const SLICES: [(Architecture, usize); 2] = [
    (Architecture::Mnist2nn, 2_000),
    (Architecture::MnistCnn, 100),
];

fn load() -> Option<Dataset> {
    let source = DataSource::from_env().with_download(Download::Never);
    match source.locate(qflare_ml::DatasetKind::Mnist) {
        Ok(found) => match found.load(Split::Train) {
            Ok(data) => Some(data),
            Err(e) => {
                eprintln!("skipping training benchmark: {e}");
                None
            }
        },
        Err(_) => {
            eprintln!("skipping training benchmark: set QFLARE_DATA_DIR to the MNIST directory");
            None
        }
    }
}

fn training(c: &mut Criterion) {
    let Some(data) = load() else { return };
    let config = TrainConfig {
        learning_rate: 0.05,
        batch_size: 10,
        epochs: 1,
        seed: 1,
    };
    let mut group = c.benchmark_group(format!("train_b10_{}threads", compute_threads()));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    for (arch, n) in SLICES {
        let slice = data.head(n);
        let global = initial_model(arch, 0).expect("initial model");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(arch.id(), |b| {
            b.iter(|| black_box(train(arch, &global, &slice, &config, None).expect("training")));
        });
    }
    group.finish();
}

criterion_group!(benches, training);
criterion_main!(benches);
