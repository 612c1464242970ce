//! Round-level behaviour: typed errors, the streaming/buffered rule and its
//! memory, replay handling, and the configuration format.

// Tests may panic on impossible errors: that is how they fail.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use qflare_enclave::config::{
    AggregationConfig, AggregatorKind, DefenseConfig, DefensePreset, NormAction,
    SimilarityReference,
};
use qflare_enclave::error::{AggregationError, ConfigError};
use qflare_enclave::round::{ReferenceKind, RoundAggregator, RoundSpec};
use qflare_enclave::verdict::{Verdict, VerdictReason};

fn honest(i: u64) -> Vec<f32> {
    honest_delta(&direction(3), 600, 50 + i)
}

fn bytes_per_update() -> u64 {
    4 * parameters() as u64
}

#[test]
fn memory_bound_exceeded_is_a_typed_error() {
    let config = AggregationConfig {
        max_buffered_bytes: 2 * bytes_per_update() + bytes_per_update() / 2,
        ..reject_rules()
    };
    let mut round = round(config);
    assert!(!round.is_streaming());
    assert_eq!(
        round.submit(candidate(1, 600, &honest(1))).unwrap(),
        Verdict::Pending
    );
    assert_eq!(
        round.submit(candidate(2, 600, &honest(2))).unwrap(),
        Verdict::Pending
    );
    assert_eq!(round.buffered_bytes(), 2 * bytes_per_update());
    let error = round.submit(candidate(3, 600, &honest(3))).unwrap_err();
    assert_eq!(
        error,
        AggregationError::MemoryBoundExceeded {
            needed: 3 * bytes_per_update(),
            limit: 2 * bytes_per_update() + bytes_per_update() / 2,
        }
    );
    // Not a failed round: the round goes on with what it holds.
    assert!(!error.is_retryable());
    // The refused update left no trace; invalid updates still get verdicts.
    assert_eq!(round.verdicts().len(), 2);
    let mut bad = honest(4);
    bad[0] = f32::NAN;
    assert_eq!(
        round.submit(candidate(4, 600, &bad)).unwrap(),
        Verdict::Rejected(VerdictReason::NonFinite)
    );
    let result = round.finalize().unwrap();
    assert_eq!(result.stats.accepted, 2);
    assert_eq!(result.stats.peak_buffered_bytes, 2 * bytes_per_update());
}

#[test]
fn zero_accepted_is_a_typed_error_with_the_verdicts() {
    for defense in [DefenseConfig::off(), DefenseConfig::reject_outliers()] {
        let mut round = round(AggregationConfig {
            defense,
            ..reject_rules()
        });
        for i in 0..3u8 {
            let mut bad = honest(u64::from(i));
            bad[5] = f32::INFINITY;
            round.submit(candidate(i, 600, &bad)).unwrap();
        }
        let failure = round.finalize().unwrap_err();
        assert_eq!(
            failure.error,
            AggregationError::NoAcceptedUpdates { submitted: 3 }
        );
        assert!(failure.error.is_retryable());
        assert_eq!(failure.verdicts.len(), 3);
        assert!(
            failure
                .verdicts
                .iter()
                .all(|v| v.reason == VerdictReason::NonFinite)
        );
        assert_eq!(failure.stats.rejected, 3);
    }
    // A round nobody submitted to.
    let failure = round(reject_rules()).finalize().unwrap_err();
    assert_eq!(
        failure.error,
        AggregationError::NoAcceptedUpdates { submitted: 0 }
    );
}

#[test]
fn minimum_accepted_is_enforced() {
    let mut round = round(AggregationConfig {
        min_accepted: 3,
        defense: DefenseConfig::off(),
        ..reject_rules()
    });
    round.submit(candidate(1, 600, &honest(1))).unwrap();
    round.submit(candidate(2, 600, &honest(2))).unwrap();
    let failure = round.finalize().unwrap_err();
    assert_eq!(
        failure.error,
        AggregationError::TooFewAccepted {
            accepted: 2,
            required: 3
        }
    );
}

#[test]
fn fltrust_without_reference_is_a_config_error() {
    let config = AggregationConfig {
        aggregator: AggregatorKind::Fltrust,
        ..reject_rules()
    };
    let error = RoundAggregator::new(spec(config.clone(), global_model(1))).unwrap_err();
    assert_eq!(
        error,
        AggregationError::Config(ConfigError::MissingTrustedReference)
    );
    assert!(!error.is_retryable());

    let zero = map_from_flat(&SHAPES, &vec![0.0; parameters()]);
    let mut with_zero = spec(config.clone(), global_model(1));
    with_zero.trusted_reference = Some(zero);
    assert!(matches!(
        RoundAggregator::new(with_zero),
        Err(AggregationError::Config(ConfigError::ReferenceZero { .. }))
    ));

    let mut wrong_layout = spec(config, global_model(1));
    wrong_layout.trusted_reference = Some(map_from_flat(&[("w", &[3])], &[1.0, 2.0, 3.0]));
    assert!(matches!(
        RoundAggregator::new(wrong_layout),
        Err(AggregationError::Config(
            ConfigError::ReferenceLayout { .. }
        ))
    ));
}

#[test]
fn bad_specs_are_config_errors() {
    let mut config = reject_rules();
    config.trimmed_mean.trim_fraction = 0.7;
    assert!(matches!(
        RoundAggregator::new(spec(config, global_model(1))),
        Err(AggregationError::Config(ConfigError::Invalid {
            field: "trimmed_mean.trim_fraction",
            ..
        }))
    ));
    let mut global = global_model(1);
    global.get_mut("fc.bias").unwrap().data_mut()[0] = f32::NAN;
    assert_eq!(
        RoundAggregator::new(spec(reject_rules(), global)).unwrap_err(),
        AggregationError::Config(ConfigError::InvalidGlobal)
    );
    let mut previous_nan = spec(reject_rules(), global_model(1));
    let mut p = honest(1);
    p[3] = f32::NAN;
    previous_nan.previous_global_update = Some(map_from_flat(&SHAPES, &p));
    assert!(matches!(
        RoundAggregator::new(previous_nan),
        Err(AggregationError::Config(
            ConfigError::ReferenceNonFinite { .. }
        ))
    ));
}

#[test]
fn krum_needs_enough_updates() {
    let mut round = round(AggregationConfig {
        aggregator: AggregatorKind::MultiKrum,
        ..reject_rules()
    });
    for i in 0..4u8 {
        round
            .submit(candidate(i, 600, &honest(u64::from(i))))
            .unwrap();
    }
    let failure = round.finalize().unwrap_err();
    assert_eq!(
        failure.error,
        AggregationError::TooFewForKrum {
            available: 4,
            byzantine: 1,
            required: 5
        }
    );
}

#[test]
fn non_finite_model_is_an_error() {
    let mut global = global_model(1);
    global.get_mut("fc.bias").unwrap().data_mut()[0] = f32::MAX;
    let mut round = RoundAggregator::new(spec(
        AggregationConfig {
            defense: DefenseConfig::off(),
            ..reject_rules()
        },
        global,
    ))
    .unwrap();
    let mut big = honest(1);
    // fc.bias comes first after the conv tensors in name order.
    let offset = 8 + 8 * 36;
    big[offset] = f32::MAX;
    round.submit(candidate(1, 600, &big)).unwrap();
    assert_eq!(
        round.finalize().unwrap_err().error,
        AggregationError::NonFiniteModel
    );
}

#[test]
fn streaming_memory_is_flat_and_buffered_memory_grows() {
    let off = AggregationConfig {
        defense: DefenseConfig::off(),
        ..reject_rules()
    };
    for n in [5u8, 40, 100] {
        let mut streaming = round(off.clone());
        let mut buffered = round(reject_rules());
        assert!(streaming.is_streaming() && !buffered.is_streaming());
        for i in 0..n {
            streaming
                .submit(candidate(i, 600, &honest(u64::from(i))))
                .unwrap();
            buffered
                .submit(candidate(i, 600, &honest(u64::from(i))))
                .unwrap();
            assert_eq!(streaming.peak_buffered_bytes(), 0);
        }
        let s = streaming.finalize().unwrap();
        let b = buffered.finalize().unwrap();
        assert_eq!(s.stats.peak_buffered_bytes, 0);
        // An f32 group sum, plus the f64 carry once 32 updates were folded.
        let per_parameter = if n >= 32 { 12 } else { 4 };
        assert_eq!(
            s.stats.accumulator_bytes,
            per_parameter * parameters() as u64
        );
        assert_eq!(
            b.stats.peak_buffered_bytes,
            u64::from(n) * bytes_per_update()
        );
    }
}

#[test]
fn the_mode_follows_the_defense() {
    let previous = Some(map_from_flat(&SHAPES, &honest(99)));
    let mut on_arrival = reject_rules();
    on_arrival.defense.norm_bound.median_multiple = None;
    on_arrival.defense.norm_bound.absolute_max = Some(5.0);
    on_arrival.defense.norm_bound.action = NormAction::Clip;
    on_arrival.defense.similarity.reference = SimilarityReference::PreviousGlobalUpdate;
    on_arrival.defense.similarity.outlier_threshold = None;
    let with = |config: &AggregationConfig,
                previous: Option<qflare_protocol::tensor::TensorMap>| {
        RoundAggregator::new(RoundSpec {
            previous_global_update: previous,
            ..spec(config.clone(), global_model(1))
        })
        .unwrap()
        .is_streaming()
    };
    assert!(with(&on_arrival, previous.clone()));
    // Round 1 has no previous update: the fallback reference needs the round.
    assert!(!with(&on_arrival, None));
    let mut robust = on_arrival.clone();
    robust.aggregator = AggregatorKind::Median;
    assert!(!with(&robust, previous.clone()));
    let mut mad = on_arrival;
    mad.defense.similarity.outlier_threshold = Some(3.5);
    assert!(!with(&mad, previous));
}

#[test]
fn zero_previous_update_falls_back_to_the_round_median() {
    let config = AggregationConfig {
        defense: DefenseConfig::original_design(),
        ..reject_rules()
    };
    let mut spec = spec(config, global_model(1));
    spec.previous_global_update = Some(map_from_flat(&SHAPES, &vec![0.0; parameters()]));
    let mut round = RoundAggregator::new(spec).unwrap();
    for i in 0..5u8 {
        round
            .submit(candidate(i, 600, &honest(u64::from(i))))
            .unwrap();
    }
    let result = round.finalize().unwrap();
    assert_eq!(
        result.stats.similarity_reference,
        Some(ReferenceKind::RoundMedian)
    );
    assert_eq!(result.stats.accepted, 5);
}

#[test]
fn replays_and_retries() {
    let mut round = round(AggregationConfig {
        defense: DefenseConfig::off(),
        ..reject_rules()
    });
    // Another round's update does not use up the device's submission...
    let mut old = candidate(1, 600, &honest(1));
    old.round_id -= 1;
    assert_eq!(
        round.submit(old).unwrap(),
        Verdict::Rejected(VerdictReason::WrongRound)
    );
    assert_eq!(
        round.submit(candidate(1, 600, &honest(1))).unwrap(),
        Verdict::Accepted(VerdictReason::Accepted)
    );
    // ...but this round's, even a rejected one, does: no probing the defense.
    let mut bad = honest(2);
    bad[0] = f32::NAN;
    round.submit(candidate(2, 600, &bad)).unwrap();
    assert_eq!(
        round.submit(candidate(2, 600, &honest(2))).unwrap(),
        Verdict::Rejected(VerdictReason::Duplicate)
    );
    let result = round.finalize().unwrap();
    let codes: Vec<&str> = result.verdicts.iter().map(|v| v.reason.code()).collect();
    assert_eq!(
        codes,
        ["wrong_round", "accepted", "non_finite", "duplicate"]
    );
    assert_eq!(result.verdicts[1].weight, Some(1.0));
}

#[test]
fn debug_output_never_shows_weights() {
    let update = candidate(1, 600, &[0.123_456_7; 946]);
    let mut round = round(reject_rules());
    let shown = format!("{update:?} {round:?}");
    assert!(!shown.contains("0.123"), "{shown}");
    round.submit(update).unwrap();
    let result = round.finalize().unwrap();
    assert!(!format!("{:?}", result.verdicts).contains("0.123"));
}

#[test]
fn config_defaults_round_trip() {
    let config = AggregationConfig::default();
    let json = serde_json::to_string_pretty(&config).unwrap();
    assert_eq!(
        serde_json::from_str::<AggregationConfig>(&json).unwrap(),
        config
    );
    let yaml = serde_yaml_ng::to_string(&config).unwrap();
    assert_eq!(
        serde_yaml_ng::from_str::<AggregationConfig>(&yaml).unwrap(),
        config
    );
    assert_eq!(
        serde_json::from_str::<AggregationConfig>("{}").unwrap(),
        config
    );
    assert_eq!(config.defense, DefenseConfig::recommended());
    assert_eq!(config.aggregator, AggregatorKind::CenteredClipping);
    let old = "aggregator: fed_avg\ndefense: reject_outliers\n";
    assert_eq!(
        serde_yaml_ng::from_str::<AggregationConfig>(old).unwrap(),
        reject_rules()
    );
}

#[test]
fn config_presets_by_name_and_partial_maps() {
    let yaml = "aggregator: multi_krum\nmulti_krum: { byzantine: 2 }\ndefense: original_design\n";
    let config: AggregationConfig = serde_yaml_ng::from_str(yaml).unwrap();
    assert_eq!(config.aggregator, AggregatorKind::MultiKrum);
    assert_eq!(config.multi_krum.byzantine, 2);
    assert_eq!(config.multi_krum.select, None);
    assert_eq!(
        config.defense,
        DefenseConfig::preset(DefensePreset::OriginalDesign)
    );
    let config: AggregationConfig = serde_yaml_ng::from_str("defense: off\n").unwrap();
    assert_eq!(config.defense, DefenseConfig::off());
    let yaml =
        "defense:\n  norm_bound: { action: clip, median_multiple: null, absolute_max: 2.5 }\n";
    let config: AggregationConfig = serde_yaml_ng::from_str(yaml).unwrap();
    assert_eq!(config.defense.norm_bound.action, NormAction::Clip);
    assert_eq!(config.defense.norm_bound.absolute_max, Some(2.5));
    // Fields a map leaves out take the recommended values.
    assert_eq!(
        config.defense.similarity,
        DefenseConfig::recommended().similarity
    );
    config.validate().unwrap();
}

#[test]
fn config_rejects_unknown_keys_everywhere() {
    for bad in [
        "aggregatr: median\n",
        "trimmed_mean: { trim_fraction: 0.1, beta: 0.2 }\n",
        "multi_krum: { f: 1 }\n",
        "defense: { norm: {} }\n",
        "defense: { norm_bound: { action: reject, multiple: 3 } }\n",
        "defense: { similarity: { reference: round_median, k: 3 } }\n",
        "defense: paranoid\n",
        "aggregator: krum\n",
        "defense: { norm_bound: { action: shrink } }\n",
    ] {
        let error = serde_yaml_ng::from_str::<AggregationConfig>(bad).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("unknown") || text.contains("expected"),
            "{bad:?}: {text}"
        );
    }
    let error = serde_json::from_str::<AggregationConfig>(
        r#"{"defense": {"similarity": {"refrence": "off"}}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("unknown field `refrence`"), "{error}");
}

#[test]
fn rejected_updates_leave_no_trace_in_a_streaming_sum() {
    // Folding happens during the scan; a rejected update is retracted. Huge
    // or non-finite values are never folded, so nothing of the honest
    // partial sums is cancelled.
    let mut capped = reject_rules();
    capped.defense.norm_bound.median_multiple = None;
    capped.defense.norm_bound.absolute_max = Some(3.0);
    capped.defense.similarity.reference = SimilarityReference::Off;
    let off = AggregationConfig {
        defense: DefenseConfig::off(),
        ..reject_rules()
    };
    for config in [capped, off] {
        let mut clean = round(config.clone());
        let mut attacked = round(config);
        assert!(attacked.is_streaming());
        let mut huge_then_nan = vec![1e30f32; parameters()];
        huge_then_nan[parameters() - 1] = f32::NAN;
        let mut ordinary_then_inf = honest(40);
        ordinary_then_inf[parameters() - 1] = f32::INFINITY;
        for i in 0..6u8 {
            let update = honest(u64::from(i));
            clean
                .submit(candidate(i, 500 + u64::from(i), &update))
                .unwrap();
            attacked
                .submit(candidate(i, 500 + u64::from(i), &update))
                .unwrap();
            let verdict = match i {
                1 => attacked
                    .submit(candidate(100, 1000, &huge_then_nan))
                    .unwrap(),
                3 => attacked
                    .submit(candidate(101, 1000, &ordinary_then_inf))
                    .unwrap(),
                _ => continue,
            };
            assert_eq!(verdict, Verdict::Rejected(VerdictReason::NonFinite));
        }
        let clean = to_f64(&clean.finalize().unwrap().aggregated_update);
        let attacked = to_f64(&attacked.finalize().unwrap().aggregated_update);
        assert!(relative_distance(&attacked, &clean) < 1e-6);
    }
}
