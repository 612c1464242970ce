//! Centered clipping (Karimireddy, He & Jaggi, *Learning from History for
//! Byzantine Robust Optimization*, ICML 2021): start from a robust center v
//! and move it by the mean of every update's offset from v, each offset
//! clipped to a radius τ:
//!
//! ```text
//! v ← v + (1/n) Σᵢ (Δᵢ − v) · min(1, τ / ‖Δᵢ − v‖)        (repeated L times)
//! ```
//!
//! No update is thrown away: one far from the crowd (scaled, flipped, noise,
//! Fang's values beyond the extremes) moves v by at most τ/n, and an honest
//! device whose data differ from everyone else's (non-IID) still counts,
//! with the same bounded pull. That is the point of choosing it as the
//! default over rejection rules, which on heterogeneous data reject honest
//! minorities (docs/benchmarks.md, the attack table).
//!
//! Two choices the paper leaves to the user, made here so that the rule
//! needs no history and no tuning per model:
//!
//! * **Start**: the coordinate-wise median of the round (breakdown point
//!   1/2), not the previous aggregate: round 1 has none, and a restart of
//!   the enclave loses it.
//! * **Radius**: τ = `radius_multiple` × the median of ‖Δᵢ − v₀‖, so it
//!   scales with the round's honest spread, which shrinks as training
//!   converges. With an honest majority at least half the updates are within
//!   τ (for a multiple of 1), so honest updates are mostly not clipped.

use qflare_protocol::tensor::TensorMap;
use zeroize::Zeroizing;

use super::{Layout, coordinate_median};
use crate::defense::median;
use crate::error::{AggregationError, Result};
use crate::kernels::dist_sq;

/// Coordinates per block of the center update (f64 scratch stays in cache).
const BLOCK: usize = 1 << 12;

/// What centered clipping produced.
#[derive(Debug)]
pub struct CenteredClippingOutcome {
    /// The final center v_L.
    pub aggregate: TensorMap,
    /// τ.
    pub radius: f64,
    /// Each update's min(1, τ/‖Δᵢ − v‖) in the last iteration, in input
    /// order: 1 means it counted in full.
    pub clip_factors: Vec<f64>,
}

/// Centered clipping with τ = `radius_multiple` × median ‖Δᵢ − median‖ and
/// `iterations` steps (see the module documentation).
pub fn centered_clipping(
    updates: &[&TensorMap],
    radius_multiple: f64,
    iterations: usize,
    layout: &Layout,
) -> Result<CenteredClippingOutcome> {
    if updates.is_empty() {
        return Err(AggregationError::NoAcceptedUpdates { submitted: 0 });
    }
    let slices = layout.slices(updates)?;
    let mut center = coordinate_median(updates, layout)?;
    let mut distances = distances_to(&slices, &center);
    let radius = radius_multiple * median(&distances).unwrap_or(0.0);
    let n = updates.len() as f64;
    let mut clip_factors = factors(&distances, radius);
    let mut wide = Zeroizing::new(vec![0f64; BLOCK]);
    for step in 0..iterations {
        if step > 0 {
            distances = distances_to(&slices, &center);
            clip_factors = factors(&distances, radius);
        }
        for (t, (_, tensor)) in center.iter_mut().enumerate() {
            let v = tensor.data_mut();
            for (b, v_block) in v.chunks_mut(BLOCK).enumerate() {
                let start = b * BLOCK;
                let wide = &mut wide[..v_block.len()];
                wide.fill(0.0);
                for (update, &c) in slices.iter().zip(&clip_factors) {
                    if c == 0.0 {
                        continue;
                    }
                    let x = &update[t][start..start + v_block.len()];
                    for ((w, &xi), &vi) in wide.iter_mut().zip(x).zip(v_block.iter()) {
                        *w += c * (f64::from(xi) - f64::from(vi));
                    }
                }
                for (vi, &w) in v_block.iter_mut().zip(wide.iter()) {
                    *vi = (f64::from(*vi) + w / n) as f32;
                }
            }
        }
    }
    Ok(CenteredClippingOutcome {
        aggregate: center,
        radius,
        clip_factors,
    })
}

/// ‖Δᵢ − v‖ for every update.
fn distances_to(slices: &[Vec<&[f32]>], center: &TensorMap) -> Vec<f64> {
    let center: Vec<&[f32]> = center.iter().map(|(_, t)| t.data()).collect();
    slices
        .iter()
        .map(|update| {
            update
                .iter()
                .zip(&center)
                .map(|(x, v)| dist_sq(x, v))
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

/// min(1, τ/d); an update at the center (d = 0) has no offset to clip.
fn factors(distances: &[f64], radius: f64) -> Vec<f64> {
    distances
        .iter()
        .map(|&d| if d > radius { radius / d } else { 1.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::map;
    use super::*;

    /// The naive rule on flat vectors, in f64: the reference the optimized
    /// one must match.
    fn naive(updates: &[Vec<f64>], multiple: f64, iterations: usize) -> Vec<f64> {
        let d = updates[0].len();
        let n = updates.len();
        let mut v: Vec<f64> = (0..d)
            .map(|k| {
                let mut column: Vec<f64> = updates.iter().map(|u| u[k]).collect();
                column.sort_by(f64::total_cmp);
                if n % 2 == 1 {
                    column[n / 2]
                } else {
                    (column[n / 2 - 1] + column[n / 2]) / 2.0
                }
            })
            .collect();
        let dist = |v: &[f64], u: &[f64]| -> f64 {
            v.iter()
                .zip(u)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt()
        };
        let mut first: Vec<f64> = updates.iter().map(|u| dist(&v, u)).collect();
        first.sort_by(f64::total_cmp);
        let tau = multiple
            * if n % 2 == 1 {
                first[n / 2]
            } else {
                (first[n / 2 - 1] + first[n / 2]) / 2.0
            };
        for _ in 0..iterations {
            let mut step = vec![0.0; d];
            for u in updates {
                let r = dist(&v, u);
                let c = if r > tau { tau / r } else { 1.0 };
                for k in 0..d {
                    step[k] += c * (u[k] - v[k]) / n as f64;
                }
            }
            for k in 0..d {
                v[k] += step[k];
            }
        }
        v
    }

    #[test]
    fn matches_the_naive_rule() {
        let raw = [
            [1.0f32, 2.0, 0.5, -1.0],
            [1.2, 1.8, 0.4, -0.9],
            [0.8, 2.1, 0.7, -1.1],
            [1.1, 2.2, 0.6, -1.2],
            [-30.0, 40.0, 9.0, 100.0],
        ];
        let maps: Vec<TensorMap> = raw.iter().map(|r| map(r)).collect();
        let refs: Vec<&TensorMap> = maps.iter().collect();
        let layout = Layout::of(&maps[0]);
        let wide: Vec<Vec<f64>> = raw
            .iter()
            .map(|r| r.iter().map(|&x| f64::from(x)).collect())
            .collect();
        for (multiple, iterations) in [(1.0, 1), (1.0, 3), (2.0, 5), (0.5, 2)] {
            let outcome = centered_clipping(&refs, multiple, iterations, &layout).unwrap();
            let expected = naive(&wide, multiple, iterations);
            for (got, want) in outcome.aggregate.to_flat().iter().zip(&expected) {
                assert!(
                    (f64::from(*got) - want).abs() < 1e-5,
                    "{got} vs {want} at ({multiple}, {iterations})"
                );
            }
            // The far update is clipped, the honest cluster is not.
            assert!(outcome.clip_factors[4] < 0.1);
        }
    }

    /// However far the attacker goes, it moves the center by at most τ/n
    /// per iteration.
    #[test]
    fn one_update_moves_the_center_by_at_most_radius_over_n() {
        let honest = [[1.0f32, 1.0, 1.0], [1.1, 0.9, 1.0], [0.9, 1.1, 1.0]];
        let mut maps: Vec<TensorMap> = honest.iter().map(|h| map(&[h[0], h[1], h[2]])).collect();
        maps.push(map(&[1e6, -1e6, 1e6]));
        let refs: Vec<&TensorMap> = maps.iter().collect();
        let layout = Layout::of(&maps[0]);
        let outcome = centered_clipping(&refs, 1.0, 1, &layout).unwrap();
        let start = coordinate_median(&refs, &layout).unwrap();
        let moved: f64 = outcome
            .aggregate
            .to_flat()
            .iter()
            .zip(start.to_flat())
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(moved <= outcome.radius + 1e-6, "moved {moved}");
        assert!(
            outcome.radius < 1.0,
            "the radius comes from the honest spread"
        );
    }

    #[test]
    fn identical_updates_are_their_own_aggregate() {
        let maps = vec![map(&[0.5, -0.25, 3.0]); 4];
        let refs: Vec<&TensorMap> = maps.iter().collect();
        let layout = Layout::of(&maps[0]);
        let outcome = centered_clipping(&refs, 1.0, 3, &layout).unwrap();
        assert_eq!(outcome.aggregate, maps[0]);
        assert_eq!(outcome.radius, 0.0);
        assert!(centered_clipping(&[], 1.0, 1, &layout).is_err());
    }
}
