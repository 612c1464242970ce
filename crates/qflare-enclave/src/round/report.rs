//! What a round reports: [`RoundResult`] on success, [`RoundFailure`] when
//! it produced no model, both with the per-device verdicts and the
//! [`RoundStats`] the ledger and dashboard show. Filled in by `mod.rs`,
//! `streaming.rs` and `buffered.rs`; no logic of its own.

use qflare_protocol::tensor::TensorMap;
use serde::{Deserialize, Serialize};

use crate::config::AggregatorKind;
use crate::error::AggregationError;
use crate::privacy::PrivacyRoundStats;
use crate::verdict::DeviceVerdict;

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
    /// What central DP added, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyRoundStats>,
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
