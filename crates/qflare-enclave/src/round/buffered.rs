//! The buffered mode: any round that needs all its updates before it can
//! judge them (a round-relative defense or a robust aggregator).
//!
//! [`submit_buffered`](RoundAggregator::submit_buffered) scans each validated
//! update and holds it, within `max_buffered_bytes`; at
//! [`finalize`](RoundAggregator::finalize), [`Screen`] runs the norm bound,
//! the similarity checks and the MAD rule over the held updates and then the
//! configured aggregator from [`crate::aggregate`]. `streaming.rs` is the
//! other mode.

use qflare_protocol::identity::DeviceId;
use qflare_protocol::tensor::TensorMap;

use super::{Mode, Reference, ReferenceKind, RoundAggregator, RoundStats};
use crate::aggregate::{
    self, Layout, cosine, fltrust_combine, linear_combination, scale_in_place, trust_scores, wipe,
};
use crate::config::{AggregationConfig, AggregatorKind, NormAction, SimilarityReference};
use crate::defense::{self, NormBound, NormJudgement, SimilaritySpread};
use crate::error::{AggregationError, ConfigError, Result};
use crate::validate::{Plaintext, scan_update};
use crate::verdict::{DeviceVerdict, Verdict, VerdictReason};

/// A validated update waiting for the end of the round.
pub(super) struct Held {
    verdict: usize,
    example_count: u64,
    delta: Plaintext,
    /// Norm as submitted.
    norm: f64,
    /// Factor applied by clipping (1 when not clipped).
    scale: f64,
    dot_previous: f64,
    dot_trusted: f64,
}

impl RoundAggregator {
    /// Buffered mode's part of [`submit`](RoundAggregator::submit), after the
    /// checks every mode makes: scan the update and hold it (`Pending`), or
    /// refuse the round's memory bound.
    pub(super) fn submit_buffered(
        &mut self,
        device: DeviceId,
        count: u64,
        delta: Plaintext,
        uses_previous: bool,
    ) -> Result<Verdict> {
        let previous = self.previous.as_ref().filter(|_| uses_previous);
        let scan = match scan_update(
            &delta.0,
            previous.map(|r| &r.map),
            self.trusted.as_ref().map(|r| &r.map),
        ) {
            Ok(scan) => scan,
            Err(reason) => {
                self.seen.insert(device);
                return Ok(self.reject(device, reason, None, None));
            }
        };
        let needed = self.buffered_bytes + self.layout.update_bytes();
        if needed > self.config.max_buffered_bytes {
            tracing::warn!(
                round_id = self.expect.round_id,
                needed,
                limit = self.config.max_buffered_bytes,
                "update refused: memory bound reached"
            );
            return Err(AggregationError::MemoryBoundExceeded {
                needed,
                limit: self.config.max_buffered_bytes,
            });
        }
        self.seen.insert(device);
        let norm = scan.norm();
        self.norms.push(norm);
        let mut verdict = DeviceVerdict::new(device, VerdictReason::Accepted);
        verdict.norm = Some(norm);
        let index = self.record(verdict, count);
        self.buffered_bytes = needed;
        self.peak_buffered_bytes = self.peak_buffered_bytes.max(needed);
        if let Mode::Buffered(held) = &mut self.mode {
            held.push(Held {
                verdict: index,
                example_count: count,
                delta,
                norm,
                scale: 1.0,
                dot_previous: scan.dot_a,
                dot_trusted: scan.dot_b,
            });
        }
        Ok(Verdict::Pending)
    }
}

/// The whole-round defense and aggregation of buffered mode.
pub(super) struct Screen<'a> {
    pub(super) config: &'a AggregationConfig,
    pub(super) layout: &'a Layout,
    pub(super) previous: Option<&'a Reference>,
    pub(super) trusted: Option<&'a Reference>,
}

impl Screen<'_> {
    /// Runs the defense over `held`, deciding their verdicts, and aggregates
    /// the survivors.
    pub(super) fn run(
        &self,
        held: &mut [Held],
        verdicts: &mut [DeviceVerdict],
        stats: &mut RoundStats,
    ) -> Result<TensorMap> {
        let mut live: Vec<usize> = (0..held.len()).collect();
        self.norm_bound(held, verdicts, stats, &mut live);
        self.similarity(held, verdicts, stats, &mut live)?;
        if live.is_empty() {
            return Err(AggregationError::NoAcceptedUpdates {
                submitted: verdicts.len(),
            });
        }
        let aggregate = self.aggregate(held, verdicts, &live)?;
        for &i in &live {
            let verdict = &verdicts[held[i].verdict];
            tracing::debug!(
                round_id = stats.round_id,
                device = %verdict.device_id,
                code = verdict.reason.code(),
                "final verdict"
            );
        }
        Ok(aggregate)
    }

    fn norm_bound(
        &self,
        held: &mut [Held],
        verdicts: &mut [DeviceVerdict],
        stats: &mut RoundStats,
        live: &mut Vec<usize>,
    ) {
        let config = &self.config.defense.norm_bound;
        let norms: Vec<f64> = live.iter().map(|&i| held[i].norm).collect();
        let bound: Option<NormBound> = defense::norm_bound(config, &norms);
        stats.norm_bound = bound.map(|b| b.bound);
        if config.action == NormAction::Off {
            return;
        }
        live.retain(|&i| {
            let h = &mut held[i];
            match defense::judge_norm(config.action, bound, h.norm) {
                NormJudgement::Keep => true,
                NormJudgement::Reject => {
                    verdicts[h.verdict].decide(VerdictReason::NormExceeded, Some(h.norm));
                    false
                }
                NormJudgement::Clip { scale } => {
                    scale_in_place(&mut h.delta.0, scale as f32);
                    h.scale = scale;
                    verdicts[h.verdict].decide(VerdictReason::Clipped, Some(h.norm));
                    true
                }
            }
        });
    }

    fn similarity(
        &self,
        held: &[Held],
        verdicts: &mut [DeviceVerdict],
        stats: &mut RoundStats,
        live: &mut Vec<usize>,
    ) -> Result<()> {
        let config = &self.config.defense.similarity;
        if config.reference == SimilarityReference::Off || live.is_empty() {
            return Ok(());
        }
        let previous = self
            .previous
            .filter(|_| config.reference == SimilarityReference::PreviousGlobalUpdate);
        let cosines: Vec<f64> = match previous {
            Some(reference) => {
                stats.similarity_reference = Some(ReferenceKind::PreviousGlobalUpdate);
                // Computed at submit; clipping scales dot and norm alike.
                live.iter()
                    .map(|&i| cosine(held[i].dot_previous, held[i].norm, reference.norm))
                    .collect()
            }
            None => {
                stats.similarity_reference = Some(ReferenceKind::RoundMedian);
                let updates: Vec<&TensorMap> = live.iter().map(|&i| &held[i].delta.0).collect();
                let mut median = aggregate::coordinate_median(&updates, self.layout)?;
                let median_norm = scan_update(&median, None, None)
                    .map_err(|_| AggregationError::NonFiniteUpdate)?
                    .norm();
                let cosines = updates
                    .iter()
                    .map(|u| {
                        scan_update(u, Some(&median), None)
                            .map(|s| cosine(s.dot_a, s.norm(), median_norm))
                            .map_err(|_| AggregationError::NonFiniteUpdate)
                    })
                    .collect::<Result<Vec<f64>>>();
                // The median is built from a few devices' values: wipe it.
                wipe(&mut median);
                cosines?
            }
        };
        let mut survivors = Vec::with_capacity(live.len());
        let mut survivor_cosines = Vec::with_capacity(live.len());
        for (&i, &cos) in live.iter().zip(&cosines) {
            let verdict = &mut verdicts[held[i].verdict];
            verdict.cosine = Some(cos);
            match defense::judge_min_cosine(config, cos) {
                Ok(()) => {
                    survivors.push(i);
                    survivor_cosines.push(cos);
                }
                Err((reason, score)) => verdict.decide(reason, Some(score)),
            }
        }
        *live = survivors;
        if config.outlier_threshold.is_none() {
            return Ok(());
        }
        let Some(spread) = SimilaritySpread::of(&survivor_cosines, config.min_spread) else {
            return Ok(());
        };
        stats.similarity_median = Some(spread.median);
        stats.similarity_mad = Some(spread.mad);
        let mut kept = Vec::with_capacity(live.len());
        for (&i, &cos) in live.iter().zip(&survivor_cosines) {
            match defense::judge_outlier(config, &spread, cos) {
                Ok(()) => kept.push(i),
                Err((reason, score)) => verdicts[held[i].verdict].decide(reason, Some(score)),
            }
        }
        *live = kept;
        Ok(())
    }

    fn aggregate(
        &self,
        held: &[Held],
        verdicts: &mut [DeviceVerdict],
        live: &[usize],
    ) -> Result<TensorMap> {
        let own: Vec<&TensorMap> = live.iter().map(|&i| &held[i].delta.0).collect();
        let layout = self.layout;
        let mut mixed = match &self.config.nearest_neighbor_mixing {
            Some(mixing) => {
                let byzantine = (mixing.byzantine_fraction * own.len() as f64).floor() as usize;
                aggregate::nearest_neighbor_mixing(&own, byzantine, layout)?
            }
            None => Vec::new(),
        };
        let updates: Vec<&TensorMap> = if mixed.is_empty() {
            own
        } else {
            mixed.iter().collect()
        };
        let result = self.combine(held, verdicts, live, &updates);
        // Mixed updates are built from a few devices' values: wipe them.
        mixed.iter_mut().for_each(wipe);
        result
    }

    fn combine(
        &self,
        held: &[Held],
        verdicts: &mut [DeviceVerdict],
        live: &[usize],
        updates: &[&TensorMap],
    ) -> Result<TensorMap> {
        let layout = self.layout;
        match self.config.aggregator {
            AggregatorKind::FedAvg => {
                let weights: Vec<f64> =
                    live.iter().map(|&i| held[i].example_count as f64).collect();
                let total: f64 = weights.iter().sum();
                for (&i, &w) in live.iter().zip(&weights) {
                    verdicts[held[i].verdict].weight = Some(w / total);
                }
                linear_combination(updates, &weights, total, layout)
            }
            AggregatorKind::TrimmedMean => {
                aggregate::trimmed_mean(updates, self.config.trimmed_mean.trim_fraction, layout)
            }
            AggregatorKind::Median => aggregate::coordinate_median(updates, layout),
            AggregatorKind::MultiKrum => {
                let krum = &self.config.multi_krum;
                let selection =
                    aggregate::krum_select(updates, krum.byzantine, krum.select, layout)?;
                let share = 1.0 / selection.selected.len() as f64;
                let mut chosen = Vec::with_capacity(selection.selected.len());
                for (k, &i) in live.iter().enumerate() {
                    let verdict = &mut verdicts[held[i].verdict];
                    let score = selection.scores[k];
                    if selection.selected.binary_search(&k).is_ok() {
                        verdict.score = Some(score);
                        verdict.weight = Some(share);
                        chosen.push(updates[k]);
                    } else {
                        verdict.decide(VerdictReason::KrumExcluded, Some(score));
                    }
                }
                let ones = vec![1.0; chosen.len()];
                aggregate::weighted_mean(&chosen, &ones, layout)
            }
            AggregatorKind::CenteredClipping => {
                let settings = &self.config.centered_clipping;
                let outcome = aggregate::centered_clipping(
                    updates,
                    settings.radius_multiple,
                    settings.iterations,
                    layout,
                )?;
                for (&i, &factor) in live.iter().zip(&outcome.clip_factors) {
                    verdicts[held[i].verdict].score = Some(factor);
                }
                Ok(outcome.aggregate)
            }
            AggregatorKind::Fltrust => {
                let Some(reference) = self.trusted else {
                    return Err(ConfigError::MissingTrustedReference.into());
                };
                // Cosines are scale-free, so the pre-clipping dot and norm do.
                let cosines: Vec<f64> = live
                    .iter()
                    .map(|&i| cosine(held[i].dot_trusted, held[i].norm, reference.norm))
                    .collect();
                let trust = trust_scores(&cosines);
                let total: f64 = trust.iter().sum();
                let norms: Vec<f64> = live.iter().map(|&i| held[i].norm * held[i].scale).collect();
                for ((&i, &cos), &t) in live.iter().zip(&cosines).zip(&trust) {
                    let verdict = &mut verdicts[held[i].verdict];
                    if t > 0.0 {
                        verdict.score = Some(t);
                        verdict.weight = Some(t / total);
                    } else {
                        verdict.decide(VerdictReason::FltrustZeroTrust, Some(cos));
                    }
                }
                fltrust_combine(updates, &norms, &trust, reference.norm, layout)
            }
        }
    }
}
