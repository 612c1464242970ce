//! Helpers shared by the integration tests: small models, simulated honest
//! deltas and attacks, and plain reference implementations.

// Each test binary uses a different subset; tests panic on impossible errors.
#![allow(dead_code, clippy::unwrap_used)]

use qflare_enclave::config::AggregationConfig;
use qflare_enclave::round::{RoundAggregator, RoundSpec};
use qflare_enclave::validate::CandidateUpdate;
use qflare_protocol::identity::DeviceId;
use qflare_protocol::tensor::{Tensor, TensorMap};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

pub const ROUND: u64 = 7;
pub const VERSION: u64 = 6;

/// A small CNN-like layout (946 parameters).
pub const SHAPES: [(&str, &[usize]); 4] = [
    ("conv.bias", &[8]),
    ("conv.weight", &[8, 1, 6, 6]),
    ("fc.bias", &[10]),
    ("fc.weight", &[10, 64]),
];

pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// A standard normal sample (Box–Muller), so the tests need no extra crate.
pub fn gaussian(rng: &mut ChaCha20Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

pub fn map_from_flat(shapes: &[(&str, &[usize])], flat: &[f32]) -> TensorMap {
    let mut map = TensorMap::new();
    let mut offset = 0;
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        map.insert(
            *name,
            Tensor::new(shape.to_vec(), flat[offset..offset + n].to_vec()).unwrap(),
        )
        .unwrap();
        offset += n;
    }
    assert_eq!(offset, flat.len());
    map
}

pub fn parameters() -> usize {
    SHAPES
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

pub fn global_model(seed: u64) -> TensorMap {
    let mut r = rng(seed);
    let flat: Vec<f32> = (0..parameters())
        .map(|_| (0.1 * gaussian(&mut r)) as f32)
        .collect();
    map_from_flat(&SHAPES, &flat)
}

/// A unit vector: the descent direction honest devices share this round.
pub fn direction(seed: u64) -> Vec<f64> {
    let mut r = rng(seed);
    let v: Vec<f64> = (0..parameters()).map(|_| gaussian(&mut r)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

/// An honest delta: the shared direction plus device noise (about half the
/// signal's length, so cos with the direction ≈ 0.9), scaled by
/// sqrt(examples / 600) because more local steps move the weights further.
pub fn honest_delta(direction: &[f64], examples: u64, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    let sigma = 0.5 / (direction.len() as f64).sqrt();
    let scale = (examples as f64 / 600.0).sqrt();
    direction
        .iter()
        .map(|&d| (scale * (d + sigma * gaussian(&mut r))) as f32)
        .collect()
}

pub fn device(i: u8) -> DeviceId {
    DeviceId::from_bytes([i; 16])
}

pub fn candidate(id: u8, examples: u64, flat: &[f32]) -> CandidateUpdate {
    CandidateUpdate {
        device_id: device(id),
        round_id: ROUND,
        base_model_version: VERSION,
        example_count: examples,
        delta: map_from_flat(&SHAPES, flat),
    }
}

/// The reject rules before FedAvg (`reject_outliers`), the default until
/// centered clipping: what most of these tests exercise.
pub fn reject_rules() -> AggregationConfig {
    AggregationConfig {
        aggregator: qflare_enclave::config::AggregatorKind::FedAvg,
        defense: qflare_enclave::config::DefenseConfig::reject_outliers(),
        ..AggregationConfig::default()
    }
}

pub fn spec(config: AggregationConfig, global: TensorMap) -> RoundSpec {
    RoundSpec {
        round_id: ROUND,
        base_model_version: VERSION,
        global,
        previous_global_update: None,
        trusted_reference: None,
        config,
        expected_participants: None,
    }
}

pub fn round(config: AggregationConfig) -> RoundAggregator {
    RoundAggregator::new(spec(config, global_model(1))).unwrap()
}

pub fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

pub fn to_f64(map: &TensorMap) -> Vec<f64> {
    map.to_flat().into_iter().map(f64::from).collect()
}

/// ‖a − b‖ / ‖b‖.
pub fn relative_distance(a: &[f64], b: &[f64]) -> f64 {
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&diff) / norm(b)
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (norm(a) * norm(b))
}

/// Σ wᵢxᵢ / Σ wᵢ in f64.
pub fn naive_weighted_mean(updates: &[Vec<f32>], weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    let mut out = vec![0.0; updates[0].len()];
    for (u, &w) in updates.iter().zip(weights) {
        for (o, &x) in out.iter_mut().zip(u) {
            *o += w * f64::from(x);
        }
    }
    out.into_iter().map(|s| s / total).collect()
}
