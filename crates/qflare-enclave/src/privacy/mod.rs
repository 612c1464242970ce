//! Central differential privacy in the enclave (DP-FedAvg, McMahan, Ramage,
//! Talwar & Zhang, *Learning Differentially Private Recurrent Language
//! Models*, ICLR 2018): every update is clipped to an L2 norm C, the clipped
//! updates are summed with weight 1 each, Gaussian noise of standard
//! deviation z·C is added to the sum inside the enclave, and the sum is
//! divided by the round's *expected* number of participants q·N (a fixed
//! denominator, so one device's presence changes the released value by at
//! most C/(q·N) before noise).
//!
//! What it protects: any one device's data, against everyone who sees the
//! models the enclave releases — the server's operator, other devices,
//! whoever gets the model. The guarantee is over rounds in which the
//! controller samples each device independently with probability q (Poisson
//! sampling, which the controller switches to when `privacy` is set) and is
//! accounted by [`accountant`]; the server records the cumulative ε in the
//! ledger and stops before the configured budget. It does not hide *that* a
//! device took part in a round from the server, which picked it.
//!
//! The noise is drawn from the enclave's own CSPRNG, never from the host:
//! a host that knew it could subtract it.
//!
//! * `mod.rs` (this file): [`PrivacyConfig`] (the `aggregation.privacy`
//!   section) and [`add_noise`], the mechanism's last step.
//! * `accountant.rs`: the RDP accountant.

pub mod accountant;

use qflare_protocol::tensor::TensorMap;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The `aggregation.privacy` section: central DP's parameters.
///
/// ```yaml
/// aggregation:
///   aggregator: fed_avg
///   defense: off                 # the clip below is the only bound
///   privacy:
///     noise_multiplier: 1.0      # z: noise std = z × clip_norm
///     clip_norm: 0.5             # C: every update clipped to this L2 norm
///     delta: 1.0e-5              # δ of the reported (ε, δ)
///     epsilon_budget: 8.0        # stop before ε would pass this
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// z: the noise's standard deviation is z × `clip_norm`.
    pub noise_multiplier: f64,
    /// C: every update is clipped to this L2 norm (the sum's sensitivity).
    pub clip_norm: f64,
    /// δ of the (ε, δ) the server reports. Below 1/N for N devices.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// No round opens whose aggregation would take ε past this.
    #[serde(default)]
    pub epsilon_budget: Option<f64>,
}

fn default_delta() -> f64 {
    1e-5
}

impl PrivacyConfig {
    /// Checks every range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            field,
            reason: reason.to_owned(),
        };
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(invalid(
                "privacy.noise_multiplier",
                "must be finite and above 0",
            ));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(invalid("privacy.clip_norm", "must be finite and above 0"));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(invalid("privacy.delta", "must be in (0, 1)"));
        }
        if let Some(budget) = self.epsilon_budget
            && !(budget.is_finite() && budget > 0.0)
        {
            return Err(invalid(
                "privacy.epsilon_budget",
                "must be finite and above 0",
            ));
        }
        Ok(())
    }

    /// The noise's standard deviation on the sum: z·C.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.clip_norm
    }
}

/// What a private round added, for the ledger and the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyRoundStats {
    /// z.
    pub noise_multiplier: f64,
    /// C.
    pub clip_norm: f64,
    /// q·N, the fixed denominator.
    pub expected_participants: f64,
    /// Standard deviation of the noise per coordinate of the released
    /// update: z·C/(q·N).
    pub released_noise_std: f64,
}

/// The released update from the mean of `accepted` clipped updates: the
/// sum plus N(0, (z·C)²) per coordinate, over `expected_participants`.
/// In place, so the un-noised mean never exists in a second copy.
pub fn add_noise<R: Rng + ?Sized>(
    mean: &mut TensorMap,
    accepted: usize,
    config: &PrivacyConfig,
    expected_participants: f64,
    rng: &mut R,
) -> PrivacyRoundStats {
    let std = config.noise_std();
    let count = accepted as f64;
    for (_, tensor) in mean.iter_mut() {
        for v in tensor.data_mut() {
            let z: f64 = StandardNormal.sample(rng);
            *v = ((f64::from(*v) * count + std * z) / expected_participants) as f32;
        }
    }
    PrivacyRoundStats {
        noise_multiplier: config.noise_multiplier,
        clip_norm: config.clip_norm,
        expected_participants,
        released_noise_std: std / expected_participants,
    }
}

#[cfg(test)]
mod tests {
    use qflare_protocol::tensor::Tensor;
    use rand::SeedableRng;

    use super::*;

    fn config() -> PrivacyConfig {
        PrivacyConfig {
            noise_multiplier: 2.0,
            clip_norm: 0.5,
            delta: 1e-5,
            epsilon_budget: Some(8.0),
        }
    }

    /// The released values are (sum + noise)/m with noise of std z·C: over
    /// many coordinates their sample mean and deviation show it.
    #[test]
    fn noise_has_the_configured_deviation_around_the_fixed_denominator_sum() {
        let d = 200_000;
        let mut mean = TensorMap::new();
        mean.insert("w", Tensor::new(vec![d], vec![0.25f32; d]).unwrap())
            .unwrap();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let stats = add_noise(&mut mean, 4, &config(), 8.0, &mut rng);
        assert_eq!(stats.released_noise_std, 1.0 / 8.0);
        let values = mean.to_flat();
        let m = values.iter().map(|&v| f64::from(v)).sum::<f64>() / d as f64;
        let var = values
            .iter()
            .map(|&v| (f64::from(v) - m).powi(2))
            .sum::<f64>()
            / d as f64;
        // Sum 4 × 0.25 = 1 over m = 8: 0.125.
        assert!((m - 0.125).abs() < 0.002, "{m}");
        assert!((var.sqrt() - 0.125).abs() < 0.002, "{}", var.sqrt());
    }

    #[test]
    fn ranges_are_checked() {
        config().validate().unwrap();
        for broken in [
            PrivacyConfig {
                noise_multiplier: 0.0,
                ..config()
            },
            PrivacyConfig {
                clip_norm: f64::NAN,
                ..config()
            },
            PrivacyConfig {
                delta: 1.0,
                ..config()
            },
            PrivacyConfig {
                epsilon_budget: Some(-1.0),
                ..config()
            },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }
}
