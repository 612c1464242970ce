//! The aggregators: how accepted updates become one update.
//!
//! All of them are pure functions of the updates (tensor maps of one
//! [`Layout`]) and return a tensor map of that layout. Ties break by arrival
//! order, so no randomness is needed.
//!
//! | aggregator | rule | weighting | reference |
//! |---|---|---|---|
//! | FedAvg | Σ nᵢΔᵢ / Σ nᵢ | example count nᵢ | McMahan et al., *Communication-Efficient Learning of Deep Networks from Decentralized Data*, AISTATS 2017 |
//! | trimmed mean | per coordinate, drop the ⌊β·n⌋ lowest and highest, average the rest | none | Yin et al., *Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates*, ICML 2018 |
//! | median | per coordinate, the median (mean of the two middle values for even n) | none | Yin et al., 2018 |
//! | Multi-Krum | score(i) = Σ of the n − f − 2 smallest ‖Δᵢ − Δⱼ‖²; average the m lowest-scored | none (plain mean of the m) | Blanchard et al., *Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent*, NeurIPS 2017 |
//! | FLTrust | tᵢ = ReLU(cos(Δᵢ, g₀)); Σ tᵢ·(‖g₀‖/‖Δᵢ‖)·Δᵢ / Σ tᵢ | trust score tᵢ | Cao et al., *FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping*, NDSS 2021 |
//! | centered clipping | from v = the coordinate-wise median, L times v ← v + (1/n) Σ (Δᵢ − v)·min(1, τ/‖Δᵢ − v‖), τ = k × median ‖Δᵢ − median‖ | none (each offset clipped) | Karimireddy, He & Jaggi, *Learning from History for Byzantine Robust Optimization*, ICML 2021 |
//!
//! The robust aggregators ignore example counts on purpose: a count is the
//! device's unverifiable claim, and weighting by it would let one attacker
//! claim the cap and dominate the very statistic meant to resist it.
//!
//! # Numerics and memory
//!
//! FedAvg accumulates `f32` products in groups of [`GROUP`] updates and
//! carries the group sums in `f64`: an `f32` accumulator moves half the bytes
//! of an `f64` one (the fold is memory-bound), while the `f64` carry keeps
//! the error of a 1,000-update round at the level of a 32-update one
//! (≲ 32·2⁻²⁴ relative, typically far less). [`RunningSum`] does this as
//! updates arrive (memory: the model size, whatever the number of updates);
//! [`weighted_mean`] does the same operations in the same order over
//! buffered updates, so both give identical bits.
//!
//! The median and trimmed mean work on blocks of coordinates that fit in
//! cache. Up to 512 updates they copy the block's rows and run a pruned
//! Batcher sorting network whose comparators are element-wise min/max of two
//! rows: branch-free and vectorized across coordinates. Above that they
//! transpose the block so each coordinate's n values are contiguous, map
//! them to integers in IEEE total order, and select with
//! `select_nth_unstable` (linear time, no full sort). Multi-Krum computes
//! the n(n − 1)/2 distances block by block so that each block of all n
//! updates stays in cache; it is O(n²·d).
//!
//! # Files
//!
//! * `mod.rs` (this file): the re-exports that make up the public API, and
//!   small helpers on whole tensor maps ([`cosine`], scaling, wiping).
//! * `layout.rs`: [`Layout`], the names and shapes every aggregator checks
//!   its inputs against and builds its output from.
//! * `fedavg.rs`: FedAvg, streaming ([`RunningSum`], [`Tentative`]) and
//!   buffered ([`weighted_mean`]) with identical bits.
//! * `coordinate_wise.rs`: the median and the trimmed mean (sorting network
//!   or selection).
//! * `krum.rs`: Multi-Krum.
//! * `fltrust.rs`: FLTrust.
//! * `centered_clipping.rs`: centered clipping, the default.
//! * `mixing.rs`: nearest-neighbour mixing, an optional step before a
//!   robust aggregator that shrinks the honest spread on non-IID data.

use qflare_protocol::tensor::TensorMap;
use zeroize::Zeroize;

mod centered_clipping;
mod coordinate_wise;
mod fedavg;
mod fltrust;
mod krum;
mod layout;
mod mixing;

pub use centered_clipping::{CenteredClippingOutcome, centered_clipping};
pub use coordinate_wise::{coordinate_median, trimmed_mean};
pub(crate) use fedavg::linear_combination;
pub use fedavg::{GROUP, RunningSum, Tentative, weighted_mean};
pub use fltrust::{FltrustOutcome, fltrust};
pub(crate) use fltrust::{fltrust_combine, trust_scores};
pub use krum::{KrumOutcome, KrumSelection, krum_select, multi_krum};
pub use layout::Layout;
pub use mixing::nearest_neighbor_mixing;

/// cos(a, b) from a·b and the norms; 0 when either vector is zero (it has
/// no direction, so it neither agrees nor disagrees).
pub fn cosine(dot: f64, norm_a: f64, norm_b: f64) -> f64 {
    if norm_a > 0.0 && norm_b > 0.0 {
        (dot / (norm_a * norm_b)).clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

/// Scales every value of `map` by `factor` in place (norm clipping).
pub(crate) fn scale_in_place(map: &mut TensorMap, factor: f32) {
    for (_, tensor) in map.iter_mut() {
        for v in tensor.data_mut() {
            *v *= factor;
        }
    }
}

/// Zeroizes a scratch map (used for intermediate aggregates built from few
/// updates, such as a round median reference).
pub(crate) fn wipe(map: &mut TensorMap) {
    for (_, tensor) in map.iter_mut() {
        tensor.data_mut().zeroize();
    }
}

/// Helpers shared by the aggregators' unit tests.
#[cfg(test)]
mod test_support {
    use qflare_protocol::tensor::{Tensor, TensorMap};

    /// A map of two tensors, "a" (the first two values) and "b" (the rest).
    pub(super) fn map(values: &[f32]) -> TensorMap {
        let mut m = TensorMap::new();
        m.insert("a", Tensor::new(vec![2], values[..2].to_vec()).unwrap())
            .unwrap();
        m.insert(
            "b",
            Tensor::new(vec![values.len() - 2], values[2..].to_vec()).unwrap(),
        )
        .unwrap();
        m
    }
}
