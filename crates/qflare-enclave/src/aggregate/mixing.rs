//! Nearest-neighbour mixing (NNM; Allouah, Farhadkhani, Guerraoui, Gupta,
//! Pinot and Stephan, *Fixing by Mixing: A Recipe for Optimal Byzantine ML
//! under Heterogeneity*, AISTATS 2023): before a robust aggregator, replace
//! every update by the mean of its n − f nearest updates (itself included).
//!
//! Why: a robust aggregator's error grows with the spread of the honest
//! updates, and on non-IID data that spread is large. Each mixed update
//! averages n − f updates, most of them honest, so the honest spread
//! shrinks while an attacker's update is pulled toward the honest ones it
//! sits among. The paper proves that NNM followed by any of the usual
//! robust rules reaches the optimal error under heterogeneity.
//!
//! Cost: the n(n − 1)/2 distances (O(n²·d), as Multi-Krum) and n means of
//! n − f updates (O(n²·d)); memory, n mixed updates beside the originals.

use qflare_protocol::tensor::TensorMap;

use super::krum::pairwise_sq_distances;
use super::{Layout, weighted_mean};
use crate::error::{AggregationError, Result};

/// Every update replaced by the mean of its n − `byzantine` nearest
/// (Euclidean) updates, itself included; equal distances break by arrival
/// order. Needs n > `byzantine`.
pub fn nearest_neighbor_mixing(
    updates: &[&TensorMap],
    byzantine: usize,
    layout: &Layout,
) -> Result<Vec<TensorMap>> {
    let n = updates.len();
    if n == 0 || byzantine >= n {
        return Err(AggregationError::NoAcceptedUpdates { submitted: n });
    }
    let slices = layout.slices(updates)?;
    let distances = pairwise_sq_distances(&slices, layout);
    let neighbours = n - byzantine;
    let ones = vec![1.0; neighbours];
    (0..n)
        .map(|i| {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| {
                distances[i * n + a]
                    .total_cmp(&distances[i * n + b])
                    // Itself first (distance 0 to itself, which ties with a
                    // duplicate), then arrival order.
                    .then((a != i).cmp(&(b != i)))
                    .then(a.cmp(&b))
            });
            let nearest: Vec<&TensorMap> =
                order[..neighbours].iter().map(|&j| updates[j]).collect();
            weighted_mean(&nearest, &ones, layout)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::map;
    use super::*;

    #[test]
    fn each_update_becomes_the_mean_of_its_nearest() {
        let maps = [
            map(&[0.0, 0.0, 0.0]),
            map(&[1.0, 0.0, 0.0]),
            map(&[0.0, 2.0, 0.0]),
            map(&[100.0, 100.0, 100.0]),
        ];
        let refs: Vec<&TensorMap> = maps.iter().collect();
        let layout = Layout::of(&maps[0]);
        let mixed = nearest_neighbor_mixing(&refs, 1, &layout).unwrap();
        // Hand-computed: every update's three nearest are the first three,
        // except the far one's, which are itself, then #2 (distance² 29604)
        // and #1 (29801) before #0 (30000).
        let honest_mean = [1.0 / 3.0, 2.0 / 3.0, 0.0];
        for m in &mixed[..3] {
            for (got, want) in m.to_flat().iter().zip(honest_mean) {
                assert!((got - want).abs() < 1e-6, "{got} vs {want}");
            }
        }
        let far = [101.0 / 3.0, 102.0 / 3.0, 100.0 / 3.0];
        for (got, want) in mixed[3].to_flat().iter().zip(far) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
    }

    #[test]
    fn no_byzantine_mixes_everything_and_too_many_is_refused() {
        let maps = [map(&[1.0, 2.0, 3.0]), map(&[3.0, 2.0, 1.0])];
        let refs: Vec<&TensorMap> = maps.iter().collect();
        let layout = Layout::of(&maps[0]);
        for m in nearest_neighbor_mixing(&refs, 0, &layout).unwrap() {
            assert_eq!(m.to_flat(), vec![2.0, 2.0, 2.0]);
        }
        assert!(nearest_neighbor_mixing(&refs, 2, &layout).is_err());
    }
}
