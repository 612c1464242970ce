//! Central differential privacy in a round: every update clipped to C and
//! weighted 1, Gaussian noise of std z·C added to the sum from the caller's
//! CSPRNG, the sum over the fixed expected participants; and the settings
//! under which the sensitivity argument would not hold are refused.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use qflare_enclave::config::{AggregationConfig, AggregatorKind, DefenseConfig};
use qflare_enclave::error::{AggregationError, ConfigError};
use qflare_enclave::privacy::PrivacyConfig;
use qflare_enclave::round::{RoundAggregator, RoundSpec};
use qflare_enclave::verdict::VerdictReason;
use rand_distr::{Distribution, StandardNormal};

const CLIP: f64 = 0.5;
const NOISE: f64 = 1.5;
const EXPECTED: f64 = 8.0;

fn private_config() -> AggregationConfig {
    AggregationConfig {
        aggregator: AggregatorKind::FedAvg,
        defense: DefenseConfig::off(),
        privacy: Some(PrivacyConfig {
            noise_multiplier: NOISE,
            clip_norm: CLIP,
            delta: 1e-5,
            epsilon_budget: None,
        }),
        ..AggregationConfig::default()
    }
}

fn private_spec(config: AggregationConfig, expected: Option<f64>) -> RoundSpec {
    RoundSpec {
        expected_participants: expected,
        ..spec(config, global_model(1))
    }
}

fn scaled(v: &[f32], factor: f64) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x) * factor).collect()
}

/// The released update is exactly (Σ clip_C(Δᵢ) + z·C·N(0, I)) / m, the
/// noise drawn from the RNG handed in; counts do not weigh; an update over
/// C is clipped, not rejected.
#[test]
fn a_private_round_releases_the_clipped_sum_plus_noise_over_m() {
    let dir = direction(3);
    let small = honest_delta(&dir, 600, 10); // norm ≈ 1.1 > C: clipped
    let tiny: Vec<f32> = honest_delta(&dir, 600, 11)
        .iter()
        .map(|v| v * 0.1)
        .collect();
    let huge: Vec<f32> = honest_delta(&dir, 600, 12)
        .iter()
        .map(|v| v * 1000.0)
        .collect();
    let updates = [(1u8, 600u64, small), (2, 100_000, tiny), (3, 1, huge)];
    let mut round = RoundAggregator::new(private_spec(private_config(), Some(EXPECTED))).unwrap();
    assert!(round.is_streaming(), "the clip is absolute: no buffering");
    let mut expected_sum = vec![0f64; parameters()];
    for (id, examples, flat) in &updates {
        round.submit(candidate(*id, *examples, flat)).unwrap();
        let norm = norm(&scaled(flat, 1.0));
        let factor = if norm > CLIP { CLIP / norm } else { 1.0 };
        for (s, v) in expected_sum.iter_mut().zip(scaled(flat, factor)) {
            *s += v;
        }
    }
    let mut rng = rng(99);
    let result = round.finalize_with_noise(&mut rng).unwrap();
    let mut replay = common::rng(99);
    let released = to_f64(&result.aggregated_update);
    for (k, (&got, &sum)) in released.iter().zip(&expected_sum).enumerate() {
        let z: f64 = StandardNormal.sample(&mut replay);
        let want = (sum + NOISE * CLIP * z) / EXPECTED;
        assert!((got - want).abs() < 1e-5, "coordinate {k}: {got} vs {want}");
    }
    let reasons: Vec<_> = result.verdicts.iter().map(|v| v.reason).collect();
    assert_eq!(
        reasons,
        vec![
            VerdictReason::Clipped,
            VerdictReason::Accepted,
            VerdictReason::Clipped
        ]
    );
    // Every accepted update weighs the same, whatever it claims.
    for verdict in &result.verdicts {
        assert_eq!(verdict.weight, Some(1.0 / 3.0));
    }
    let stats = result.stats.privacy.unwrap();
    assert_eq!(stats.released_noise_std, NOISE * CLIP / EXPECTED);
    assert_eq!(stats.expected_participants, EXPECTED);
}

/// Without the enclave's randomness nothing is released.
#[test]
fn a_private_round_without_randomness_releases_nothing() {
    let dir = direction(4);
    let mut round = RoundAggregator::new(private_spec(private_config(), Some(EXPECTED))).unwrap();
    round
        .submit(candidate(1, 600, &honest_delta(&dir, 600, 1)))
        .unwrap();
    let failure = round.finalize().unwrap_err();
    assert!(matches!(
        failure.error,
        AggregationError::PrivacyNeedsRandomness
    ));
}

/// Settings under which one device could move the release by more than C
/// (a weighted or robust aggregator, a rule relative to the other updates)
/// or with no denominator are refused when the round opens.
#[test]
fn settings_that_break_the_sensitivity_bound_are_refused() {
    let refused = |config: AggregationConfig, expected: Option<f64>| {
        matches!(
            RoundAggregator::new(private_spec(config, expected)),
            Err(AggregationError::Config(ConfigError::Invalid {
                field: "privacy",
                ..
            }))
        )
    };
    assert!(refused(
        AggregationConfig {
            aggregator: AggregatorKind::MultiKrum,
            ..private_config()
        },
        Some(EXPECTED)
    ));
    assert!(refused(
        AggregationConfig {
            defense: DefenseConfig::reject_outliers(),
            ..private_config()
        },
        Some(EXPECTED)
    ));
    assert!(refused(private_config(), None));
    assert!(refused(private_config(), Some(0.0)));
    assert!(RoundAggregator::new(private_spec(private_config(), Some(EXPECTED))).is_ok());
}
