//! Malicious devices: how an attacker corrupts its update or its data.
//!
//! The crafted attacks (ALIE, IPM, min-max, min-sum, Fang) are omniscient:
//! the colluding attackers compute their update from the honest updates of
//! the round, which the simulation shows them (`collusion.rs`), as their
//! papers evaluate them; the arithmetic is in `crafted.rs`.

use std::sync::Arc;

use qflare_edge::run::TamperFn;
use qflare_ml::Dataset;
use qflare_protocol::tensor::TensorMap;
use rand::SeedableRng;

use super::crafted::{self, CraftError};

/// How a malicious device corrupts its update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    /// Sends the negated update (pushes the model the other way).
    SignFlip,
    /// Multiplies the update (model replacement, boosted).
    Scale(f32),
    /// Replaces the update with Gaussian noise of this standard deviation.
    GaussianNoise(f32),
    /// Trains on labels y → 9 − y (data poisoning; the update looks honest in size).
    LabelFlip,
    /// "A little is enough" (Baruch et al. 2019): `μ − z·σ` of the honest updates.
    Alie,
    /// Inner-product manipulation (Xie et al. 2020): `−ε·μ`.
    Ipm(f32),
    /// Min-max (Shejwalkar & Houmansadr 2021).
    MinMax,
    /// Min-sum (Shejwalkar & Houmansadr 2021).
    MinSum,
    /// Fang et al.'s attack on trimmed mean and median (2020).
    Fang,
}

impl Attack {
    /// Whether the attack is computed from the round's honest updates, so
    /// the simulation must show them to the attackers.
    pub const fn is_crafted(self) -> bool {
        matches!(
            self,
            Self::Alie | Self::Ipm(_) | Self::MinMax | Self::MinSum | Self::Fang
        )
    }
}

impl Attack {
    /// The update every colluding attacker sends in a round of `devices`
    /// with `attackers` of them colluding, crafted from the round's `honest`
    /// updates (flat). `seed` feeds the attacks that draw randomness (Fang).
    /// An attack that is not crafted has nothing to compute: `NoBenignUpdates`.
    pub fn craft(
        self,
        honest: &[Vec<f32>],
        devices: usize,
        attackers: usize,
        seed: u64,
    ) -> Result<Vec<f32>, CraftError> {
        match self {
            Self::Alie => crafted::alie(honest, devices, attackers),
            Self::Ipm(epsilon) => crafted::ipm(honest, epsilon),
            Self::MinMax => crafted::min_max(honest),
            Self::MinSum => crafted::min_sum(honest),
            Self::Fang => {
                crafted::fang_trim(honest, &mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
            }
            Self::SignFlip | Self::Scale(_) | Self::GaussianNoise(_) | Self::LabelFlip => {
                Err(CraftError::NoBenignUpdates)
            }
        }
    }
}

impl std::str::FromStr for Attack {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "sign-flip" => Ok(Self::SignFlip),
            "scale" => Ok(Self::Scale(10.0)),
            "noise" => Ok(Self::GaussianNoise(0.1)),
            "label-flip" => Ok(Self::LabelFlip),
            "alie" => Ok(Self::Alie),
            "ipm" => Ok(Self::Ipm(0.5)),
            "min-max" => Ok(Self::MinMax),
            "min-sum" => Ok(Self::MinSum),
            "fang" => Ok(Self::Fang),
            other => {
                let with = |prefix: &str| {
                    other
                        .strip_prefix(prefix)
                        .and_then(|value| value.parse::<f32>().ok())
                };
                if let Some(factor) = with("scale:") {
                    Ok(Self::Scale(factor))
                } else if let Some(sigma) = with("noise:") {
                    Ok(Self::GaussianNoise(sigma))
                } else if let Some(epsilon) = with("ipm:") {
                    Ok(Self::Ipm(epsilon))
                } else {
                    Err(format!(
                        "unknown attack {other}: use sign-flip, scale[:FACTOR], noise[:SIGMA], \
                         label-flip, alie, ipm[:EPSILON], min-max, min-sum or fang"
                    ))
                }
            }
        }
    }
}

impl std::fmt::Display for Attack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SignFlip => f.write_str("sign-flip"),
            Self::Scale(factor) => write!(f, "scale x{factor}"),
            Self::GaussianNoise(sigma) => write!(f, "gaussian noise σ={sigma}"),
            Self::LabelFlip => f.write_str("label-flip"),
            Self::Alie => f.write_str("ALIE"),
            Self::Ipm(epsilon) => write!(f, "IPM ε={epsilon}"),
            Self::MinMax => f.write_str("min-max"),
            Self::MinSum => f.write_str("min-sum"),
            Self::Fang => f.write_str("Fang trim"),
        }
    }
}

/// `data` with every label y replaced by 9 − y (the label-flip attack's data).
pub fn flip_labels(data: &Dataset) -> anyhow::Result<Dataset> {
    let labels: Vec<u8> = data.labels().iter().map(|y| 9 - y).collect();
    Ok(Dataset::new(data.images().to_vec(), labels, 28, 28)?)
}

/// The hook of a malicious device with `attack` (crafted attacks are
/// hooked up by `collusion.rs` instead, and label flips change the data).
pub fn tamper(attack: Attack, seed: u64) -> Option<TamperFn> {
    let f: TamperFn = match attack {
        Attack::SignFlip => Arc::new(|_round, mut delta: TensorMap| {
            for (_, t) in delta.iter_mut() {
                t.data_mut().iter_mut().for_each(|v| *v = -*v);
            }
            delta
        }),
        Attack::Scale(factor) => Arc::new(move |_round, mut delta: TensorMap| {
            for (_, t) in delta.iter_mut() {
                t.data_mut().iter_mut().for_each(|v| *v *= factor);
            }
            delta
        }),
        Attack::GaussianNoise(sigma) => Arc::new(move |_round, mut delta: TensorMap| {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            for (_, t) in delta.iter_mut() {
                t.data_mut().iter_mut().for_each(|v| {
                    let z: f32 =
                        rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng);
                    *v = sigma * z;
                });
            }
            delta
        }),
        Attack::LabelFlip
        | Attack::Alie
        | Attack::Ipm(_)
        | Attack::MinMax
        | Attack::MinSum
        | Attack::Fang => return None,
    };
    Some(f)
}
