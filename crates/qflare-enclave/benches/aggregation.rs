//! Aggregation throughput at the MNIST CNN size (1,663,370 parameters,
//! 6.65 MB per update) with 10, 100 and 1,000 updates, in bytes of update
//! data per second, beside a plain memory copy of the same bytes measured in
//! the same run as the yardstick.
//!
//! * `memcpy`: copy each update into one destination buffer.
//! * `fedavg_streaming`: what `RoundAggregator::submit` does per update in
//!   streaming mode (fused finiteness/norm scan and fold), then the mean.
//! * `fedavg_batch`, `trimmed_mean` (β = 0.1), `median`, `multi_krum`
//!   (f = ⌊(n − 3)/2⌋ capped at 10), `fltrust`: the buffered aggregators
//!   over n distinct resident updates.
//!
//! Streaming cycles through a pool of 48 distinct updates (320 MB, larger
//! than the last-level cache) instead of allocating 1,000. The buffered
//! aggregators need n distinct updates; 1,000 of them take 6.65 GB, so that
//! size is skipped when less than 12 GiB of memory is available (set
//! `QFLARE_BENCH_MAX_UPDATES` to lower the largest size). Multi-Krum is
//! O(n²·d): about 8·10¹¹ squared differences at n = 1,000, several minutes
//! per iteration here, so it runs at 10 and 100 only.
//!
//! Before the timings, the bench prints the peak bytes of update data that
//! `RoundAggregator` buffered: zero for streaming FedAvg at every n, n × 6.65
//! MB for a buffered aggregator.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use qflare_enclave::aggregate::{self, Layout, RunningSum};
use qflare_enclave::config::{AggregationConfig, AggregatorKind, DefenseConfig};
use qflare_enclave::round::{RoundAggregator, RoundSpec};
use qflare_enclave::validate::CandidateUpdate;
use qflare_protocol::identity::DeviceId;
use qflare_protocol::tensor::{Tensor, TensorMap};

/// The MNIST CNN of McMahan et al. (2017), PyTorch layout.
const CNN: [(&str, &[usize]); 8] = [
    ("conv1.weight", &[32, 1, 5, 5]),
    ("conv1.bias", &[32]),
    ("conv2.weight", &[64, 32, 5, 5]),
    ("conv2.bias", &[64]),
    ("fc1.weight", &[512, 3136]),
    ("fc1.bias", &[512]),
    ("fc2.weight", &[10, 512]),
    ("fc2.bias", &[10]),
];
const POOL: usize = 48;
const SIZES: [usize; 3] = [10, 100, 1000];

/// SplitMix64: fast, and good enough to make distinct benchmark data.
struct Mix(u64);

impl Mix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Uniform in [-1, 1).
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// An honest-looking delta: a shared direction plus per-device noise.
fn update(direction: &TensorMap, seed: u64) -> TensorMap {
    let mut rng = Mix(seed);
    let mut map = TensorMap::new();
    for (name, tensor) in direction.iter() {
        let data = tensor
            .data()
            .iter()
            .map(|&d| d + 0.5e-3 * rng.next_f32())
            .collect();
        map.insert(
            name,
            Tensor::new(tensor.shape().to_vec(), data).expect("shape"),
        )
        .expect("insert");
    }
    map
}

fn direction() -> TensorMap {
    let mut rng = Mix(7);
    let mut map = TensorMap::new();
    for (name, shape) in CNN {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| 1e-3 * rng.next_f32()).collect();
        map.insert(name, Tensor::new(shape.to_vec(), data).expect("shape"))
            .expect("insert");
    }
    map
}

fn available_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb * 1024)
}

fn device(i: usize) -> DeviceId {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
    DeviceId::from_bytes(bytes)
}

/// Runs real rounds to show where the memory goes.
fn report_buffered_bytes(global: &TensorMap, pool: &[TensorMap], largest: usize) {
    for (kind, defense, sizes) in [
        (AggregatorKind::FedAvg, DefenseConfig::off(), &SIZES[..]),
        (AggregatorKind::Median, DefenseConfig::off(), &SIZES[..2]),
    ] {
        for &n in sizes.iter().filter(|&&n| n <= largest) {
            let config = AggregationConfig {
                aggregator: kind,
                defense: defense.clone(),
                max_buffered_bytes: 16 << 30,
                ..AggregationConfig::default()
            };
            let mut round = RoundAggregator::new(RoundSpec {
                round_id: 1,
                base_model_version: 0,
                global: global.clone(),
                previous_global_update: None,
                trusted_reference: None,
                config,
                expected_participants: None,
            })
            .expect("round");
            for i in 0..n {
                round
                    .submit(CandidateUpdate {
                        device_id: device(i),
                        round_id: 1,
                        base_model_version: 0,
                        example_count: 600,
                        delta: pool[i % pool.len()].clone(),
                    })
                    .expect("submit");
            }
            let streaming = round.is_streaming();
            let result = round.finalize().expect("finalize");
            println!(
                "memory: {:<9} n = {n:>4}  streaming = {streaming:<5}  peak buffered bytes = {:>13}  accumulator bytes = {:>9}",
                kind.as_str(),
                result.stats.peak_buffered_bytes,
                result.stats.accumulator_bytes,
            );
        }
    }
}

fn bench(c: &mut Criterion) {
    let global = direction();
    let layout = Layout::of(&global);
    let bytes = layout.update_bytes();
    let largest_allowed = std::env::var("QFLARE_BENCH_MAX_UPDATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000usize);
    let memory_for_1000 = 1000 * bytes + (4 << 30);
    let largest_buffered = if available_bytes() >= memory_for_1000 + (1 << 30) {
        largest_allowed
    } else {
        println!("note: under 12 GiB available, buffered aggregators stop at 100 updates");
        largest_allowed.min(100)
    };
    let distinct = largest_buffered.max(POOL);
    let updates: Vec<TensorMap> = (0..distinct)
        .map(|i| update(&global, 1000 + i as u64))
        .collect();
    report_buffered_bytes(&global, &updates[..POOL], largest_allowed);

    let mut destination = vec![0f32; layout.num_parameters()];
    for n in SIZES.into_iter().filter(|&n| n <= largest_allowed) {
        let mut group = c.benchmark_group(format!("aggregation/n={n}"));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(300));
        group.measurement_time(Duration::from_secs(2));
        group.throughput(Throughput::Bytes(n as u64 * bytes));

        group.bench_function(BenchmarkId::from_parameter("memcpy"), |b| {
            b.iter(|| {
                for i in 0..n {
                    let mut offset = 0;
                    for (_, tensor) in updates[i % POOL].iter() {
                        let src = tensor.data();
                        destination[offset..offset + src.len()].copy_from_slice(src);
                        offset += src.len();
                    }
                    black_box(&mut destination);
                }
            })
        });

        group.bench_function(BenchmarkId::from_parameter("fedavg_streaming"), |b| {
            b.iter(|| {
                let mut sum = RunningSum::new(layout.clone());
                for i in 0..n {
                    sum.fold_scanned(&updates[i % POOL], 600.0, None, None, f64::INFINITY)
                        .expect("finite")
                        .commit();
                }
                black_box(sum.mean().expect("mean"))
            })
        });

        if n <= largest_buffered {
            let resident: Vec<&TensorMap> = updates[..n].iter().collect();
            let weights = vec![600.0; n];
            group.bench_function(BenchmarkId::from_parameter("fedavg_batch"), |b| {
                b.iter(|| {
                    black_box(aggregate::weighted_mean(&resident, &weights, &layout).expect("mean"))
                })
            });
            group.bench_function(BenchmarkId::from_parameter("trimmed_mean"), |b| {
                b.iter(|| {
                    black_box(aggregate::trimmed_mean(&resident, 0.1, &layout).expect("trimmed"))
                })
            });
            group.bench_function(BenchmarkId::from_parameter("median"), |b| {
                b.iter(|| {
                    black_box(aggregate::coordinate_median(&resident, &layout).expect("median"))
                })
            });
            if n <= 100 {
                let f = ((n - 3) / 2).min(10);
                group.bench_function(BenchmarkId::from_parameter("multi_krum"), |b| {
                    b.iter(|| {
                        black_box(aggregate::multi_krum(&resident, f, None, &layout).expect("krum"))
                    })
                });
            }
            group.bench_function(BenchmarkId::from_parameter("fltrust"), |b| {
                b.iter(|| {
                    black_box(aggregate::fltrust(&resident, &global, &layout).expect("fltrust"))
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
