//! The poisoning-defense rules, as pure functions of per-update statistics
//! (norms and cosines). [`crate::round`] applies them in order; the settings
//! and their rationale are in [`crate::config`].

use crate::config::{NormAction, NormBoundConfig, SimilarityConfig};
use crate::verdict::VerdictReason;

/// 1 / Φ⁻¹(3/4): makes the MAD a consistent estimator of the standard
/// deviation for normally distributed data.
pub const MAD_TO_SIGMA: f64 = 1.4826;

/// The median of `values` (mean of the two middle ones for an even count);
/// `None` when empty. NaNs sort last (callers pass only finite values).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// The round's norm bound and the median it was derived from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormBound {
    /// min(`median_multiple` × median, `absolute_max`).
    pub bound: f64,
    /// The median norm, when the bound used it.
    pub median_norm: Option<f64>,
}

/// The bound for a round whose validated updates have `norms`. `None` when
/// the bound is off, or when it depends on a median of no updates.
pub fn norm_bound(config: &NormBoundConfig, norms: &[f64]) -> Option<NormBound> {
    if config.action == NormAction::Off {
        return None;
    }
    let median_norm = config.median_multiple.and_then(|_| median(norms));
    let relative = config.median_multiple.zip(median_norm).map(|(k, m)| k * m);
    let bound = match (relative, config.absolute_max) {
        (Some(r), Some(a)) => r.min(a),
        (Some(r), None) => r,
        (None, Some(a)) => a,
        (None, None) => return None,
    };
    Some(NormBound { bound, median_norm })
}

/// What the norm bound does to one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormJudgement {
    /// At or under the bound (or no bound).
    Keep,
    /// Above the bound, to be rescaled by `scale` (< 1).
    Clip {
        /// bound / norm.
        scale: f64,
    },
    /// Above the bound, rejected.
    Reject,
}

/// Judges one norm against the round's bound.
pub fn judge_norm(action: NormAction, bound: Option<NormBound>, norm: f64) -> NormJudgement {
    match bound {
        Some(b) if norm > b.bound => match action {
            NormAction::Off => NormJudgement::Keep,
            NormAction::Reject => NormJudgement::Reject,
            NormAction::Clip => NormJudgement::Clip {
                scale: b.bound / norm,
            },
        },
        _ => NormJudgement::Keep,
    }
}

/// Centre and spread of a round's cosine similarities for the MAD rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimilaritySpread {
    /// median(s).
    pub median: f64,
    /// median(|sᵢ − median(s)|).
    pub mad: f64,
    /// max(1.4826·MAD, `min_spread`): the divisor of the z-score.
    pub scale: f64,
}

impl SimilaritySpread {
    /// Robust statistics of `similarities`; `None` when empty.
    pub fn of(similarities: &[f64], min_spread: f64) -> Option<Self> {
        let centre = median(similarities)?;
        let deviations: Vec<f64> = similarities.iter().map(|s| (s - centre).abs()).collect();
        let mad = median(&deviations)?;
        Some(Self {
            median: centre,
            mad,
            scale: (MAD_TO_SIGMA * mad).max(min_spread),
        })
    }

    /// How many robust standard deviations `similarity` lies *below* the
    /// median (negative when above).
    pub fn z(&self, similarity: f64) -> f64 {
        (self.median - similarity) / self.scale
    }
}

/// The fixed-threshold check: `Err((LowSimilarity, cos))` below `min_cosine`.
pub fn judge_min_cosine(
    config: &SimilarityConfig,
    cosine: f64,
) -> Result<(), (VerdictReason, f64)> {
    match config.min_cosine {
        Some(min) if cosine < min => Err((VerdictReason::LowSimilarity, cosine)),
        _ => Ok(()),
    }
}

/// The MAD rule: `Err((SimilarityOutlier, z))` when z > `outlier_threshold`.
pub fn judge_outlier(
    config: &SimilarityConfig,
    spread: &SimilaritySpread,
    cosine: f64,
) -> Result<(), (VerdictReason, f64)> {
    let z = spread.z(cosine);
    match config.outlier_threshold {
        Some(k) if z > k => Err((VerdictReason::SimilarityOutlier, z)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DefenseConfig;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn norm_bound_takes_the_smaller() {
        let mut config = DefenseConfig::reject_outliers().norm_bound;
        let norms = [1.0, 2.0, 3.0];
        assert_eq!(norm_bound(&config, &norms).unwrap().bound, 6.0);
        config.absolute_max = Some(4.0);
        let bound = norm_bound(&config, &norms);
        assert_eq!(bound.unwrap().bound, 4.0);
        assert_eq!(
            judge_norm(NormAction::Reject, bound, 5.0),
            NormJudgement::Reject
        );
        assert_eq!(
            judge_norm(NormAction::Clip, bound, 5.0),
            NormJudgement::Clip { scale: 0.8 }
        );
        assert_eq!(
            judge_norm(NormAction::Clip, bound, 4.0),
            NormJudgement::Keep
        );
        config.action = NormAction::Off;
        assert_eq!(norm_bound(&config, &norms), None);
    }

    #[test]
    fn mad_rule_has_a_floor() {
        let config = DefenseConfig::reject_outliers().similarity;
        // Identical similarities: MAD is 0, the floor keeps z finite.
        let spread = SimilaritySpread::of(&[0.9; 5], config.min_spread).unwrap();
        assert_eq!(spread.mad, 0.0);
        assert_eq!(spread.scale, 0.05);
        assert!(judge_outlier(&config, &spread, 0.89).is_ok());
        assert!(judge_outlier(&config, &spread, 0.7).is_err());
        // Above the median is never an outlier.
        assert!(judge_outlier(&config, &spread, 1.0).is_ok());
        let spread = SimilaritySpread::of(&[0.5, 0.6, 0.7, 0.8, 0.9], 0.01).unwrap();
        assert!((spread.scale - MAD_TO_SIGMA * 0.1).abs() < 1e-12);
        assert_eq!(
            judge_min_cosine(&config, -0.2),
            Err((VerdictReason::LowSimilarity, -0.2))
        );
    }
}
