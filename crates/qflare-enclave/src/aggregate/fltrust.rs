//! FLTrust (Cao et al., 2021): weight each update by its agreement with a
//! trusted reference update g₀, after rescaling it to g₀'s norm.
//!
//! [`fltrust`] is the whole aggregator; the round, which has already scanned
//! the updates, calls its two halves [`trust_scores`] and [`fltrust_combine`]
//! directly. The weighted sum is `fedavg.rs`'s [`linear_combination`].

use qflare_protocol::tensor::TensorMap;

use super::{Layout, cosine, linear_combination};
use crate::error::{AggregationError, Result};

/// FLTrust's result.
#[derive(Debug)]
pub struct FltrustOutcome {
    /// Σ tᵢ·(‖g₀‖/‖Δᵢ‖)·Δᵢ / Σ tᵢ.
    pub aggregate: TensorMap,
    /// cos(Δᵢ, g₀) per update (0 for a zero update).
    pub cosines: Vec<f64>,
    /// tᵢ = ReLU(cosᵢ).
    pub trust: Vec<f64>,
}

/// FLTrust (Cao et al., 2021) against the trusted reference update g₀: trust
/// tᵢ = ReLU(cos(Δᵢ, g₀)); each update is rescaled to ‖g₀‖ and the trust-
/// weighted sum is divided by Σ tᵢ. Example counts are not used. Errors with
/// `NoAcceptedUpdates` when every trust score is zero.
pub fn fltrust(
    updates: &[&TensorMap],
    reference: &TensorMap,
    layout: &Layout,
) -> Result<FltrustOutcome> {
    if !layout.matches(reference) {
        return Err(AggregationError::LayoutMismatch);
    }
    let reference_norm = crate::validate::scan_update(reference, None, None)
        .map_err(|_| crate::error::ConfigError::ReferenceNonFinite {
            what: "trusted reference update",
        })?
        .norm();
    let mut norms = Vec::with_capacity(updates.len());
    let mut dots = Vec::with_capacity(updates.len());
    for update in updates {
        if !layout.matches(update) {
            return Err(AggregationError::LayoutMismatch);
        }
        let scan = crate::validate::scan_update(update, Some(reference), None)
            .map_err(|_| AggregationError::NonFiniteUpdate)?;
        norms.push(scan.norm());
        dots.push(scan.dot_a);
    }
    let cosines: Vec<f64> = norms
        .iter()
        .zip(&dots)
        .map(|(&norm, &dot)| cosine(dot, norm, reference_norm))
        .collect();
    let trust = trust_scores(&cosines);
    let aggregate = fltrust_combine(updates, &norms, &trust, reference_norm, layout)?;
    Ok(FltrustOutcome {
        aggregate,
        cosines,
        trust,
    })
}

pub(crate) fn trust_scores(cosines: &[f64]) -> Vec<f64> {
    cosines.iter().map(|&c| c.max(0.0)).collect()
}

/// Σ tᵢ·(‖g₀‖/‖Δᵢ‖)·Δᵢ / Σ tᵢ over the updates with tᵢ > 0.
pub(crate) fn fltrust_combine(
    updates: &[&TensorMap],
    norms: &[f64],
    trust: &[f64],
    reference_norm: f64,
    layout: &Layout,
) -> Result<TensorMap> {
    let mut chosen = Vec::new();
    let mut coefficients = Vec::new();
    let mut total_trust = 0.0;
    for ((&update, &norm), &t) in updates.iter().zip(norms).zip(trust) {
        if t > 0.0 && norm > 0.0 {
            chosen.push(update);
            coefficients.push(t * reference_norm / norm);
            total_trust += t;
        }
    }
    if chosen.is_empty() {
        return Err(AggregationError::NoAcceptedUpdates {
            submitted: updates.len(),
        });
    }
    linear_combination(&chosen, &coefficients, total_trust, layout)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::map;
    use super::*;

    #[test]
    fn fltrust_ignores_opposed_updates() {
        let g0 = map(&[1.0, 0.0, 0.0]);
        let u = [map(&[2.0, 0.0, 0.0]), map(&[-3.0, 0.0, 0.0])];
        let refs: Vec<&TensorMap> = u.iter().collect();
        let layout = Layout::of(&g0);
        let outcome = fltrust(&refs, &g0, &layout).unwrap();
        assert_eq!(outcome.trust, vec![1.0, 0.0]);
        assert_eq!(outcome.aggregate.to_flat(), vec![1.0, 0.0, 0.0]);
    }
}
