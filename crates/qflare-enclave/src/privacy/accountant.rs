//! The privacy accountant: Rényi differential privacy (Mironov, CSF 2017)
//! of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar & Zhang,
//! *Rényi Differential Privacy of the Sampled Gaussian Mechanism*, 2019),
//! composed over rounds and converted to (ε, δ).
//!
//! Written here rather than bound to a library because no maintained Rust
//! crate implements it; it follows Google's `dp-accounting` (PyPI, the
//! `RdpAccountant` with `PoissonSampledDpEvent(q, GaussianDpEvent(σ))` under
//! add-or-remove-one neighbouring) step for step — the same orders, the same
//! series for integer and fractional orders, the same conversion — and
//! `python/tests/test_privacy_accountant.py` checks it against that package
//! on a grid of (σ, q, rounds, δ).
//!
//! * RDP of one round at order α: log(A_α)/(α − 1), with
//!   A_α = E_{z∼μ₀}[(μ(z)/μ₀(z))^α] for μ = (1 − q)·μ₀ + q·μ₁,
//!   μ₀ = N(0, σ²), μ₁ = N(1, σ²). Integer α: a finite binomial sum;
//!   fractional α: the two-sided series of the paper's §3.3.
//! * Rounds compose by adding RDP (Mironov 2017, Proposition 1).
//! * (ε, δ) from RDP: ε = min over α of r + log(1 − 1/α) − log(δ·α)/(α − 1)
//!   (Canonne, Kamath & Steinke 2020, Proposition 12; Asoodeh et al. 2020),
//!   or 0 where the KL bound already gives δ.

use libm::{erfc, lgamma};

/// The orders α at which RDP is tracked: `dp-accounting`'s defaults.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((11..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

/// Most terms of the fractional-order series before giving the order up
/// (it then counts as infinite, so it is never the minimizer).
const MAX_FRACTIONAL_TERMS: usize = 1000;

/// Why the accountant cannot account.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountantError {
    /// q outside [0, 1].
    #[error("sampling rate must be in [0, 1], got {0}")]
    SamplingRate(f64),
    /// σ negative or not finite.
    #[error("noise multiplier must be finite and at least 0, got {0}")]
    NoiseMultiplier(f64),
    /// δ outside (0, 1).
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
}

/// RDP of the Poisson-subsampled Gaussian mechanism, cumulative over the
/// rounds added so far.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// Nothing spent, at [`default_orders`].
    pub fn new() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Adds `rounds` rounds, each sampling every device independently with
    /// probability `sampling_rate` and adding Gaussian noise of standard
    /// deviation `noise_multiplier` × the clipping norm to the sum.
    pub fn compose(
        &mut self,
        noise_multiplier: f64,
        sampling_rate: f64,
        rounds: u64,
    ) -> Result<(), AccountantError> {
        let per_round = poisson_gaussian_rdp(noise_multiplier, sampling_rate, &self.orders)?;
        for (total, one) in self.rdp.iter_mut().zip(per_round) {
            *total += one * rounds as f64;
        }
        Ok(())
    }

    /// The ε at which what was composed so far is (ε, δ)-DP.
    pub fn epsilon(&self, delta: f64) -> Result<f64, AccountantError> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }

    /// ε after `rounds` more rounds of (σ, q), without composing them: what
    /// the controller asks before opening a round.
    pub fn epsilon_after(
        &self,
        noise_multiplier: f64,
        sampling_rate: f64,
        rounds: u64,
        delta: f64,
    ) -> Result<f64, AccountantError> {
        let mut next = self.clone();
        next.compose(noise_multiplier, sampling_rate, rounds)?;
        next.epsilon(delta)
    }
}

/// RDP of one round at each order.
pub fn poisson_gaussian_rdp(
    noise_multiplier: f64,
    sampling_rate: f64,
    orders: &[f64],
) -> Result<Vec<f64>, AccountantError> {
    let (sigma, q) = (noise_multiplier, sampling_rate);
    if !(0.0..=1.0).contains(&q) {
        return Err(AccountantError::SamplingRate(q));
    }
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(AccountantError::NoiseMultiplier(sigma));
    }
    Ok(orders
        .iter()
        .map(|&alpha| {
            if q == 0.0 {
                0.0
            } else if alpha.is_infinite() || sigma == 0.0 {
                f64::INFINITY
            } else if q == 1.0 {
                alpha / (2.0 * sigma * sigma)
            } else if alpha.fract() == 0.0 {
                log_a_integer(q, sigma, alpha as u64) / (alpha - 1.0)
            } else {
                log_a_fractional(q, sigma, alpha) / (alpha - 1.0)
            }
        })
        .collect())
}

/// The smallest ε over the orders (see the module documentation).
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<f64, AccountantError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::Delta(delta));
    }
    let best = orders
        .iter()
        .zip(rdp)
        .map(|(&a, &r)| {
            if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
                0.0
            } else if a > 1.01 {
                r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
            } else {
                f64::INFINITY
            }
        })
        .fold(f64::INFINITY, f64::min);
    Ok(best.max(0.0))
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// log |C(n, k)| for real n and k, as scipy's `gammaln` (log |Γ|) gives it.
fn log_binomial(n: f64, k: f64) -> f64 {
    lgamma(n + 1.0) - lgamma(k + 1.0) - lgamma(n - k + 1.0)
}

/// log A_α for integer α: log Σᵢ C(α, i) qⁱ (1 − q)^(α−i) exp((i² − i)/(2σ²)).
fn log_a_integer(q: f64, sigma: f64, alpha: u64) -> f64 {
    let log1mq = (-q).ln_1p();
    let a = alpha as f64;
    (0..=alpha).fold(f64::NEG_INFINITY, |acc, i| {
        let i = i as f64;
        let term = log_binomial(a, i)
            + i * q.ln()
            + (a - i) * log1mq
            + (i * i - i) / (2.0 * sigma * sigma);
        log_add(acc, term)
    })
}

/// log A_α for fractional α: the two series over (−∞, z₀] and [z₀, ∞).
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let scale = std::f64::consts::SQRT_2 * sigma;
    for i in 0..MAX_FRACTIONAL_TERMS {
        let i = i as f64;
        // C(α, i) alternates in sign past i > α; dp-accounting sums its
        // magnitude in log space (the terms stay positive).
        let log_coef = log_binomial(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * log1mq;
        let log_t1 = log_coef + j * q.ln() + i * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / scale);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / scale);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// log(erfc(x)), accurate far into the tail where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    let r = erfc(x);
    if r > 1e-300 {
        return r.ln();
    }
    // The asymptotic (Laurent) series of log erfc at infinity.
    let x2 = x * x;
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2)
        - 37.0 / 24.0 / (x2 * x2 * x2)
        + 353.0 / 64.0 / (x2 * x2 * x2 * x2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without subsampling the Gaussian mechanism's RDP is α/(2σ²) exactly.
    #[test]
    fn full_participation_is_the_gaussian_mechanism() {
        let rdp = poisson_gaussian_rdp(2.0, 1.0, &[2.0, 10.0, 2.5]).unwrap();
        assert_eq!(rdp, vec![0.25, 1.25, 2.5 / 8.0]);
    }

    /// Subsampling at q amplifies privacy roughly by q² for small q
    /// (Mironov et al. 2019, §3.4: RDP ≈ 2q²α/σ² for small q and α), and the
    /// integer and fractional series agree where they meet.
    #[test]
    fn subsampling_amplifies_and_the_two_series_agree() {
        let (sigma, q) = (4.0, 0.01);
        let rdp = poisson_gaussian_rdp(sigma, q, &[2.0, 2.0 + 1e-9]).unwrap();
        assert!((rdp[0] - rdp[1]).abs() < 1e-6 * rdp[0], "{rdp:?}");
        let gaussian = 2.0 / (2.0 * sigma * sigma);
        assert!(rdp[0] < 4.0 * q * q * gaussian, "{} vs {gaussian}", rdp[0]);
        // A_2 has a closed form: 1 + q²(e^{1/σ²} − 1).
        let closed = (q * q * ((1.0 / (sigma * sigma)).exp() - 1.0)).ln_1p();
        assert!((rdp[0] - closed).abs() < 1e-12);
    }

    /// ε grows with rounds and δ's smallness, shrinks with noise, and an
    /// accountant that composed nothing has spent nothing.
    #[test]
    fn epsilon_moves_the_right_way() {
        let fresh = RdpAccountant::new();
        assert_eq!(fresh.epsilon(1e-5).unwrap(), 0.0);
        let few = fresh.epsilon_after(1.0, 0.1, 10, 1e-5).unwrap();
        let many = fresh.epsilon_after(1.0, 0.1, 100, 1e-5).unwrap();
        let noisier = fresh.epsilon_after(2.0, 0.1, 100, 1e-5).unwrap();
        let looser = fresh.epsilon_after(1.0, 0.1, 100, 1e-3).unwrap();
        assert!(0.0 < few && few < many, "{few} {many}");
        assert!(noisier < many && looser < many);
        let mut stepped = RdpAccountant::new();
        for _ in 0..100 {
            stepped.compose(1.0, 0.1, 1).unwrap();
        }
        assert!((stepped.epsilon(1e-5).unwrap() - many).abs() < 1e-9);
        assert!(fresh.epsilon(0.0).is_err());
        assert!(stepped.clone().compose(1.0, 1.5, 1).is_err());
        assert!(stepped.compose(-1.0, 0.5, 1).is_err());
    }

    /// Known answers of `dp-accounting` 0.6.0 (`RdpAccountant`,
    /// `PoissonSampledDpEvent(q, GaussianDpEvent(σ))`, `get_epsilon(δ)`),
    /// so the agreement is checked even where the Python package is not
    /// installed. The first is DP-SGD on MNIST as in Abadi et al. 2016
    /// (σ = 1.1, batches of 256, 60 epochs).
    #[test]
    fn known_answers_of_dp_accounting() {
        let cases = [
            (1.1, 256.0 / 60_000.0, 14_062, 1e-5, 2.596_555_869_794_303_6),
            (1.0, 0.2, 50, 1e-5, 11.340_185_202_973_92),
            (0.8, 0.1, 30, 1e-5, 7.651_103_843_029_387),
            (5.0, 0.01, 1000, 1e-6, 0.271_881_620_063_016_1),
        ];
        for (sigma, q, rounds, delta, expected) in cases {
            let epsilon = RdpAccountant::new()
                .epsilon_after(sigma, q, rounds, delta)
                .unwrap();
            assert!(
                (epsilon - expected).abs() <= 1e-9 * expected,
                "σ={sigma} q={q} T={rounds} δ={delta}: {epsilon} vs {expected}"
            );
        }
    }
}
