//! Aggregation and poisoning-defense settings: the `aggregation` section of
//! `config/global_config.yaml`.
//!
//! Near 700 lines: most of it is this documentation of the default and its
//! evidence, beside the types it explains; splitting the types across files
//! would separate each setting from the paragraph that justifies it.
//!
//! Every struct rejects unknown keys and every field has a default, so a file
//! sets only what it changes. [`AggregationConfig::validate`] checks ranges;
//! [`crate::round::RoundAggregator::new`] calls it.
//!
//! ```yaml
//! aggregation:
//!   aggregator: centered_clipping  # centered_clipping | fed_avg | trimmed_mean | median | multi_krum | fltrust
//!   trimmed_mean:
//!     trim_fraction: 0.1           # β: drop ⌊β·n⌋ lowest and highest per coordinate
//!   multi_krum:
//!     byzantine: 1                 # f
//!     select: null                 # m; null means n − f
//!   centered_clipping:
//!     radius_multiple: 1.0         # τ = 1.0 × median distance from the round's median
//!     iterations: 3                # L
//!   nearest_neighbor_mixing: null  # or {byzantine_fraction: 0.2}: mix each update with its nearest first
//!   max_example_count: 100000
//!   min_accepted: 1
//!   max_buffered_bytes: 4294967296
//!   defense: recommended           # a preset (recommended | reject_outliers | original_design | off) or:
//!   # defense:
//!   #   norm_bound:
//!   #     action: reject           # off | reject | clip
//!   #     median_multiple: 10.0    # bound = 10 × median norm of the round's updates
//!   #     absolute_max: null       # and/or a fixed bound; the smaller applies
//!   #   similarity:
//!   #     reference: off           # off | previous_global_update | round_median
//!   #     min_cosine: 0.0
//!   #     outlier_threshold: 3.5   # k of the MAD rule; null turns the rule off
//!   #     min_spread: 0.05
//! ```
//!
//! # The default, and why
//!
//! The default is **centered clipping** (`aggregator: centered_clipping`,
//! [`crate::aggregate::centered_clipping`]) behind a norm bound that rejects
//! only the blatant: updates above **10×** the round's median norm
//! (`defense: recommended`). It was chosen by the attack table
//! (`qflare bench attacks`, docs/benchmarks.md §15: MNIST 2NN, 100 devices,
//! 20% malicious, ten attacks, IID and Dirichlet(0.5)), against FedAvg, the
//! previous default (the reject rules below, now `reject_outliers`),
//! trimmed mean, median, Multi-Krum and FLTrust:
//!
//! * **Clipping, not rejecting.** Rejection by cosine against the round
//!   median and the MAD rule throw away honest devices whose data differ
//!   from the majority's (8% of honest updates on the FedAvg paper's
//!   pathological split), and they are what ALIE, min-max and min-sum are
//!   built to pass. Centered clipping keeps every update but bounds what
//!   any one can do: one update moves the result by at most τ/n per step,
//!   whether it is an attacker or an honest outlier. Fang's trim attack,
//!   which beat the reject rules by 5 points on IID data, costs it about 1.
//! * **Still reject the blatant.** An update 10× the median norm is not
//!   heterogeneity: honest norms differ by the number of local steps, a
//!   factor of a few. Rejecting those (IPM with large ε, ×10 scaling, large
//!   noise) takes their constant pull off the clipped mean, which is where
//!   centered clipping alone lost most (docs/benchmarks.md §15).
//!
//! It rejected no honest update in the table and kept every attack within
//! 2 points of its clean run but two: min-max and min-sum on the Dirichlet
//! split (−2.2 and −2.6), where every robust column loses more and
//! undefended FedAvg less; nearest-neighbour mixing, a wider radius and
//! more steps did not close them (docs/benchmarks.md §15).
//!
//! The previous default, `reject_outliers`, remains: norm above 3× the
//! median, cosine with the round median below 0, and the MAD rule at
//! k = 3.5 (Iglewicz and Hoaglin, 1993), all rejections, before FedAvg. It
//! catches sign flips, scaling and noise outright on IID data;
//! `original_design` is the seed's rule. Every robust rule
//! assumes an honest majority.
//!
//! # The reject rules, step by step
//!
//! For `reject_outliers`, `original_design` or an explicit map, each
//! validated update Δᵢ (a delta: trained weights minus the global model)
//! goes through:
//!
//! 1. **Norm bound.** bound = min(`median_multiple` × median‖Δ‖, `absolute_max`)
//!    over the round's validated updates. Above it, `reject` drops the update
//!    (`norm_exceeded`) and `clip` rescales it to the bound (`clipped`).
//! 2. **Direction.** sᵢ = cos(Δᵢ, r) for a reference direction r: the previous
//!    round's global update, or the coordinate-wise median of this round's
//!    surviving updates. sᵢ < `min_cosine` is `low_similarity`.
//! 3. **Robust outlier rule** over the survivors' similarities:
//!    zᵢ = (median(s) − sᵢ) / max(1.4826·MAD(s), `min_spread`), and zᵢ > k
//!    (`outlier_threshold`) is `similarity_outlier`. 1.4826·MAD estimates a
//!    standard deviation for normal data. One-sided: agreeing more than the
//!    crowd is not suspicious. `min_spread` guards MAD ≈ 0 (near-identical
//!    honest updates).

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::privacy::PrivacyConfig;

/// The `aggregation` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    /// How accepted updates are combined.
    pub aggregator: AggregatorKind,
    /// Settings of the trimmed-mean aggregator.
    pub trimmed_mean: TrimmedMeanConfig,
    /// Settings of the Multi-Krum aggregator.
    pub multi_krum: MultiKrumConfig,
    /// Settings of the centered-clipping aggregator.
    pub centered_clipping: CenteredClippingConfig,
    /// Nearest-neighbour mixing before a robust aggregator
    /// ([`crate::aggregate::nearest_neighbor_mixing`]); `None`: off.
    pub nearest_neighbor_mixing: Option<MixingConfig>,
    /// The poisoning defense run before the aggregator.
    pub defense: DefenseConfig,
    /// Central differential privacy ([`crate::privacy`]); needs FedAvg and
    /// no defense (its clip is the bound).
    pub privacy: Option<PrivacyConfig>,
    /// Largest example count an update may claim. FedAvg weighs updates by
    /// their claimed count, which the enclave cannot verify, so this cap
    /// bounds how far one device can outweigh the others: set it near the
    /// largest honest local data set.
    pub max_example_count: u64,
    /// Fewest accepted updates for a round to produce a model.
    pub min_accepted: usize,
    /// Most bytes of update data a round may buffer when the defense or the
    /// aggregator needs the whole round. Checked on every submit.
    pub max_buffered_bytes: u64,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        Self {
            aggregator: AggregatorKind::CenteredClipping,
            trimmed_mean: TrimmedMeanConfig::default(),
            multi_krum: MultiKrumConfig::default(),
            centered_clipping: CenteredClippingConfig::default(),
            nearest_neighbor_mixing: None,
            defense: DefenseConfig::default(),
            privacy: None,
            max_example_count: 100_000,
            min_accepted: 1,
            // 4 GiB: about 600 MNIST-CNN updates (6.65 MB each) or 5,000
            // MNIST-2NN updates, well inside a 24 GiB host.
            max_buffered_bytes: 4 << 30,
        }
    }
}

/// The aggregators. See [`crate::aggregate`] for the exact rules and papers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregatorKind {
    /// Mean weighted by example count (McMahan et al., 2017).
    FedAvg,
    /// Coordinate-wise trimmed mean (Yin et al., 2018).
    TrimmedMean,
    /// Coordinate-wise median (Yin et al., 2018).
    Median,
    /// Multi-Krum (Blanchard et al., 2017).
    MultiKrum,
    /// FLTrust (Cao et al., 2021); needs a trusted reference update.
    Fltrust,
    /// Centered clipping (Karimireddy et al., 2021) from the round's median:
    /// the default.
    #[default]
    CenteredClipping,
}

impl AggregatorKind {
    /// The snake_case name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FedAvg => "fed_avg",
            Self::TrimmedMean => "trimmed_mean",
            Self::Median => "median",
            Self::MultiKrum => "multi_krum",
            Self::Fltrust => "fltrust",
            Self::CenteredClipping => "centered_clipping",
        }
    }
}

/// Settings of the trimmed-mean aggregator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrimmedMeanConfig {
    /// β in [0, 0.5): per coordinate, the ⌊β·n⌋ lowest and ⌊β·n⌋ highest
    /// values are dropped. Tolerates up to ⌊β·n⌋ Byzantine updates.
    pub trim_fraction: f64,
}

impl Default for TrimmedMeanConfig {
    fn default() -> Self {
        Self { trim_fraction: 0.1 }
    }
}

/// Settings of the Multi-Krum aggregator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultiKrumConfig {
    /// f: the number of Byzantine updates assumed. A round needs n ≥ 2f + 3.
    pub byzantine: usize,
    /// m: how many updates to average; `None` means n − f. Capped at n − f.
    pub select: Option<usize>,
}

impl Default for MultiKrumConfig {
    fn default() -> Self {
        Self {
            byzantine: 1,
            select: None,
        }
    }
}

/// Settings of the centered-clipping aggregator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CenteredClippingConfig {
    /// τ as a multiple of the median distance of the round's updates from
    /// their coordinate-wise median (> 0).
    pub radius_multiple: f64,
    /// L: clipping steps from the median (1 to 100).
    pub iterations: usize,
}

impl Default for CenteredClippingConfig {
    fn default() -> Self {
        Self {
            radius_multiple: 1.0,
            iterations: 3,
        }
    }
}

/// Settings of nearest-neighbour mixing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixingConfig {
    /// The share of a round's updates assumed Byzantine, in [0, 0.5): each
    /// update is mixed with its n − ⌊share·n⌋ − 1 nearest others. The mixed
    /// updates sit beside the buffered ones, so a round needs up to twice
    /// `max_buffered_bytes` while it aggregates.
    pub byzantine_fraction: f64,
}

impl Default for MixingConfig {
    fn default() -> Self {
        Self {
            byzantine_fraction: 0.2,
        }
    }
}

/// What the norm bound does to an update above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormAction {
    /// No norm bound.
    Off,
    /// Reject the update (`norm_exceeded`).
    Reject,
    /// Rescale it to the bound (`clipped`, still accepted).
    Clip,
}

/// The L2 norm bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NormBoundConfig {
    /// What happens above the bound.
    pub action: NormAction,
    /// Bound as a multiple of the median norm of the round's validated
    /// updates. Needs the whole round, so updates are buffered.
    pub median_multiple: Option<f64>,
    /// A fixed bound. When both are set, the smaller applies. On its own it
    /// can be decided as each update arrives.
    pub absolute_max: Option<f64>,
}

impl Default for NormBoundConfig {
    fn default() -> Self {
        DefenseConfig::recommended().norm_bound
    }
}

/// The reference direction updates are compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimilarityReference {
    /// No similarity check.
    Off,
    /// The previous round's global update (new global minus old). Falls back
    /// to the round median when the round has none (round 1) or it is zero.
    PreviousGlobalUpdate,
    /// The coordinate-wise median of this round's updates that passed the
    /// norm bound.
    RoundMedian,
}

/// The cosine-similarity check and its robust outlier rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimilarityConfig {
    /// The reference direction.
    pub reference: SimilarityReference,
    /// Reject when cos(Δᵢ, reference) is below this, in [-1, 1].
    pub min_cosine: Option<f64>,
    /// k of the MAD rule: reject when (median − sᵢ) / max(1.4826·MAD,
    /// `min_spread`) > k. Needs the whole round.
    pub outlier_threshold: Option<f64>,
    /// Floor of the MAD rule's spread estimate, in cosine units (> 0).
    pub min_spread: f64,
}

impl Default for SimilarityConfig {
    fn default() -> Self {
        DefenseConfig::recommended().similarity
    }
}

/// Named defense settings, selectable by name in the configuration file
/// (`defense: original_design`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefensePreset {
    /// The default; see the [module documentation](self).
    Recommended,
    /// The reject rules that were the default before centered clipping.
    RejectOutliers,
    /// The original QFLARE design's rule: "compare against the current global
    /// model and reject drastic statistical outliers". See
    /// [`DefenseConfig::original_design`] for how it maps onto the settings.
    OriginalDesign,
    /// No defense beyond validation.
    Off,
}

/// The poisoning defense. In a file it is either a [`DefensePreset`] name or
/// a map of these fields (missing ones take the recommended values).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DefenseConfig {
    /// The L2 norm bound.
    pub norm_bound: NormBoundConfig,
    /// The direction check.
    pub similarity: SimilarityConfig,
}

impl Default for DefenseConfig {
    fn default() -> Self {
        Self::recommended()
    }
}

impl DefenseConfig {
    /// The settings of a preset.
    pub fn preset(preset: DefensePreset) -> Self {
        match preset {
            DefensePreset::Recommended => Self::recommended(),
            DefensePreset::RejectOutliers => Self::reject_outliers(),
            DefensePreset::OriginalDesign => Self::original_design(),
            DefensePreset::Off => Self::off(),
        }
    }

    /// The default defense, run before the default aggregator (centered
    /// clipping): reject updates above 10× the round's median norm, nothing
    /// else. Why: see the [module documentation](self).
    pub fn recommended() -> Self {
        Self {
            norm_bound: NormBoundConfig {
                action: NormAction::Reject,
                median_multiple: Some(10.0),
                absolute_max: None,
            },
            similarity: SimilarityConfig {
                reference: SimilarityReference::Off,
                min_cosine: None,
                outlier_threshold: None,
                min_spread: 0.05,
            },
        }
    }

    /// The previous default: reject norms above 3× the round median,
    /// directions opposed to the round's coordinate-wise median, and
    /// similarity outliers at k = 3.5.
    pub fn reject_outliers() -> Self {
        Self {
            norm_bound: NormBoundConfig {
                action: NormAction::Reject,
                median_multiple: Some(3.0),
                absolute_max: None,
            },
            similarity: SimilarityConfig {
                reference: SimilarityReference::RoundMedian,
                min_cosine: Some(0.0),
                outlier_threshold: Some(3.5),
                min_spread: 0.05,
            },
        }
    }

    /// The original design's rule, "compare against the current global model
    /// and reject drastic statistical outliers", made precise for deltas:
    ///
    /// * A device's distance from the current global model is
    ///   ‖wᵢ − w_global‖ = ‖Δᵢ‖, so "drastic outlier" in distance is the norm
    ///   bound: reject above 3× the round's median norm.
    /// * The global model itself has no direction (the cosine of raw weights
    ///   with the global model is ≈ 1 for every update); the direction it is
    ///   moving in is the previous global update. So the comparison is
    ///   cos(Δᵢ, previous global update), with the round median as the
    ///   fallback in round 1.
    /// * "Statistical outliers" is the MAD rule at k = 3.5; the original names
    ///   no fixed similarity threshold, so there is none.
    pub fn original_design() -> Self {
        Self {
            norm_bound: NormBoundConfig {
                action: NormAction::Reject,
                median_multiple: Some(3.0),
                absolute_max: None,
            },
            similarity: SimilarityConfig {
                reference: SimilarityReference::PreviousGlobalUpdate,
                min_cosine: None,
                outlier_threshold: Some(3.5),
                min_spread: 0.05,
            },
        }
    }

    /// No defense: every validated update is aggregated.
    pub fn off() -> Self {
        Self {
            norm_bound: NormBoundConfig {
                action: NormAction::Off,
                median_multiple: None,
                absolute_max: None,
            },
            similarity: SimilarityConfig {
                reference: SimilarityReference::Off,
                min_cosine: None,
                outlier_threshold: None,
                min_spread: 0.05,
            },
        }
    }

    /// True when every check can be decided as each update arrives, without
    /// seeing the rest of the round: an absolute norm bound only, and a fixed
    /// cosine threshold against a previous global update that exists.
    pub fn decides_on_arrival(&self, has_previous_update: bool) -> bool {
        let norm = match self.norm_bound.action {
            NormAction::Off => true,
            NormAction::Reject | NormAction::Clip => self.norm_bound.median_multiple.is_none(),
        };
        let similarity = match self.similarity.reference {
            SimilarityReference::Off => true,
            SimilarityReference::PreviousGlobalUpdate => {
                has_previous_update && self.similarity.outlier_threshold.is_none()
            }
            SimilarityReference::RoundMedian => false,
        };
        norm && similarity
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let norm = &self.norm_bound;
        positive("defense.norm_bound.median_multiple", norm.median_multiple)?;
        positive("defense.norm_bound.absolute_max", norm.absolute_max)?;
        if norm.action != NormAction::Off
            && norm.median_multiple.is_none()
            && norm.absolute_max.is_none()
        {
            return Err(invalid(
                "defense.norm_bound",
                "an action other than off needs median_multiple or absolute_max",
            ));
        }
        let sim = &self.similarity;
        if let Some(min) = sim.min_cosine
            && !(-1.0..=1.0).contains(&min)
        {
            return Err(invalid(
                "defense.similarity.min_cosine",
                "must be in [-1, 1]",
            ));
        }
        positive(
            "defense.similarity.outlier_threshold",
            sim.outlier_threshold,
        )?;
        positive("defense.similarity.min_spread", Some(sim.min_spread))?;
        Ok(())
    }
}

impl AggregationConfig {
    /// Checks every range. Called by [`crate::round::RoundAggregator::new`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let beta = self.trimmed_mean.trim_fraction;
        if !(0.0..0.5).contains(&beta) {
            return Err(invalid("trimmed_mean.trim_fraction", "must be in [0, 0.5)"));
        }
        positive(
            "centered_clipping.radius_multiple",
            Some(self.centered_clipping.radius_multiple),
        )?;
        if !(1..=100).contains(&self.centered_clipping.iterations) {
            return Err(invalid(
                "centered_clipping.iterations",
                "must be in 1..=100",
            ));
        }
        if let Some(mixing) = &self.nearest_neighbor_mixing {
            if !(0.0..0.5).contains(&mixing.byzantine_fraction) {
                return Err(invalid(
                    "nearest_neighbor_mixing.byzantine_fraction",
                    "must be in [0, 0.5)",
                ));
            }
            // Before a mean, mixing only reweights the updates (by how many
            // neighbourhoods each falls in), which defends nothing; FLTrust
            // scores the devices' own directions.
            if matches!(
                self.aggregator,
                AggregatorKind::FedAvg | AggregatorKind::Fltrust
            ) {
                return Err(invalid(
                    "nearest_neighbor_mixing",
                    "needs a robust aggregator (centered_clipping, trimmed_mean, median, multi_krum)",
                ));
            }
        }
        if self.multi_krum.select == Some(0) {
            return Err(invalid("multi_krum.select", "must be at least 1"));
        }
        if self.max_example_count == 0 {
            return Err(invalid("max_example_count", "must be at least 1"));
        }
        if self.min_accepted == 0 {
            return Err(invalid("min_accepted", "must be at least 1"));
        }
        if self.max_buffered_bytes == 0 {
            return Err(invalid("max_buffered_bytes", "must be at least 1"));
        }
        self.defense.validate()?;
        if let Some(privacy) = &self.privacy {
            privacy.validate()?;
            // The sum's sensitivity is the clip norm only if each update's
            // contribution depends on nothing but the update itself:
            // weight 1 and no rule relative to the rest of the round.
            if self.aggregator != AggregatorKind::FedAvg {
                return Err(invalid("privacy", "needs aggregator: fed_avg"));
            }
            if self.defense != DefenseConfig::off() {
                return Err(invalid(
                    "privacy",
                    "needs defense: off (privacy.clip_norm bounds every update)",
                ));
            }
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.to_owned(),
    }
}

fn positive(field: &'static str, value: Option<f64>) -> Result<(), ConfigError> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => Err(invalid(field, "must be finite and above 0")),
        _ => Ok(()),
    }
}

/// The explicit form of [`DefenseConfig`] in a file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DefenseFields {
    #[serde(default)]
    norm_bound: NormBoundConfig,
    #[serde(default)]
    similarity: SimilarityConfig,
}

impl<'de> Deserialize<'de> for DefenseConfig {
    // A preset name or a map. Written as a visitor rather than an untagged
    // enum so that a typo in the map still reports the unknown key.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DefenseVisitor;

        impl<'de> Visitor<'de> for DefenseVisitor {
            type Value = DefenseConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a defense preset (recommended, reject_outliers, original_design, off) or a map with norm_bound and similarity")
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<DefenseConfig, E> {
                DefensePreset::deserialize(de::value::StrDeserializer::<E>::new(name))
                    .map(DefenseConfig::preset)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DefenseConfig, A::Error> {
                let fields =
                    DefenseFields::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(DefenseConfig {
                    norm_bound: fields.norm_bound,
                    similarity: fields.similarity,
                })
            }
        }

        deserializer.deserialize_any(DefenseVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_presets_differ() {
        AggregationConfig::default().validate().unwrap();
        for preset in [
            DefensePreset::Recommended,
            DefensePreset::RejectOutliers,
            DefensePreset::OriginalDesign,
            DefensePreset::Off,
        ] {
            DefenseConfig::preset(preset).validate().unwrap();
        }
        assert_ne!(
            DefenseConfig::recommended(),
            DefenseConfig::original_design()
        );
        assert!(!DefenseConfig::recommended().decides_on_arrival(true));
        assert!(!DefenseConfig::reject_outliers().decides_on_arrival(true));
        assert_eq!(
            AggregationConfig::default().aggregator,
            AggregatorKind::CenteredClipping
        );
        assert!(DefenseConfig::off().decides_on_arrival(false));
    }

    #[test]
    fn ranges_are_checked() {
        let mut config = AggregationConfig::default();
        config.trimmed_mean.trim_fraction = 0.5;
        assert!(config.validate().is_err());
        let mut config = AggregationConfig::default();
        config.defense.norm_bound.median_multiple = None;
        assert!(config.validate().is_err(), "reject with no bound");
        let mut config = AggregationConfig::default();
        config.defense.similarity.min_spread = 0.0;
        assert!(config.validate().is_err());
        let mut config = AggregationConfig::default();
        config.defense.similarity.min_cosine = Some(1.5);
        assert!(config.validate().is_err());
        let mut config = AggregationConfig::default();
        config.defense.norm_bound.absolute_max = Some(f64::NAN);
        assert!(config.validate().is_err());
        let mut config = AggregationConfig {
            nearest_neighbor_mixing: Some(MixingConfig::default()),
            ..AggregationConfig::default()
        };
        config.validate().unwrap();
        config.aggregator = AggregatorKind::FedAvg;
        assert!(config.validate().is_err(), "mixing before a mean");
        config.aggregator = AggregatorKind::Median;
        config.nearest_neighbor_mixing = Some(MixingConfig {
            byzantine_fraction: 0.5,
        });
        assert!(config.validate().is_err());
    }
}
