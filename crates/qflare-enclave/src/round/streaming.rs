//! The streaming mode: a FedAvg round whose defense can be decided as each
//! update arrives. Each update is judged and folded into the round's
//! [`RunningSum`] in one pass ([`fold_and_judge`]) and then dropped; at the
//! end the mean of the sum is the aggregate ([`finish_streaming`]).
//!
//! `mod.rs` decides the mode, validates the update first, and records the
//! verdict this file returns; `buffered.rs` is the other mode.

use qflare_protocol::tensor::TensorMap;

use super::Reference;
use crate::aggregate::{RunningSum, cosine};
use crate::config::{DefenseConfig, NormAction};
use crate::defense::{self, NormJudgement};
use crate::error::{AggregationError, Result};
use crate::verdict::{DeviceVerdict, VerdictReason};

/// What the streaming path decided for one update: the verdict reason, its
/// score, the update's norm, and its cosine with the reference (if any).
pub(super) type Decided = (VerdictReason, Option<f64>, f64, Option<f64>);

/// Scans `delta`, folding `count · delta` into `sum` in the same pass, and
/// judges it against the norm bound and, when `previous` is given, the
/// minimum cosine. The fold is committed (clipped if need be) when the update
/// is accepted and retracted otherwise. `Err` is a validation failure (the
/// update is not finite or of another shape), with nothing folded.
pub(super) fn fold_and_judge(
    sum: &mut RunningSum,
    previous: Option<&Reference>,
    defense: &DefenseConfig,
    largest_accepted_norm: f64,
    delta: &TensorMap,
    count: u64,
) -> Result<Decided, VerdictReason> {
    // See `RunningSum::fold_scanned`: speculate only within the
    // absolute bound, or within 4× the largest norm accepted.
    let norm_bound = &defense.norm_bound;
    let speculate = match (norm_bound.action, norm_bound.absolute_max) {
        (NormAction::Reject | NormAction::Clip, Some(cap)) => cap,
        _ if sum.count() == 0 => f64::INFINITY,
        _ => 4.0 * largest_accepted_norm,
    };
    match sum.fold_scanned(
        delta,
        count as f64,
        previous.map(|r| &r.map),
        None,
        speculate,
    ) {
        Err(reason) => Err(reason),
        Ok(tentative) => {
            let scan = tentative.scan();
            let norm = scan.norm();
            let cos = previous.map(|r| cosine(scan.dot_a, norm, r.norm));
            // Streaming means the norm bound, if any, is absolute.
            let bound = defense::norm_bound(&defense.norm_bound, &[]);
            let judgement = defense::judge_norm(defense.norm_bound.action, bound, norm);
            let similarity = cos.map_or(Ok(()), |c| {
                defense::judge_min_cosine(&defense.similarity, c)
            });
            let (reason, score) = match (judgement, similarity) {
                (NormJudgement::Reject, _) => {
                    tentative.retract();
                    (VerdictReason::NormExceeded, Some(norm))
                }
                (_, Err((reason, score))) => {
                    tentative.retract();
                    (reason, Some(score))
                }
                (NormJudgement::Clip { scale }, Ok(())) => {
                    tentative.commit_scaled(scale);
                    (VerdictReason::Clipped, Some(norm))
                }
                (NormJudgement::Keep, Ok(())) => {
                    tentative.commit();
                    (VerdictReason::Accepted, None)
                }
            };
            Ok((reason, score, norm, cos))
        }
    }
}

/// The round's aggregate: the weighted mean of the sum, with each accepted
/// verdict given its share of the total weight.
pub(super) fn finish_streaming(
    sum: &RunningSum,
    verdicts: &mut [DeviceVerdict],
    example_counts: &[u64],
) -> Result<TensorMap> {
    let Some(mean) = sum.mean()? else {
        return Err(AggregationError::NoAcceptedUpdates {
            submitted: verdicts.len(),
        });
    };
    let total = sum.total_weight();
    for (verdict, &n) in verdicts.iter_mut().zip(example_counts) {
        if verdict.accepted {
            verdict.weight = Some(n as f64 / total);
        }
    }
    Ok(mean)
}
