//! The attack table's columns: each a name and the `aggregation` section it
//! runs, built in ([`Column`]) or read from a file ([`custom_column`]).

use std::path::Path;

use anyhow::Context;
use qflare_enclave::config::{
    AggregationConfig, AggregatorKind, DefenseConfig, DefensePreset, MixingConfig, MultiKrumConfig,
    NormAction, TrimmedMeanConfig,
};

/// A column: a defense and an aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Column {
    /// FedAvg, no defense.
    Fedavg,
    /// The built-in default (`AggregationConfig::default()`).
    Default,
    /// The reject rules (norm 3× median, cosine ≥ 0 and MAD vs the round
    /// median) before FedAvg: the default until the table chose another.
    Reject,
    /// The seed design's rule (`original_design`) before FedAvg.
    OriginalDesign,
    /// Coordinate-wise trimmed mean, β = the malicious share.
    TrimmedMean,
    /// Coordinate-wise median.
    Median,
    /// Multi-Krum with f = the expected attackers per round.
    MultiKrum,
    /// FLTrust with a root data set of --root-examples.
    Fltrust,
    /// Centered clipping, no defense before it.
    CenteredClipping,
    /// Updates over 10× the round's median norm rejected, then centered
    /// clipping.
    NormRejectCenteredClipping,
    /// Norm clipping at 3× the median, then FedAvg.
    Clip,
    /// The default with nearest-neighbour mixing (f = the malicious share)
    /// before centered clipping.
    NnmCenteredClipping,
}

impl Column {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Fedavg => "FedAvg, no defense",
            Self::Default => "default",
            Self::Reject => "reject rules + FedAvg",
            Self::OriginalDesign => "original_design + FedAvg",
            Self::TrimmedMean => "trimmed mean",
            Self::Median => "median",
            Self::MultiKrum => "Multi-Krum",
            Self::Fltrust => "FLTrust",
            Self::CenteredClipping => "centered clipping",
            Self::NormRejectCenteredClipping => "norm ≤ 10× median + centered clipping",
            Self::Clip => "norm clip + FedAvg",
            Self::NnmCenteredClipping => "default with nearest-neighbour mixing",
        }
    }

    pub(super) fn config(self, malicious: f64, per_round: usize) -> AggregationConfig {
        let base = AggregationConfig::default();
        let with = |aggregator, defense| AggregationConfig {
            aggregator,
            defense,
            ..AggregationConfig::default()
        };
        match self {
            Self::Default => base,
            Self::Fedavg => with(AggregatorKind::FedAvg, DefenseConfig::off()),
            Self::Reject => with(AggregatorKind::FedAvg, DefenseConfig::reject_outliers()),
            Self::OriginalDesign => with(
                AggregatorKind::FedAvg,
                DefenseConfig::preset(DefensePreset::OriginalDesign),
            ),
            Self::TrimmedMean => AggregationConfig {
                trimmed_mean: TrimmedMeanConfig {
                    trim_fraction: malicious.min(0.49),
                },
                ..with(AggregatorKind::TrimmedMean, DefenseConfig::off())
            },
            Self::Median => with(AggregatorKind::Median, DefenseConfig::off()),
            Self::MultiKrum => AggregationConfig {
                multi_krum: MultiKrumConfig {
                    byzantine: ((malicious * per_round as f64).round() as usize)
                        .min(per_round.saturating_sub(3) / 2),
                    select: None,
                },
                ..with(AggregatorKind::MultiKrum, DefenseConfig::off())
            },
            Self::Fltrust => with(AggregatorKind::Fltrust, DefenseConfig::off()),
            Self::CenteredClipping => with(AggregatorKind::CenteredClipping, DefenseConfig::off()),
            Self::NormRejectCenteredClipping => {
                let mut defense = DefenseConfig::off();
                defense.norm_bound.action = NormAction::Reject;
                defense.norm_bound.median_multiple = Some(10.0);
                with(AggregatorKind::CenteredClipping, defense)
            }
            Self::Clip => {
                let mut defense = DefenseConfig::off();
                defense.norm_bound.action = NormAction::Clip;
                defense.norm_bound.median_multiple = Some(3.0);
                with(AggregatorKind::FedAvg, defense)
            }
            Self::NnmCenteredClipping => AggregationConfig {
                nearest_neighbor_mixing: Some(MixingConfig {
                    byzantine_fraction: malicious,
                }),
                ..base
            },
        }
    }
}

/// A column from a YAML file holding an `aggregation` section's settings,
/// checked as the enclave checks them.
pub(super) fn custom_column(path: &Path) -> anyhow::Result<(String, AggregationConfig)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: AggregationConfig = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not an aggregation section", path.display()))?;
    config
        .validate()
        .with_context(|| format!("{} is not a valid aggregation section", path.display()))?;
    let name = path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    Ok((name, config))
}
