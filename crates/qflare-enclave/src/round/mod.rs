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
//!
//! # Files
//!
//! * `mod.rs` (this file): [`RoundAggregator`]: opening a round, the checks
//!   every submission gets whatever the mode, and [`finalize`]'s counting,
//!   minimum and model update.
//! * `spec.rs`: [`RoundSpec`], the round's inputs, and the reference
//!   directions checked out of it.
//! * `streaming.rs`: the streaming mode: judge and fold on arrival, then
//!   the mean of the running sum.
//! * `buffered.rs`: the buffered mode: hold validated updates, then run the
//!   whole-round defense and the chosen aggregator over them.
//! * `report.rs`: what a round reports: [`RoundResult`], [`RoundFailure`],
//!   [`RoundStats`], [`ReferenceKind`].
//!
//! [`finalize`]: RoundAggregator::finalize

use std::collections::BTreeSet;
use std::fmt;

use qflare_protocol::identity::DeviceId;
use qflare_protocol::tensor::TensorMap;

use crate::aggregate::{Layout, RunningSum};
use crate::config::{
    AggregationConfig, AggregatorKind, NormAction, NormBoundConfig, SimilarityReference,
};
use crate::defense;
use crate::error::{AggregationError, ConfigError, Result};
use crate::privacy::add_noise;
use crate::validate::{CandidateUpdate, RoundExpectations, check_layout, scan_update};
use crate::verdict::{DeviceVerdict, Verdict, VerdictReason};

mod buffered;
mod report;
mod spec;
mod streaming;

pub use report::{ReferenceKind, RoundFailure, RoundResult, RoundStats};
pub use spec::RoundSpec;

use buffered::Held;
use spec::{Reference, check_reference};

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
    /// q·N under central DP.
    expected_participants: Option<f64>,
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
            mut config,
            expected_participants,
        } = spec;
        config.validate()?;
        let privacy = match &config.privacy {
            Some(privacy) => {
                let Some(m) = expected_participants.filter(|m| m.is_finite() && *m > 0.0) else {
                    return Err(ConfigError::Invalid {
                        field: "privacy",
                        reason: "a private round needs its expected participants (> 0)".into(),
                    }
                    .into());
                };
                // The clip is the only bound, absolute so every update is
                // judged on its own (and the round streams).
                config.defense.norm_bound = NormBoundConfig {
                    action: NormAction::Clip,
                    median_multiple: None,
                    absolute_max: Some(privacy.clip_norm),
                };
                Some(m)
            }
            None => None,
        };
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
            expected_participants: privacy,
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
        // The enclave's stderr is the host's log: codes only, never a
        // device's norm, cosine or score.
        tracing::debug!(
            round_id = self.expect.round_id,
            device = %verdict.device_id,
            code = verdict.reason.code(),
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
        // Under DP every update weighs 1: a claimed count would scale a
        // device's contribution past the clip norm.
        let weight = if self.expected_participants.is_some() {
            1
        } else {
            count
        };
        let delta = update.take_delta();
        let uses_previous = self.uses_previous();
        match &mut self.mode {
            Mode::Streaming(sum) => {
                let previous = self.previous.as_ref().filter(|_| uses_previous);
                let outcome = streaming::fold_and_judge(
                    sum,
                    previous,
                    &self.config.defense,
                    self.largest_accepted_norm,
                    &delta.0,
                    weight,
                );
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
            Mode::Buffered(_) => self.submit_buffered(device, count, delta, uses_previous),
        }
    }

    /// Runs the defense (buffered mode), aggregates, and adds the result to
    /// the global model. Fails, returning the verdicts so far, when no
    /// update or fewer than `min_accepted` survive, when Multi-Krum has too
    /// few updates, or when the new model would not be finite. A round under
    /// central DP fails here (`PrivacyNeedsRandomness`): use
    /// [`finalize_with_noise`](Self::finalize_with_noise).
    pub fn finalize(self) -> Result<RoundResult, Box<RoundFailure>> {
        self.finish(None)
    }

    /// [`finalize`](Self::finalize), drawing central DP's noise (if
    /// configured) from `rng`, which must be the enclave's own CSPRNG.
    pub fn finalize_with_noise(
        self,
        rng: &mut dyn rand::CryptoRng,
    ) -> Result<RoundResult, Box<RoundFailure>> {
        self.finish(Some(rng))
    }

    fn finish(
        self,
        rng: Option<&mut dyn rand::CryptoRng>,
    ) -> Result<RoundResult, Box<RoundFailure>> {
        let RoundAggregator {
            expect,
            mut global,
            layout,
            config,
            previous,
            trusted,
            mode,
            expected_participants,
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
            privacy: None,
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
                match (&config.privacy, expected_participants) {
                    (Some(privacy), Some(m)) => {
                        let ones = vec![1; example_counts.len()];
                        let accepted = verdicts.iter().filter(|v| v.accepted).count();
                        streaming::finish_streaming(&sum, &mut verdicts, &ones).and_then(
                            |mut mean| {
                                let rng = rng.ok_or(AggregationError::PrivacyNeedsRandomness)?;
                                stats.privacy =
                                    Some(add_noise(&mut mean, accepted, privacy, m, rng));
                                Ok(mean)
                            },
                        )
                    }
                    _ => streaming::finish_streaming(&sum, &mut verdicts, &example_counts),
                }
            }
            Mode::Buffered(mut held) => {
                let screen = buffered::Screen {
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
