//! Errors of the aggregation core.
//!
//! A rejected *update* is not an error: it is a [`crate::verdict::VerdictReason`]
//! recorded for its device. Errors are for the round itself: a bad
//! configuration, a memory bound reached, or a round that cannot produce a
//! model and must be retried.

use thiserror::Error;

/// A configuration or round specification that cannot be run.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting is out of its range.
    #[error("aggregation setting {field}: {reason}")]
    Invalid {
        /// The setting's key, as in `config/global_config.yaml`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// FLTrust is configured but the round has no trusted reference update.
    #[error(
        "the FLTrust aggregator needs a trusted reference update for the round, and none was supplied"
    )]
    MissingTrustedReference,
    /// A reference tensor map has names or shapes other than the global model's.
    #[error("the {what} does not have the global model's tensor names and shapes")]
    ReferenceLayout {
        /// Which reference.
        what: &'static str,
    },
    /// A reference tensor map holds a NaN or an infinity.
    #[error("the {what} holds a NaN or an infinity")]
    ReferenceNonFinite {
        /// Which reference.
        what: &'static str,
    },
    /// A reference that must have a direction is all zeros.
    #[error("the {what} is all zeros, so it has no direction to compare with")]
    ReferenceZero {
        /// Which reference.
        what: &'static str,
    },
    /// The global model is empty or holds a NaN or an infinity.
    #[error("the global model is empty or holds a NaN or an infinity")]
    InvalidGlobal,
}

/// Why a round could not accept an update or could not be aggregated.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum AggregationError {
    /// The configuration or round specification is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Buffering one more update would pass `max_buffered_bytes`. The update
    /// was not recorded; finalize the round with what it has, or raise the
    /// bound.
    #[error(
        "buffering this update would hold {needed} bytes of updates, over the configured bound of {limit} bytes"
    )]
    MemoryBoundExceeded {
        /// Bytes that would be buffered with this update.
        needed: u64,
        /// The configured bound.
        limit: u64,
    },
    /// No update survived validation and the defense: the round must be retried.
    #[error("no update was accepted (of {submitted} submitted): the round must be retried")]
    NoAcceptedUpdates {
        /// Updates submitted to the round.
        submitted: usize,
    },
    /// Fewer updates survived than the configured minimum.
    #[error("{accepted} updates accepted, fewer than the configured minimum of {required}")]
    TooFewAccepted {
        /// Updates accepted.
        accepted: usize,
        /// The configured `min_accepted`.
        required: usize,
    },
    /// Multi-Krum's guarantee needs n ≥ 2f + 3 candidate updates.
    #[error(
        "Multi-Krum assuming {byzantine} Byzantine devices needs at least {required} updates, and {available} passed the defense"
    )]
    TooFewForKrum {
        /// Updates that reached the aggregator.
        available: usize,
        /// The configured f.
        byzantine: usize,
        /// 2f + 3.
        required: usize,
    },
    /// Tensor maps handed to a kernel do not share one layout.
    #[error("the updates do not share the global model's tensor names and shapes")]
    LayoutMismatch,
    /// An update handed to an aggregator holds a NaN or an infinity (the
    /// round validates updates before aggregating; direct callers must too).
    #[error("an update handed to the aggregator holds a NaN or an infinity")]
    NonFiniteUpdate,
    /// Adding the aggregate to the global model overflowed `f32`.
    #[error("the new global model would hold a NaN or an infinity")]
    NonFiniteModel,
    /// A round under central DP was finalized without the enclave's
    /// randomness for its noise: nothing is released.
    #[error("a differentially private round needs randomness for its noise (finalize_with_noise)")]
    PrivacyNeedsRandomness,
}

impl AggregationError {
    /// True for a round that produced no model but may succeed when retried
    /// with fresh updates, as opposed to a configuration to fix first.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NoAcceptedUpdates { .. }
                | Self::TooFewAccepted { .. }
                | Self::TooFewForKrum { .. }
                | Self::NonFiniteModel
        )
    }
}

/// Result type of this crate's aggregation core.
pub type Result<T, E = AggregationError> = std::result::Result<T, E>;
