//! What happened to each device's update, as written to the audit ledger.

use std::fmt;

use qflare_protocol::identity::DeviceId;
use serde::{Deserialize, Serialize};

/// Why an update was accepted or rejected. Serialized as its [`code`](Self::code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VerdictReason {
    /// Aggregated as submitted.
    Accepted,
    /// Aggregated after rescaling to the norm bound.
    Clipped,
    /// Made for another round (a replay from an earlier round, or a stale client).
    WrongRound,
    /// Trained from another model version than the round's.
    WrongModelVersion,
    /// A second update from a device in the same round.
    Duplicate,
    /// Example count zero or above the configured cap.
    BadExampleCount,
    /// Tensor names or shapes differ from the global model's.
    WrongShape,
    /// Holds a NaN or an infinity.
    NonFinite,
    /// L2 norm above the round's bound.
    NormExceeded,
    /// Cosine with the reference direction below the configured minimum.
    LowSimilarity,
    /// Cosine far below the round's other updates (MAD rule).
    SimilarityOutlier,
    /// Not among the updates Multi-Krum selected.
    KrumExcluded,
    /// FLTrust trust score ReLU(cos(Δᵢ, reference)) of zero.
    FltrustZeroTrust,
}

impl VerdictReason {
    /// Every reason, for documentation and exhaustive tests.
    pub const ALL: [Self; 13] = [
        Self::Accepted,
        Self::Clipped,
        Self::WrongRound,
        Self::WrongModelVersion,
        Self::Duplicate,
        Self::BadExampleCount,
        Self::WrongShape,
        Self::NonFinite,
        Self::NormExceeded,
        Self::LowSimilarity,
        Self::SimilarityOutlier,
        Self::KrumExcluded,
        Self::FltrustZeroTrust,
    ];

    /// The stable snake_case code stored in the ledger and shown by the API.
    pub fn code(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Clipped => "clipped",
            Self::WrongRound => "wrong_round",
            Self::WrongModelVersion => "wrong_model_version",
            Self::Duplicate => "duplicate",
            Self::BadExampleCount => "bad_example_count",
            Self::WrongShape => "wrong_shape",
            Self::NonFinite => "non_finite",
            Self::NormExceeded => "norm_exceeded",
            Self::LowSimilarity => "low_similarity",
            Self::SimilarityOutlier => "similarity_outlier",
            Self::KrumExcluded => "krum_excluded",
            Self::FltrustZeroTrust => "fltrust_zero_trust",
        }
    }

    /// A sentence for people.
    pub fn message(self) -> &'static str {
        match self {
            Self::Accepted => "update accepted",
            Self::Clipped => "update accepted after clipping to the norm bound",
            Self::WrongRound => "update was made for another round",
            Self::WrongModelVersion => "update was trained from another model version",
            Self::Duplicate => "device already submitted an update this round",
            Self::BadExampleCount => "example count is zero or above the configured cap",
            Self::WrongShape => "tensor names or shapes differ from the global model",
            Self::NonFinite => "update holds a NaN or an infinity",
            Self::NormExceeded => "update norm is above the round's bound",
            Self::LowSimilarity => "update direction disagrees with the reference direction",
            Self::SimilarityOutlier => {
                "update direction is a statistical outlier among the round's updates"
            }
            Self::KrumExcluded => "update was not among those Multi-Krum selected",
            Self::FltrustZeroTrust => {
                "update has zero FLTrust trust (cosine with the trusted reference ≤ 0)"
            }
        }
    }

    /// True for the reasons under which the update is aggregated.
    pub fn is_accepted(self) -> bool {
        matches!(self, Self::Accepted | Self::Clipped)
    }
}

impl fmt::Display for VerdictReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Refusals decided before the aggregator sees an update.
pub const ENVELOPE_CODES: &[&str] = &[
    "not_selected",
    "malformed_envelope",
    "device_mismatch",
    "wrong_round",
    "wrong_model_version",
    "bad_signature",
    "undecryptable",
    "malformed_update",
    "aggregator_error",
];

/// True for every code the enclave can give a submission: the
/// aggregator's [`VerdictReason`]s, its envelope refusals
/// ([`ENVELOPE_CODES`], `duplicate`) and `pending`. The
/// host relays only these to devices, so a compromised or newer enclave
/// cannot pass arbitrary text through it.
pub fn is_known_code(code: &str) -> bool {
    code == "pending"
        || code == "duplicate"
        || ENVELOPE_CODES.contains(&code)
        || VerdictReason::ALL
            .iter()
            .any(|reason| reason.code() == code)
}

/// The immediate answer to a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Folded into the running aggregate (streaming mode). Final.
    Accepted(VerdictReason),
    /// Passed validation and buffered; the defense decides at finalize.
    Pending,
    /// Rejected. Final.
    Rejected(VerdictReason),
}

impl Verdict {
    /// True for a final rejection.
    pub fn is_rejected(&self) -> bool {
        matches!(self, Self::Rejected(_))
    }

    /// The reason, once decided.
    pub fn reason(&self) -> Option<VerdictReason> {
        match self {
            Self::Accepted(r) | Self::Rejected(r) => Some(*r),
            Self::Pending => None,
        }
    }
}

/// The final verdict for one submission, as the audit ledger records it.
///
/// `score` is the number the deciding rule compared with its threshold:
/// the norm for `norm_exceeded` and `clipped`, the cosine for
/// `low_similarity` and `fltrust_zero_trust`, the robust z-score for
/// `similarity_outlier`, the Krum score for `krum_excluded` (and for a
/// Multi-Krum selection), the trust score for an FLTrust acceptance, the
/// last clipping factor min(1, τ/‖Δᵢ − v‖) under centered clipping; `None`
/// for validation failures and a plain acceptance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceVerdict {
    /// The submitting device.
    pub device_id: DeviceId,
    /// Whether the update went into the aggregate.
    pub accepted: bool,
    /// Why.
    pub reason: VerdictReason,
    /// See the type's documentation.
    pub score: Option<f64>,
    /// The update's L2 norm as submitted, when it passed validation.
    pub norm: Option<f64>,
    /// Its cosine with the round's reference direction, when one was used.
    pub cosine: Option<f64>,
    /// Its share of the aggregate (weights sum to 1), for aggregators that
    /// weight whole updates (FedAvg, Multi-Krum, FLTrust).
    pub weight: Option<f64>,
}

impl DeviceVerdict {
    pub(crate) fn new(device_id: DeviceId, reason: VerdictReason) -> Self {
        Self {
            device_id,
            accepted: reason.is_accepted(),
            reason,
            score: None,
            norm: None,
            cosine: None,
            weight: None,
        }
    }

    pub(crate) fn decide(&mut self, reason: VerdictReason, score: Option<f64>) {
        self.reason = reason;
        self.accepted = reason.is_accepted();
        self.score = score;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_serialized() {
        let mut seen = std::collections::BTreeSet::new();
        for reason in VerdictReason::ALL {
            let code = reason.code();
            assert!(code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(seen.insert(code));
            assert_eq!(
                serde_json::to_string(&reason).unwrap(),
                format!("\"{code}\"")
            );
            assert!(!reason.message().is_empty());
            assert!(is_known_code(code));
        }
        for code in ENVELOPE_CODES {
            assert!(is_known_code(code));
        }
        assert!(is_known_code("pending") && is_known_code("duplicate"));
        assert!(!is_known_code("norm 3.2") && !is_known_code(""));
    }
}
