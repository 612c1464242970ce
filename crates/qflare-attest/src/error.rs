//! One error type for every verifier, each variant naming what failed so a
//! device can say which rule refused an enclave.

use crate::evidence::TeeKind;

/// Why evidence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The evidence could not be parsed.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being read.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The report data does not commit to the keys, runtime and nonce the
    /// report names: evidence made for another enclave or another request.
    #[error("the evidence's report data does not commit to this enclave's keys and nonce")]
    BindingMismatch,
    /// The policy does not accept this kind of TEE.
    #[error("{0} evidence is not accepted by this policy")]
    KindNotAccepted(TeeKind),
    /// The vendor does not vouch for the evidence at the verification time:
    /// a certificate chain, its validity, the collateral, or the vendor's
    /// own consistency checks failed.
    #[error("{kind} evidence is not vouched for by the vendor: {detail}")]
    Chain {
        /// Whose chain.
        kind: TeeKind,
        /// Which link failed, and how.
        detail: String,
    },
    /// The evidence's own signature does not verify.
    #[error("{kind} evidence signature: {detail}")]
    Signature {
        /// Whose evidence.
        kind: TeeKind,
        /// What failed.
        detail: String,
    },
    /// The evidence is genuine but a policy rule refuses it.
    #[error("{kind} policy: {rule}")]
    Policy {
        /// Whose evidence.
        kind: TeeKind,
        /// The rule that failed, in words.
        rule: String,
    },
}

impl AttestError {
    pub(crate) fn malformed(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Self::Malformed {
            what,
            detail: detail.to_string(),
        }
    }

    pub(crate) fn chain(kind: TeeKind, detail: impl std::fmt::Display) -> Self {
        Self::Chain {
            kind,
            detail: detail.to_string(),
        }
    }

    pub(crate) fn signature(kind: TeeKind, detail: impl std::fmt::Display) -> Self {
        Self::Signature {
            kind,
            detail: detail.to_string(),
        }
    }

    pub(crate) fn policy(kind: TeeKind, rule: impl std::fmt::Display) -> Self {
        Self::Policy {
            kind,
            rule: rule.to_string(),
        }
    }
}

/// Result with [`AttestError`].
pub type Result<T, E = AttestError> = std::result::Result<T, E>;
