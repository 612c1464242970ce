//! Malicious devices: how an attacker corrupts its update or its data.

use std::sync::Arc;

use qflare_edge::run::TamperFn;
use qflare_ml::Dataset;
use qflare_protocol::tensor::TensorMap;
use rand::SeedableRng;

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
}

impl std::str::FromStr for Attack {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "sign-flip" => Ok(Self::SignFlip),
            "scale" => Ok(Self::Scale(10.0)),
            "noise" => Ok(Self::GaussianNoise(0.1)),
            "label-flip" => Ok(Self::LabelFlip),
            other => match other.strip_prefix("scale:").and_then(|f| f.parse().ok()) {
                Some(factor) => Ok(Self::Scale(factor)),
                None => match other.strip_prefix("noise:").and_then(|s| s.parse().ok()) {
                    Some(sigma) => Ok(Self::GaussianNoise(sigma)),
                    None => Err(format!(
                        "unknown attack {other}: use sign-flip, scale[:FACTOR], noise[:SIGMA] or label-flip"
                    )),
                },
            },
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
        }
    }
}

pub(super) fn flip_labels(data: &Dataset) -> anyhow::Result<Dataset> {
    let labels: Vec<u8> = data.labels().iter().map(|y| 9 - y).collect();
    Ok(Dataset::new(data.images().to_vec(), labels, 28, 28)?)
}

pub(super) fn tamper(attack: Attack, seed: u64) -> Option<TamperFn> {
    let f: TamperFn = match attack {
        Attack::SignFlip => Arc::new(|mut delta: TensorMap| {
            for (_, t) in delta.iter_mut() {
                t.data_mut().iter_mut().for_each(|v| *v = -*v);
            }
            delta
        }),
        Attack::Scale(factor) => Arc::new(move |mut delta: TensorMap| {
            for (_, t) in delta.iter_mut() {
                t.data_mut().iter_mut().for_each(|v| *v *= factor);
            }
            delta
        }),
        Attack::GaussianNoise(sigma) => Arc::new(move |mut delta: TensorMap| {
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
        Attack::LabelFlip => return None,
    };
    Some(f)
}
