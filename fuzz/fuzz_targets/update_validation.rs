//! Fuzz target: the enclave's update validation and aggregation round
//! (`qflare_enclave::RoundAggregator`), fed what the enclave service hands it
//! after opening an envelope: the signed metadata and a safetensors delta,
//! against a fixed two-tensor global model (8 parameters).
//!
//! The service's own `Submit` path is not reachable here: it needs the
//! `runtime` feature (burn, for FLTrust's reference training) and a real
//! signature and KEM decapsulation before any of this runs. The envelope
//! decoder in front of it is fuzzed by `wire_messages`.
//!
//! Input, little-endian:
//!
//! ```text
//! settings u8    bits 0-2 aggregator: fed_avg, trimmed_mean, median, multi_krum, fltrust,
//!                         centered_clipping, then centered_clipping and multi_krum after
//!                         nearest-neighbour mixing
//!                bits 3-4 defense: recommended, original_design, off, on-arrival
//!                         (absolute norm bound 4 and min cosine 0 against the previous update)
//!                bit 5    the round has a previous global update
//!                bit 6    a buffer budget of three updates instead of 4 GiB
//!                bit 7    the on-arrival defense clips instead of rejecting
//! then up to 16 submissions:
//!   flags u8     bits 0-2 device, bit 3 wrong round, bit 4 wrong model version,
//!                bit 5 the delta is a safetensors file (else 8 raw f32 in the global's layout)
//!   count u8     example count: 0 → 0, 254 → u64::MAX, 255 → cap + 1, n → 4n
//!   delta        8 × f32, or len u16 and that many bytes of safetensors
//! ```
//!
//! Besides "never panics", it checks: each verdict on arrival is the one the
//! validation order implies (round, version, duplicate, example count,
//! layout, finiteness); the round keeps one verdict per submission and
//! finalize keeps those decided on arrival; counts, weights and the new
//! model (global + aggregate, finite, same layout) agree; and an update
//! refused on arrival cannot change the round: a second round fed only the
//! other submissions ends bit for bit the same.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use qflare_enclave::config::{
    AggregationConfig, AggregatorKind, DefenseConfig, MixingConfig, NormAction, NormBoundConfig,
    SimilarityConfig, SimilarityReference,
};
use qflare_enclave::{
    CandidateUpdate, RoundAggregator, RoundFailure, RoundResult, RoundSpec, RoundStats, Verdict,
    VerdictReason,
};
use qflare_protocol::identity::DeviceId;
use qflare_protocol::tensor::{Tensor, TensorMap};
use qflare_protocol::wire::limits;

const ROUND: u64 = 7;
const VERSION: u64 = 3;
const MAX_EXAMPLES: u64 = 1000;
const MAX_SUBMISSIONS: usize = 16;
const PARAMETERS: usize = 8;

const GLOBAL: [f32; PARAMETERS] = [0.5, -0.25, 1.0, 2.0, -1.0, 0.125, 0.75, -0.5];
const PREVIOUS: [f32; PARAMETERS] = [0.1, 0.2, -0.1, 0.05, 0.0, 0.3, -0.2, 0.1];
const TRUSTED: [f32; PARAMETERS] = [0.05, 0.1, -0.05, 0.02, 0.01, 0.2, -0.1, 0.05];

/// A map in the global model's layout: `layer.bias` [2] then `layer.weight`
/// [2, 3] (name order, which is also the flat order).
fn in_layout(values: &[f32; PARAMETERS]) -> TensorMap {
    let mut map = TensorMap::new();
    let bias = Tensor::new(vec![2], values[..2].to_vec()).expect("2 values");
    let weight = Tensor::new(vec![2, 3], values[2..].to_vec()).expect("6 values");
    map.insert("layer.bias", bias).expect("valid name");
    map.insert("layer.weight", weight).expect("valid name");
    map
}

fn config(settings: u8) -> (AggregationConfig, bool) {
    // The last two draws put nearest-neighbour mixing before a robust rule.
    let (aggregator, mixing) = [
        (AggregatorKind::FedAvg, false),
        (AggregatorKind::TrimmedMean, false),
        (AggregatorKind::Median, false),
        (AggregatorKind::MultiKrum, false),
        (AggregatorKind::Fltrust, false),
        (AggregatorKind::CenteredClipping, false),
        (AggregatorKind::CenteredClipping, true),
        (AggregatorKind::MultiKrum, true),
    ][usize::from(settings & 7)];
    let defense = match (settings >> 3) & 3 {
        0 => DefenseConfig::recommended(),
        1 => DefenseConfig::original_design(),
        2 => DefenseConfig::off(),
        _ => DefenseConfig {
            norm_bound: NormBoundConfig {
                action: if settings & 0x80 != 0 {
                    NormAction::Clip
                } else {
                    NormAction::Reject
                },
                median_multiple: None,
                absolute_max: Some(4.0),
            },
            similarity: SimilarityConfig {
                reference: SimilarityReference::PreviousGlobalUpdate,
                min_cosine: Some(0.0),
                outlier_threshold: None,
                min_spread: 0.05,
            },
        },
    };
    let mut config = AggregationConfig {
        aggregator,
        defense,
        max_example_count: MAX_EXAMPLES,
        nearest_neighbor_mixing: mixing.then(MixingConfig::default),
        ..AggregationConfig::default()
    };
    if settings & 0x40 != 0 {
        config.max_buffered_bytes = 3 * 4 * PARAMETERS as u64;
    }
    (config, settings & 0x20 != 0)
}

fn spec(config: &AggregationConfig, previous: bool) -> RoundSpec {
    RoundSpec {
        round_id: ROUND,
        base_model_version: VERSION,
        global: in_layout(&GLOBAL),
        previous_global_update: previous.then(|| in_layout(&PREVIOUS)),
        trusted_reference: Some(in_layout(&TRUSTED)),
        config: config.clone(),
        expected_participants: None,
    }
}

struct Submission {
    device: u8,
    round_id: u64,
    base_model_version: u64,
    example_count: u64,
    delta: TensorMap,
}

impl Submission {
    fn candidate(&self) -> CandidateUpdate {
        CandidateUpdate {
            device_id: DeviceId::from_bytes([self.device; 16]),
            round_id: self.round_id,
            base_model_version: self.base_model_version,
            example_count: self.example_count,
            delta: self.delta.clone(),
        }
    }
}

/// The submissions in `data`. A delta that is not a decodable safetensors
/// file is skipped: the service refuses it (`malformed_update`) before the
/// aggregator sees it.
fn submissions(mut rest: &[u8]) -> Vec<Submission> {
    let mut out = Vec::new();
    while out.len() < MAX_SUBMISSIONS && rest.len() >= 2 {
        let (flags, count) = (rest[0], rest[1]);
        rest = &rest[2..];
        let delta = if flags & 0x20 != 0 {
            if rest.len() < 2 {
                break;
            }
            let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
            let (file, tail) = rest[2..].split_at(len);
            rest = tail;
            match TensorMap::from_safetensors(file, limits::TENSORS) {
                Ok(map) => map,
                Err(_) => continue,
            }
        } else {
            if rest.len() < 4 * PARAMETERS {
                break;
            }
            let mut values = [0f32; PARAMETERS];
            for (value, bytes) in values.iter_mut().zip(rest.chunks_exact(4)) {
                *value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
            rest = &rest[4 * PARAMETERS..];
            in_layout(&values)
        };
        out.push(Submission {
            device: flags & 7,
            round_id: if flags & 0x08 != 0 { ROUND - 1 } else { ROUND },
            base_model_version: if flags & 0x10 != 0 {
                VERSION + 1
            } else {
                VERSION
            },
            example_count: match count {
                0 => 0,
                254 => u64::MAX,
                255 => MAX_EXAMPLES + 1,
                n => 4 * u64::from(n),
            },
            delta,
        });
    }
    out
}

/// The reason validation must give on arrival, if it refuses the update.
fn refusal(s: &Submission, submitted: &BTreeSet<u8>) -> Option<VerdictReason> {
    if s.round_id != ROUND {
        Some(VerdictReason::WrongRound)
    } else if s.base_model_version != VERSION {
        Some(VerdictReason::WrongModelVersion)
    } else if submitted.contains(&s.device) {
        Some(VerdictReason::Duplicate)
    } else if s.example_count == 0 || s.example_count > MAX_EXAMPLES {
        Some(VerdictReason::BadExampleCount)
    } else if !s.delta.same_layout(&in_layout(&GLOBAL)) {
        Some(VerdictReason::WrongShape)
    } else if s.delta.first_non_finite().is_some() {
        Some(VerdictReason::NonFinite)
    } else {
        None
    }
}

/// Refusals that leave no trace in the round's state but the verdict.
fn stateless(reason: VerdictReason, streaming: bool) -> bool {
    match reason {
        VerdictReason::WrongRound
        | VerdictReason::WrongModelVersion
        | VerdictReason::Duplicate
        | VerdictReason::BadExampleCount
        | VerdictReason::WrongShape => true,
        // Streaming folds while it scans and retracts by subtraction, which
        // may leave rounding behind (see `RunningSum::fold_scanned`).
        VerdictReason::NonFinite => !streaming,
        _ => false,
    }
}

fn bits(map: &TensorMap) -> Vec<u32> {
    map.to_flat().iter().map(|v| v.to_bits()).collect()
}

/// What must not depend on refused submissions: everything but the counts
/// of submissions and rejections.
fn comparable(stats: &RoundStats) -> String {
    let mut stats = stats.clone();
    stats.submitted = 0;
    stats.rejected = 0;
    format!("{stats:?}")
}

type Outcome = Result<RoundResult, Box<RoundFailure>>;

fuzz_target!(|data: &[u8]| {
    let Some((&settings, rest)) = data.split_first() else {
        return;
    };
    let (config, previous) = config(settings);
    let subs = submissions(rest);

    let mut round = RoundAggregator::new(spec(&config, previous)).expect("a valid round");
    let streaming = round.is_streaming();
    let mut submitted = BTreeSet::new();
    // Per submission: whether the round recorded it, and its arrival refusal.
    let mut recorded: Vec<(usize, Option<VerdictReason>)> = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        let expected = refusal(s, &submitted);
        let result = round.submit(s.candidate());
        match (expected, &result) {
            (Some(reason), Ok(verdict)) => assert_eq!(*verdict, Verdict::Rejected(reason)),
            (Some(reason), Err(err)) => panic!("{reason} expected, round error {err}"),
            (None, Ok(Verdict::Pending)) => assert!(!streaming),
            (None, Ok(Verdict::Accepted(reason))) => assert!(streaming && reason.is_accepted()),
            (None, Ok(Verdict::Rejected(reason))) => assert!(
                streaming
                    && matches!(
                        reason,
                        VerdictReason::NormExceeded | VerdictReason::LowSimilarity
                    ),
                "{reason} on arrival"
            ),
            // Only the buffer budget refuses the round's memory.
            (None, Err(_)) => assert!(!streaming && config.max_buffered_bytes < 1 << 20),
        }
        if result.is_ok() {
            if !matches!(
                expected,
                Some(VerdictReason::WrongRound | VerdictReason::WrongModelVersion)
            ) {
                submitted.insert(s.device);
            }
            recorded.push((i, expected));
        }
        assert_eq!(round.verdicts().len(), recorded.len());
    }
    let outcome: Outcome = round.finalize();
    check_outcome(&outcome, &config, &subs, &recorded);

    // The same round without the submissions refused on arrival.
    let kept: Vec<usize> = recorded
        .iter()
        .filter(|(_, refused)| !refused.is_some_and(|r| stateless(r, streaming)))
        .map(|&(i, _)| i)
        .collect();
    let mut twin = RoundAggregator::new(spec(&config, previous)).expect("a valid round");
    for &i in &kept {
        twin.submit(subs[i].candidate())
            .expect("the twin buffers no more than the round");
    }
    let twin_outcome = twin.finalize();
    let original_verdicts = |o: &Outcome| match o {
        Ok(r) => r.verdicts.clone(),
        Err(f) => f.verdicts.clone(),
    };
    let all = original_verdicts(&outcome);
    let expected_twin: Vec<String> = recorded
        .iter()
        .zip(&all)
        .filter(|((i, _), _)| kept.contains(i))
        .map(|(_, v)| format!("{v:?}"))
        .collect();
    let got_twin: Vec<String> = original_verdicts(&twin_outcome)
        .iter()
        .map(|v| format!("{v:?}"))
        .collect();
    assert_eq!(got_twin, expected_twin, "refused updates changed verdicts");
    match (&outcome, &twin_outcome) {
        (Ok(a), Ok(b)) => {
            assert_eq!(bits(&a.new_global), bits(&b.new_global));
            assert_eq!(bits(&a.aggregated_update), bits(&b.aggregated_update));
            assert_eq!(comparable(&a.stats), comparable(&b.stats));
        }
        (Err(a), Err(b)) => {
            assert_eq!(
                std::mem::discriminant(&a.error),
                std::mem::discriminant(&b.error)
            );
            assert_eq!(comparable(&a.stats), comparable(&b.stats));
        }
        (a, b) => panic!(
            "refused updates changed the outcome: {:?} vs {:?}",
            a.as_ref().err().map(|f| &f.error),
            b.as_ref().err().map(|f| &f.error)
        ),
    }
});

fn check_outcome(
    outcome: &Outcome,
    config: &AggregationConfig,
    subs: &[Submission],
    recorded: &[(usize, Option<VerdictReason>)],
) {
    let (verdicts, stats) = match outcome {
        Ok(r) => (&r.verdicts, &r.stats),
        Err(f) => (&f.verdicts, &f.stats),
    };
    assert_eq!(verdicts.len(), recorded.len());
    assert_eq!(stats.submitted, recorded.len());
    let mut accepted_examples = 0u64;
    let mut weights = 0f64;
    let mut weighted = false;
    for (verdict, &(i, refused)) in verdicts.iter().zip(recorded) {
        assert_eq!(
            verdict.device_id,
            DeviceId::from_bytes([subs[i].device; 16])
        );
        assert_eq!(verdict.accepted, verdict.reason.is_accepted());
        if let Some(reason) = refused {
            assert_eq!(
                verdict.reason, reason,
                "finalize changed an arrival refusal"
            );
        }
        if verdict.accepted {
            accepted_examples += subs[i].example_count;
            if let Some(w) = verdict.weight {
                assert!((0.0..=1.0 + 1e-9).contains(&w), "weight {w}");
                weights += w;
                weighted = true;
            }
        } else {
            assert_eq!(verdict.weight, None, "a rejected update has a weight");
        }
    }
    let accepted = verdicts.iter().filter(|v| v.accepted).count();
    assert_eq!(stats.accepted, accepted);
    assert_eq!(stats.accepted + stats.rejected, stats.submitted);
    if let Ok(result) = outcome {
        assert!(accepted >= config.min_accepted.max(1));
        assert_eq!(stats.accepted_examples, accepted_examples);
        if weighted {
            assert!((weights - 1.0).abs() < 1e-6, "weights sum to {weights}");
        }
        let global = in_layout(&GLOBAL);
        assert!(result.new_global.same_layout(&global));
        assert!(result.aggregated_update.same_layout(&global));
        assert_eq!(result.new_global.first_non_finite(), None);
        let sum: Vec<u32> = GLOBAL
            .iter()
            .zip(result.aggregated_update.to_flat())
            .map(|(g, u)| (g + u).to_bits())
            .collect();
        assert_eq!(
            bits(&result.new_global),
            sum,
            "new model ≠ global + aggregate"
        );
    }
}
