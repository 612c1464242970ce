//! One aggregation round: validate each update as it arrives, run the
//! defense, aggregate, and produce the new global model with a verdict per
//! device.
//!
//! # Streaming or buffered
//!
//! A round **streams** when the aggregator is FedAvg and every defense check
//! can be decided as each update arrives (see
//! [`DefenseConfig::decides_on_arrival`]): each accepted update is folded into
//! a [`RunningSum`] and dropped, so memory is O(model size) whatever the
//! number of devices. Otherwise (a median-relative norm bound, a round-median
//! reference, the MAD rule, or a robust aggregator) the round **buffers**
//! validated updates, at most `max_buffered_bytes` of them, checked on every
//! submit. [`RoundAggregator::is_streaming`] says which; [`RoundStats`]
//! reports the peak buffered bytes.
//!
//! [`DefenseConfig::decides_on_arrival`]: crate::config::DefenseConfig::decides_on_arrival

use std::collections::BTreeSet;
use std::fmt;

use qflare_protocol::identity::DeviceId;
use qflare_protocol::tensor::TensorMap;
use serde::{Deserialize, Serialize};

use crate::aggregate::{
    self, Layout, RunningSum, cosine, fltrust_combine, linear_combination, scale_in_place,
    trust_scores, wipe,
};
use crate::config::{AggregationConfig, AggregatorKind, NormAction, SimilarityReference};
use crate::defense::{self, NormBound, NormJudgement, SimilaritySpread};
use crate::error::{AggregationError, ConfigError, Result};
use crate::validate::{CandidateUpdate, Plaintext, RoundExpectations, check_layout, scan_update};
use crate::verdict::{DeviceVerdict, Verdict, VerdictReason};

/// Everything a round needs, handed over by the caller (the enclave's frame
/// protocol).
#[derive(Debug)]
pub struct RoundSpec {
    /// The round being aggregated.
    pub round_id: u64,
    /// The version of `global`; updates must have been trained from it.
    pub base_model_version: u64,
    /// The global model the devices started from.
    pub global: TensorMap,
    /// The previous round's aggregated update (the last change to the global
    /// model), if there was one: a reference direction for the defense.
    pub previous_global_update: Option<TensorMap>,
    /// FLTrust's root-of-trust update g₀, trained by the server on a small
    /// clean data set from `global`. Required by FLTrust, ignored otherwise.
    pub trusted_reference: Option<TensorMap>,
    /// The settings.
    pub config: AggregationConfig,
}

/// Which reference direction the similarity check used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceKind {
    /// The previous round's global update.
    PreviousGlobalUpdate,
    /// The coordinate-wise median of this round's updates.
    RoundMedian,
}

/// Round-level numbers for the ledger and the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// The round.
    pub round_id: u64,
    /// The aggregator used.
    pub aggregator: AggregatorKind,
    /// True when updates were folded on arrival rather than buffered.
    pub streaming: bool,
    /// Updates submitted (every call to `submit` that returned a verdict).
    pub submitted: usize,
    /// Updates aggregated.
    pub accepted: usize,
    /// Updates rejected.
    pub rejected: usize,
    /// Accepted updates that were clipped.
    pub clipped: usize,
    /// Σ example counts of the accepted updates.
    pub accepted_examples: u64,
    /// Median L2 norm of the updates that passed validation.
    pub median_norm: Option<f64>,
    /// The norm bound applied, if any.
    pub norm_bound: Option<f64>,
    /// The reference direction of the similarity check, if it ran.
    pub similarity_reference: Option<ReferenceKind>,
    /// Median cosine similarity seen by the MAD rule.
    pub similarity_median: Option<f64>,
    /// MAD of those similarities.
    pub similarity_mad: Option<f64>,
    /// L2 norm of the aggregated update.
    pub aggregated_norm: Option<f64>,
    /// Most bytes of update data held at once.
    pub peak_buffered_bytes: u64,
    /// Bytes of the streaming accumulator (0 when buffering).
    pub accumulator_bytes: u64,
}

/// A successful round.
#[derive(Debug)]
pub struct RoundResult {
    /// global + aggregated update.
    pub new_global: TensorMap,
    /// The aggregated delta (the next round's `previous_global_update`).
    pub aggregated_update: TensorMap,
    /// One verdict per submission, in arrival order.
    pub verdicts: Vec<DeviceVerdict>,
    /// Round-level numbers.
    pub stats: RoundStats,
}

/// A round that produced no model. The verdicts reached so far still belong
/// in the audit ledger; the round must be retried.
#[derive(Debug, thiserror::Error)]
#[error("round {}: {error}", stats.round_id)]
pub struct RoundFailure {
    /// Why.
    #[source]
    pub error: AggregationError,
    /// The verdicts as far as the round got. Nothing was aggregated, whatever
    /// they say.
    pub verdicts: Vec<DeviceVerdict>,
    /// Round-level numbers as far as the round got.
    pub stats: RoundStats,
}

struct Reference {
    map: TensorMap,
    norm: f64,
}

/// A validated update waiting for the end of the round.
struct Held {
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

enum Mode {
    Streaming(RunningSum),
    Buffered(Vec<Held>),
}

/// Aggregates one round. Build it with [`RoundAggregator::new`], feed it
/// with [`submit`](Self::submit), and consume it with
/// [`finalize`](Self::finalize).
pub struct RoundAggregator {
    expect: RoundExpectations,
    global: TensorMap,
    layout: Layout,
    config: AggregationConfig,
    previous: Option<Reference>,
    trusted: Option<Reference>,
    mode: Mode,
    seen: BTreeSet<DeviceId>,
    verdicts: Vec<DeviceVerdict>,
    example_counts: Vec<u64>,
    norms: Vec<f64>,
    largest_accepted_norm: f64,
    buffered_bytes: u64,
    peak_buffered_bytes: u64,
}

impl fmt::Debug for RoundAggregator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoundAggregator")
            .field("round_id", &self.expect.round_id)
            .field("aggregator", &self.config.aggregator)
            .field("streaming", &self.is_streaming())
            .field("submitted", &self.verdicts.len())
            .field("buffered_bytes", &self.buffered_bytes)
            .finish_non_exhaustive()
    }
}

fn check_reference(
    map: TensorMap,
    layout: &Layout,
    what: &'static str,
) -> Result<Reference, ConfigError> {
    if !layout.matches(&map) {
        return Err(ConfigError::ReferenceLayout { what });
    }
    let norm = scan_update(&map, None, None)
        .map_err(|_| ConfigError::ReferenceNonFinite { what })?
        .norm();
    Ok(Reference { map, norm })
}

impl RoundAggregator {
    /// Starts a round. Fails on an invalid configuration, a global model
    /// that is empty or not finite, a reference of another layout or not
    /// finite, and FLTrust without a (non-zero) trusted reference.
    pub fn new(spec: RoundSpec) -> Result<Self> {
        let RoundSpec {
            round_id,
            base_model_version,
            global,
            previous_global_update,
            trusted_reference,
            config,
        } = spec;
        config.validate()?;
        let layout = Layout::of(&global);
        if layout.num_parameters() == 0 || scan_update(&global, None, None).is_err() {
            return Err(ConfigError::InvalidGlobal.into());
        }
        // A zero previous update (a round that changed nothing) has no
        // direction: treat it as absent, which falls back to the round median.
        let previous = previous_global_update
            .map(|m| check_reference(m, &layout, "previous global update"))
            .transpose()?
            .filter(|r| r.norm > 0.0);
        let trusted = if config.aggregator == AggregatorKind::Fltrust {
            let map = trusted_reference.ok_or(ConfigError::MissingTrustedReference)?;
            let what = "trusted reference update";
            let reference = check_reference(map, &layout, what)?;
            if reference.norm <= 0.0 {
                return Err(ConfigError::ReferenceZero { what }.into());
            }
            Some(reference)
        } else {
            None
        };
        let streaming = config.aggregator == AggregatorKind::FedAvg
            && config.defense.decides_on_arrival(previous.is_some());
        let mode = if streaming {
            Mode::Streaming(RunningSum::new(layout.clone()))
        } else {
            Mode::Buffered(Vec::new())
        };
        tracing::debug!(
            round_id,
            aggregator = config.aggregator.as_str(),
            streaming,
            parameters = layout.num_parameters(),
            "aggregation round opened"
        );
        Ok(Self {
            expect: RoundExpectations {
                round_id,
                base_model_version,
                max_example_count: config.max_example_count,
            },
            global,
            layout,
            config,
            previous,
            trusted,
            mode,
            seen: BTreeSet::new(),
            verdicts: Vec::new(),
            example_counts: Vec::new(),
            norms: Vec::new(),
            largest_accepted_norm: 0.0,
            buffered_bytes: 0,
            peak_buffered_bytes: 0,
        })
    }

    /// True when accepted updates are folded on arrival (O(model) memory),
    /// false when the round buffers them until [`finalize`](Self::finalize).
    pub fn is_streaming(&self) -> bool {
        matches!(self.mode, Mode::Streaming(_))
    }

    /// Bytes of update data buffered now.
    pub fn buffered_bytes(&self) -> u64 {
        self.buffered_bytes
    }

    /// Most bytes of update data buffered at once so far.
    pub fn peak_buffered_bytes(&self) -> u64 {
        self.peak_buffered_bytes
    }

    /// Verdicts so far, in arrival order (buffered ones are provisional).
    pub fn verdicts(&self) -> &[DeviceVerdict] {
        &self.verdicts
    }

    /// Whether the defense compares with the previous global update this
    /// round (configured, and the round has one).
    fn uses_previous(&self) -> bool {
        self.config.defense.similarity.reference == SimilarityReference::PreviousGlobalUpdate
            && self.previous.is_some()
    }

    fn record(&mut self, verdict: DeviceVerdict, example_count: u64) -> usize {
        tracing::debug!(
            round_id = self.expect.round_id,
            device = %verdict.device_id,
            code = verdict.reason.code(),
            score = verdict.score,
            "update verdict"
        );
        self.verdicts.push(verdict);
        self.example_counts.push(example_count);
        self.verdicts.len() - 1
    }

    fn reject(
        &mut self,
        device: DeviceId,
        reason: VerdictReason,
        norm: Option<f64>,
        score: Option<f64>,
    ) -> Verdict {
        let mut verdict = DeviceVerdict::new(device, reason);
        verdict.norm = norm;
        verdict.score = score;
        self.record(verdict, 0);
        Verdict::Rejected(reason)
    }

    /// Validates an opened update and, depending on the mode, folds it
    /// (streaming: final verdict) or buffers it (the defense decides at
    /// [`finalize`](Self::finalize): `Verdict::Pending`).
    ///
    /// `Err` only for the round, never for the update: buffering it would
    /// pass `max_buffered_bytes`. The update is then not recorded, and its
    /// plaintext is zeroized.
    pub fn submit(&mut self, mut update: CandidateUpdate) -> Result<Verdict> {
        let device = update.device_id;
        let already = self.seen.contains(&device);
        if let Err(reason) = self.expect.check_metadata(&update, already) {
            // A wrong round or model version is not this round's update, so
            // it does not use up the device's one submission.
            if !matches!(
                reason,
                VerdictReason::WrongRound | VerdictReason::WrongModelVersion
            ) {
                self.seen.insert(device);
            }
            return Ok(self.reject(device, reason, None, None));
        }
        if let Err(reason) = check_layout(&update.delta, &self.global) {
            self.seen.insert(device);
            return Ok(self.reject(device, reason, None, None));
        }
        let count = update.example_count;
        let delta = update.take_delta();
        let uses_previous = self.uses_previous();
        match &mut self.mode {
            Mode::Streaming(sum) => {
                let previous = self.previous.as_ref().filter(|_| uses_previous);
                // See `RunningSum::fold_scanned`: speculate only within the
                // absolute bound, or within 4× the largest norm accepted.
                let norm_bound = &self.config.defense.norm_bound;
                let speculate = match (norm_bound.action, norm_bound.absolute_max) {
                    (NormAction::Reject | NormAction::Clip, Some(cap)) => cap,
                    _ if sum.count() == 0 => f64::INFINITY,
                    _ => 4.0 * self.largest_accepted_norm,
                };
                let outcome = match sum.fold_scanned(
                    &delta.0,
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
                        let defense = &self.config.defense;
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
                };
                drop(delta);
                self.seen.insert(device);
                let (reason, score, norm, cos) = match outcome {
                    Ok(decided) => decided,
                    Err(reason) => return Ok(self.reject(device, reason, None, None)),
                };
                self.norms.push(norm);
                if reason.is_accepted() {
                    self.largest_accepted_norm = self.largest_accepted_norm.max(norm);
                }
                let mut verdict = DeviceVerdict::new(device, reason);
                verdict.norm = Some(norm);
                verdict.cosine = cos;
                verdict.score = score;
                self.record(verdict, if reason.is_accepted() { count } else { 0 });
                Ok(if reason.is_accepted() {
                    Verdict::Accepted(reason)
                } else {
                    Verdict::Rejected(reason)
                })
            }
            Mode::Buffered(_) => {
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
    }

    /// Runs the defense (buffered mode), aggregates, and adds the result to
    /// the global model. Fails, returning the verdicts so far, when no
    /// update or fewer than `min_accepted` survive, when Multi-Krum has too
    /// few updates, or when the new model would not be finite.
    pub fn finalize(self) -> Result<RoundResult, Box<RoundFailure>> {
        let RoundAggregator {
            expect,
            mut global,
            layout,
            config,
            previous,
            trusted,
            mode,
            seen: _,
            mut verdicts,
            example_counts,
            norms,
            largest_accepted_norm: _,
            buffered_bytes: _,
            peak_buffered_bytes,
        } = self;
        let streaming = matches!(mode, Mode::Streaming(_));
        let mut stats = RoundStats {
            round_id: expect.round_id,
            aggregator: config.aggregator,
            streaming,
            submitted: verdicts.len(),
            accepted: 0,
            rejected: 0,
            clipped: 0,
            accepted_examples: 0,
            median_norm: defense::median(&norms),
            norm_bound: None,
            similarity_reference: None,
            similarity_median: None,
            similarity_mad: None,
            aggregated_norm: None,
            peak_buffered_bytes,
            accumulator_bytes: 0,
        };
        let outcome = match mode {
            Mode::Streaming(sum) => {
                stats.accumulator_bytes = sum.accumulator_bytes();
                stats.norm_bound =
                    defense::norm_bound(&config.defense.norm_bound, &[]).map(|b| b.bound);
                if previous.is_some()
                    && config.defense.similarity.reference
                        == SimilarityReference::PreviousGlobalUpdate
                {
                    stats.similarity_reference = Some(ReferenceKind::PreviousGlobalUpdate);
                }
                finish_streaming(&sum, &mut verdicts, &example_counts)
            }
            Mode::Buffered(mut held) => {
                let screen = Screen {
                    config: &config,
                    layout: &layout,
                    previous: previous.as_ref(),
                    trusted: trusted.as_ref(),
                };
                let outcome = screen.run(&mut held, &mut verdicts, &mut stats);
                drop(held);
                outcome
            }
        };
        stats.accepted = verdicts.iter().filter(|v| v.accepted).count();
        stats.rejected = verdicts.len() - stats.accepted;
        stats.clipped = verdicts
            .iter()
            .filter(|v| v.reason == VerdictReason::Clipped)
            .count();
        stats.accepted_examples = verdicts
            .iter()
            .zip(&example_counts)
            .filter(|(v, _)| v.accepted)
            .map(|(_, &n)| n)
            .sum();
        let fail = |error: AggregationError, verdicts: Vec<DeviceVerdict>, stats: RoundStats| {
            tracing::warn!(round_id = stats.round_id, %error, "aggregation round failed");
            Box::new(RoundFailure {
                error,
                verdicts,
                stats,
            })
        };
        let aggregated_update = match outcome {
            Ok(update) => update,
            Err(error) => return Err(fail(error, verdicts, stats)),
        };
        if stats.accepted < config.min_accepted {
            let error = AggregationError::TooFewAccepted {
                accepted: stats.accepted,
                required: config.min_accepted,
            };
            return Err(fail(error, verdicts, stats));
        }
        stats.aggregated_norm = scan_update(&aggregated_update, None, None)
            .ok()
            .map(|s| s.norm());
        let mut finite = true;
        for ((_, g), (_, u)) in global.iter_mut().zip(aggregated_update.iter()) {
            for (g, &u) in g.data_mut().iter_mut().zip(u.data()) {
                *g += u;
                finite &= g.is_finite();
            }
        }
        if !finite {
            return Err(fail(AggregationError::NonFiniteModel, verdicts, stats));
        }
        tracing::info!(
            round_id = stats.round_id,
            aggregator = config.aggregator.as_str(),
            streaming = stats.streaming,
            submitted = stats.submitted,
            accepted = stats.accepted,
            rejected = stats.rejected,
            clipped = stats.clipped,
            "aggregation round finalized"
        );
        Ok(RoundResult {
            new_global: global,
            aggregated_update,
            verdicts,
            stats,
        })
    }
}

fn finish_streaming(
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

/// The whole-round defense and aggregation of buffered mode.
struct Screen<'a> {
    config: &'a AggregationConfig,
    layout: &'a Layout,
    previous: Option<&'a Reference>,
    trusted: Option<&'a Reference>,
}

impl Screen<'_> {
    fn run(
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
                score = verdict.score,
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
        let updates: Vec<&TensorMap> = live.iter().map(|&i| &held[i].delta.0).collect();
        let layout = self.layout;
        match self.config.aggregator {
            AggregatorKind::FedAvg => {
                let weights: Vec<f64> =
                    live.iter().map(|&i| held[i].example_count as f64).collect();
                let total: f64 = weights.iter().sum();
                for (&i, &w) in live.iter().zip(&weights) {
                    verdicts[held[i].verdict].weight = Some(w / total);
                }
                linear_combination(&updates, &weights, total, layout)
            }
            AggregatorKind::TrimmedMean => {
                aggregate::trimmed_mean(&updates, self.config.trimmed_mean.trim_fraction, layout)
            }
            AggregatorKind::Median => aggregate::coordinate_median(&updates, layout),
            AggregatorKind::MultiKrum => {
                let krum = &self.config.multi_krum;
                let selection =
                    aggregate::krum_select(&updates, krum.byzantine, krum.select, layout)?;
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
                fltrust_combine(&updates, &norms, &trust, reference.norm, layout)
            }
        }
    }
}
