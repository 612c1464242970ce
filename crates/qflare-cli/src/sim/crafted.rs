//! The strongest published model-poisoning attacks on robust aggregation,
//! as pure functions of the benign updates an attacker can see (issue 14).
//!
//! Each takes the benign updates of a round, flattened to one vector each
//! (all the same length), and returns the update every colluding attacker
//! sends. Omniscient variants pass the honest devices' updates of the round
//! (a simulation can see them); partial-knowledge variants pass the
//! attackers' own benign updates, computed on their own data. Nothing here
//! does I/O or draws randomness except through the RNG it is given.
//!
//! | attack | paper | crafted update |
//! |---|---|---|
//! | [`alie`] | Baruch et al., "A Little Is Enough", NeurIPS 2019 | `μ − z·σ` per coordinate, `z` from how many benign updates an attacker must outnumber to sit inside the majority |
//! | [`ipm`] | Xie et al., "Fall of Empires" (inner-product manipulation), UAI 2020 | `−ε·μ` |
//! | [`min_max`] | Shejwalkar & Houmansadr, NDSS 2021 | `μ + γ·p`, the largest `γ` with its farthest distance to a benign update no more than the largest benign–benign distance |
//! | [`min_sum`] | the same paper | `μ + γ·p`, the largest `γ` with its summed squared distance to the benign updates no more than any benign update's |
//! | [`fang_trim`] | Fang et al., "Local Model Poisoning Attacks to Byzantine-Robust FL", USENIX Security 2020 | per coordinate, a value beyond the benign extreme opposite to the benign direction, by a factor up to `b = 2` |
//!
//! `μ` and `σ` are the coordinate-wise mean and (population) standard
//! deviation of the benign updates; `p` is the perturbation direction,
//! here the paper's default, the negated unit vector of `μ` ("inverse unit
//! vector").

use rand::{Rng, RngExt};
use statrs::distribution::{ContinuousCDF, Normal};

/// Why an attack cannot be computed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CraftError {
    /// No benign update to work from.
    #[error("an attack needs at least one benign update")]
    NoBenignUpdates,
    /// The benign updates differ in length.
    #[error("benign updates of different lengths ({0} and {1})")]
    LengthMismatch(usize, usize),
    /// ALIE with as many attackers as there are devices, or none.
    #[error("ALIE needs 0 < attackers < devices (got {attackers} of {devices})")]
    AttackerCount {
        /// Attackers in the round.
        attackers: usize,
        /// All devices in the round.
        devices: usize,
    },
}

/// Coordinate-wise mean and population standard deviation.
fn mean_and_std(benign: &[Vec<f32>]) -> Result<(Vec<f64>, Vec<f64>), CraftError> {
    let first = benign.first().ok_or(CraftError::NoBenignUpdates)?;
    let len = first.len();
    if let Some(other) = benign.iter().find(|update| update.len() != len) {
        return Err(CraftError::LengthMismatch(len, other.len()));
    }
    let n = benign.len() as f64;
    let mut mean = vec![0f64; len];
    for update in benign {
        for (m, &v) in mean.iter_mut().zip(update) {
            *m += f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut variance = vec![0f64; len];
    for update in benign {
        for ((s, &v), m) in variance.iter_mut().zip(update).zip(&mean) {
            let d = f64::from(v) - m;
            *s += d * d;
        }
    }
    let std = variance.into_iter().map(|s| (s / n).sqrt()).collect();
    Ok((mean, std))
}

fn to_f32(values: impl IntoIterator<Item = f64>) -> Vec<f32> {
    values.into_iter().map(|v| v as f32).collect()
}

/// ALIE's `z_max` for `devices` in the round of which `attackers` collude:
/// an attacker must look closer to the mean than `s = ⌊n/2 + 1⌋ − m` benign
/// updates, so `z = Φ⁻¹((n − s) / n)` (Baruch et al., Algorithm 3).
pub fn alie_z(devices: usize, attackers: usize) -> Result<f64, CraftError> {
    if attackers == 0 || attackers >= devices {
        return Err(CraftError::AttackerCount { attackers, devices });
    }
    let n = devices as f64;
    let s = (devices / 2 + 1) as f64 - attackers as f64;
    // A standard normal is always constructible.
    let normal = Normal::standard();
    Ok(normal.inverse_cdf(((n - s) / n).clamp(1e-12, 1.0 - 1e-12)))
}

/// "A little is enough": `μ − z·σ`, with `z` from [`alie_z`].
pub fn alie(benign: &[Vec<f32>], devices: usize, attackers: usize) -> Result<Vec<f32>, CraftError> {
    let z = alie_z(devices, attackers)?;
    let (mean, std) = mean_and_std(benign)?;
    Ok(to_f32(mean.iter().zip(&std).map(|(m, s)| m - z * s)))
}

/// Inner-product manipulation: `−ε·μ`, whose inner product with the true
/// mean is negative while its norm (for small `ε`) passes norm checks.
pub fn ipm(benign: &[Vec<f32>], epsilon: f32) -> Result<Vec<f32>, CraftError> {
    let (mean, _) = mean_and_std(benign)?;
    Ok(to_f32(mean.iter().map(|m| -f64::from(epsilon) * m)))
}

fn squared_distance(a: &[f64], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, &y)| {
            let d = x - f64::from(y);
            d * d
        })
        .sum()
}

fn squared_distance_f32(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum()
}

/// `−μ/‖μ‖` (zero where `μ` is zero).
fn inverse_unit(mean: &[f64]) -> Vec<f64> {
    let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
    if norm == 0.0 {
        return vec![0.0; mean.len()];
    }
    mean.iter().map(|m| -m / norm).collect()
}

/// The largest `γ` (to `tolerance`) with `fits(μ + γ·p)`, by the papers'
/// search: start at `γ_init`, step by `γ_init / 2`, halving the step each
/// time and moving up while it fits, down while it does not
/// (Shejwalkar & Houmansadr, Algorithm 1).
fn largest_gamma(
    mean: &[f64],
    direction: &[f64],
    fits: impl Fn(&[f64]) -> bool,
    tolerance: f64,
) -> Vec<f64> {
    let at = |gamma: f64| -> Vec<f64> {
        mean.iter()
            .zip(direction)
            .map(|(m, p)| m + gamma * p)
            .collect()
    };
    let mut gamma = 10.0f64;
    let mut step = gamma / 2.0;
    let mut best = 0.0f64;
    while step > tolerance {
        if fits(&at(gamma)) {
            best = best.max(gamma);
            gamma += step;
        } else {
            gamma -= step;
        }
        step /= 2.0;
    }
    at(best)
}

/// The papers' search tolerance on `γ`.
const GAMMA_TOLERANCE: f64 = 1e-5;

/// Min-max: as far as possible along `p` while no farther from any benign
/// update than the two farthest benign updates are from each other.
pub fn min_max(benign: &[Vec<f32>]) -> Result<Vec<f32>, CraftError> {
    let mut widest = 0f64;
    for (i, a) in benign.iter().enumerate() {
        for b in &benign[i + 1..] {
            widest = widest.max(squared_distance_f32(a, b));
        }
    }
    farthest_along_inverse_unit(benign, |candidate| {
        benign
            .iter()
            .all(|update| squared_distance(candidate, update) <= widest)
    })
}

/// Min-sum: as far as possible along `p` while its summed squared distance
/// to the benign updates is no more than the largest such sum of a benign
/// update.
pub fn min_sum(benign: &[Vec<f32>]) -> Result<Vec<f32>, CraftError> {
    let worst_sum = benign
        .iter()
        .map(|a| benign.iter().map(|b| squared_distance_f32(a, b)).sum())
        .fold(0f64, f64::max);
    farthest_along_inverse_unit(benign, |candidate| {
        let sum: f64 = benign
            .iter()
            .map(|update| squared_distance(candidate, update))
            .sum();
        sum <= worst_sum
    })
}

/// Min-max's and min-sum's common part: `μ + γ·p` for the largest `γ`
/// that `fits`, with `p` the inverse unit vector of the benign mean.
fn farthest_along_inverse_unit(
    benign: &[Vec<f32>],
    fits: impl Fn(&[f64]) -> bool,
) -> Result<Vec<f32>, CraftError> {
    let (mean, _) = mean_and_std(benign)?;
    let direction = inverse_unit(&mean);
    Ok(to_f32(largest_gamma(
        &mean,
        &direction,
        fits,
        GAMMA_TOLERANCE,
    )))
}

/// Fang et al.'s attack on trimmed mean and median (their full-knowledge
/// variant, on updates): where the benign updates move a coordinate up
/// (`μ_j > 0`) the attacker sends a value below the benign minimum, else
/// above the benign maximum, drawn uniformly between the extreme and `b`
/// times it (`b = 2`, or divided by `b` where multiplying would move
/// toward zero). Each attacker draws its own values from `rng`.
pub fn fang_trim<R: Rng + ?Sized>(
    benign: &[Vec<f32>],
    rng: &mut R,
) -> Result<Vec<f32>, CraftError> {
    const B: f64 = 2.0;
    let (mean, _) = mean_and_std(benign)?;
    let mut crafted = Vec::with_capacity(mean.len());
    for (j, m) in mean.iter().enumerate() {
        let column = benign.iter().map(|update| f64::from(update[j]));
        let (low, high) = if *m > 0.0 {
            // Push down: below the minimum.
            let min = column.fold(f64::INFINITY, f64::min);
            if min > 0.0 {
                (min / B, min)
            } else {
                (min * B, min)
            }
        } else {
            // Push up: above the maximum.
            let max = column.fold(f64::NEG_INFINITY, f64::max);
            if max > 0.0 {
                (max, max * B)
            } else {
                (max, max / B)
            }
        };
        let value = if high > low {
            rng.random_range(low..=high)
        } else {
            low
        };
        crafted.push(value as f32);
    }
    Ok(crafted)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn close(a: &[f32], b: &[f32], tolerance: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tolerance)
    }

    /// Three benign updates in two coordinates, for every hand computation
    /// below: μ = (2, −1), σ = (√(8/3), √(2/3)).
    fn benign() -> Vec<Vec<f32>> {
        vec![vec![0.0, -2.0], vec![2.0, -1.0], vec![4.0, 0.0]]
    }

    /// `μ + γ·p` for [`benign`]: μ = (2, −1), p = −μ/‖μ‖ = (−2, 1)/√5.
    fn beyond_the_mean(gamma: f64) -> [f32; 2] {
        let root5 = 5f64.sqrt();
        [
            (2.0 - 2.0 * gamma / root5) as f32,
            (-1.0 + gamma / root5) as f32,
        ]
    }

    #[test]
    fn alie_moves_each_coordinate_z_deviations_below_the_mean() {
        // n = 10, m = 2: s = ⌊10/2 + 1⌋ − 2 = 4, z = Φ⁻¹(6/10) = 0.253347.
        let z = alie_z(10, 2).unwrap();
        assert!((z - 0.253_347).abs() < 1e-5, "{z}");
        // n = 50, m = 10 (the paper's 20%): s = 16, z = Φ⁻¹(34/50) = 0.467699.
        assert!((alie_z(50, 10).unwrap() - 0.467_699).abs() < 1e-5);
        let crafted = alie(&benign(), 10, 2).unwrap();
        let sigma = [(8.0f32 / 3.0).sqrt(), (2.0f32 / 3.0).sqrt()];
        let expected = [2.0 - 0.253_347 * sigma[0], -1.0 - 0.253_347 * sigma[1]];
        assert!(close(&crafted, &expected, 1e-5), "{crafted:?}");
        assert_eq!(
            alie(&benign(), 3, 3),
            Err(CraftError::AttackerCount {
                attackers: 3,
                devices: 3
            })
        );
    }

    #[test]
    fn ipm_is_the_negated_scaled_mean() {
        assert!(close(&ipm(&benign(), 0.5).unwrap(), &[-1.0, 0.5], 1e-6));
    }

    #[test]
    fn min_max_stops_at_the_widest_benign_distance() {
        // Widest benign pair: (0,−2)–(4,0), squared distance 20. p = −μ/‖μ‖
        // = (−2, 1)/√5; the farthest benign update from μ + γp is (4, 0), at
        // squared distance (2 + 2γ/√5)² + (γ/√5 − 1)² = γ² + (6/√5)γ + 5.
        // Set to 20: γ² + (6/√5)γ − 15 = 0, γ = (−6/√5 + √(36/5 + 60)) / 2.
        let gamma = (-6.0 / 5f64.sqrt() + (36.0 / 5.0 + 60.0f64).sqrt()) / 2.0;
        let expected = beyond_the_mean(gamma);
        let crafted = min_max(&benign()).unwrap();
        assert!(
            close(&crafted, &expected, 1e-4),
            "{crafted:?} vs {expected:?}"
        );
        // And it is within the bound it was searched under.
        for update in benign() {
            assert!(squared_distance_f32(&crafted, &update) <= 20.0 + 1e-3);
        }
    }

    #[test]
    fn min_sum_stops_at_the_largest_benign_sum() {
        // Benign sums of squared distances: (0,−2): 5 + 20 = 25; (2,−1): 5 + 5
        // = 10; (4,0): 25. For x = μ + γp the sum is Σ‖μ − g‖² + 3γ² = 10 +
        // 3γ² (p is a unit vector and Σ(μ − g) = 0); 10 + 3γ² = 25 → γ = √5.
        let expected = beyond_the_mean(5f64.sqrt());
        let crafted = min_sum(&benign()).unwrap();
        assert!(
            close(&crafted, &expected, 1e-4),
            "{crafted:?} vs {expected:?}"
        );
    }

    #[test]
    fn fang_goes_past_the_benign_extreme_against_the_benign_direction() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        // Coordinate 0: μ = 2 > 0, min = 0 (not > 0): the interval is
        // [0·2, 0] = {0}. Coordinate 1: μ = −1 ≤ 0, max = 0: {0} too.
        assert_eq!(fang_trim(&benign(), &mut rng).unwrap(), vec![0.0, 0.0]);
        // Shifted so the extremes are not zero: coordinate 0 has μ = 3,
        // min = 1 > 0: values in [0.5, 1]; coordinate 1 has μ = −2, max =
        // −1 < 0: values in [−1, −0.5].
        let shifted = vec![vec![1.0, -3.0], vec![3.0, -2.0], vec![5.0, -1.0]];
        for _ in 0..100 {
            let crafted = fang_trim(&shifted, &mut rng).unwrap();
            assert!((0.5..=1.0).contains(&crafted[0]), "{crafted:?}");
            assert!((-1.0..=-0.5).contains(&crafted[1]), "{crafted:?}");
        }
        // Where the benign direction is down and the maximum positive, the
        // values go above it, up to twice it.
        let up = vec![vec![-4.0], vec![1.0]];
        let crafted = fang_trim(&up, &mut rng).unwrap();
        assert!((1.0..=2.0).contains(&crafted[0]), "{crafted:?}");
    }

    #[test]
    fn malformed_inputs_are_refused() {
        assert_eq!(ipm(&[], 0.1), Err(CraftError::NoBenignUpdates));
        assert_eq!(
            min_max(&[vec![1.0], vec![1.0, 2.0]]),
            Err(CraftError::LengthMismatch(1, 2))
        );
    }
}
