//! The one error type of the protocol core.
//!
//! Every variant names *what* failed without carrying secret material, so an
//! error can be logged as-is. Callers that answer a network peer map these to
//! coarse public codes (see `ProtocolError::public_code`) and keep the detail
//! for their own log.

use thiserror::Error;

use crate::api::ErrorCode;

/// Everything that can go wrong in the protocol core.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A suite identifier that this build does not implement.
    #[error("unknown {kind} suite {name:?}")]
    UnknownSuite {
        /// `"kem"` or `"signature"`.
        kind: &'static str,
        /// The identifier as received (truncated to 64 characters).
        name: String,
    },
    /// A key, ciphertext or message was made for another suite than expected.
    #[error("suite mismatch: expected {expected}, got {actual}")]
    SuiteMismatch {
        /// The suite the receiver expected.
        expected: &'static str,
        /// The suite the sender used.
        actual: &'static str,
    },
    /// A fixed-size field had the wrong length.
    #[error("{what} has length {actual}, expected {expected}")]
    InvalidLength {
        /// Which field.
        what: &'static str,
        /// The length the suite requires.
        expected: usize,
        /// The length received.
        actual: usize,
    },
    /// Key material that the primitive rejected (bad encoding, failed range checks).
    #[error("invalid {0}")]
    InvalidKey(&'static str),
    /// A signature did not verify.
    #[error("signature verification failed: {0}")]
    BadSignature(&'static str),
    /// Decapsulation failed outright (ML-KEM rejects implicitly, so this means
    /// a malformed ciphertext or a hybrid component failure).
    #[error("decapsulation failed")]
    Decapsulation,
    /// Encapsulation to a public key failed.
    #[error("encapsulation failed")]
    Encapsulation,
    /// An AEAD tag did not verify: wrong key, tampered data or associated data.
    #[error("authenticated decryption failed: {0}")]
    Aead(&'static str),
    /// A sealed record arrived with a sequence number that is not above the
    /// last one accepted (a replay or reordering).
    #[error("record sequence {received} is not above the last accepted {last_accepted}")]
    Replay {
        /// The highest sequence number accepted so far.
        last_accepted: u64,
        /// The sequence number of the rejected record.
        received: u64,
    },
    /// A response carried another sequence number than the request it answers.
    #[error("response sequence {received} does not answer request {expected}")]
    UnexpectedSequence {
        /// The request's sequence number.
        expected: u64,
        /// The response's.
        received: u64,
    },
    /// The sending side has used every sequence number.
    #[error("sequence numbers exhausted; open a new session")]
    SequenceExhausted,
    /// A session or report is past its expiry (or not yet valid).
    #[error("expired at {expires_at}, now {now}")]
    Expired {
        /// Unix seconds at which it stopped being valid.
        expires_at: u64,
        /// Unix seconds now.
        now: u64,
    },
    /// The server key or certificate does not hash to the pinned fingerprint.
    #[error("server identity does not match the pinned fingerprint")]
    PinMismatch,
    /// Explicit key confirmation failed: the peers did not derive the same keys.
    #[error("key confirmation failed")]
    KeyConfirmation,
    /// A field that must agree between two messages did not.
    #[error("{0} does not match")]
    Mismatch(&'static str),
    /// An input exceeded its size limit; checked before any parsing.
    #[error("{what} is {actual} bytes, over the limit of {limit}")]
    TooLarge {
        /// Which input.
        what: &'static str,
        /// Its limit in bytes.
        limit: usize,
        /// Its actual size.
        actual: usize,
    },
    /// An input could not be decoded.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which input.
        what: &'static str,
        /// Why (no secret material, no echo of the input).
        reason: String,
    },
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// An attestation report was refused by policy.
    #[error("attestation refused: {0}")]
    AttestationRefused(&'static str),
    /// The hardware evidence in an attestation report was refused: not
    /// committing to the report's keys, not vouched for by its vendor, or
    /// not allowed by the hardware policy (the detail says which rule).
    #[error("attestation refused: {0}")]
    Evidence(#[from] qflare_attest::AttestError),
    /// The cryptographic backend failed internally.
    #[error("cryptographic backend failure in {0}")]
    Backend(&'static str),
}

impl ProtocolError {
    /// A stable, coarse code that is safe to send to a peer.
    ///
    /// Distinguishing, say, a bad signature from a bad AEAD tag would help an
    /// attacker probe; peers learn only which family of check failed.
    pub fn public_code(&self) -> ErrorCode {
        match self {
            Self::UnknownSuite { .. } | Self::SuiteMismatch { .. } => ErrorCode::UnsupportedSuite,
            Self::TooLarge { .. } => ErrorCode::PayloadTooLarge,
            Self::Malformed { .. } | Self::InvalidLength { .. } | Self::InvalidKey(_) => {
                ErrorCode::MalformedRequest
            }
            Self::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Self::Expired { .. } => ErrorCode::Expired,
            Self::Replay { .. } | Self::UnexpectedSequence { .. } => ErrorCode::Replayed,
            Self::SequenceExhausted => ErrorCode::SessionExhausted,
            Self::AttestationRefused(_) | Self::Evidence(_) => ErrorCode::AttestationRefused,
            Self::Backend(_) => ErrorCode::InternalError,
            Self::BadSignature(_)
            | Self::Decapsulation
            | Self::Encapsulation
            | Self::Aead(_)
            | Self::PinMismatch
            | Self::KeyConfirmation
            | Self::Mismatch(_) => ErrorCode::AuthenticationFailed,
        }
    }

    /// A [`ProtocolError::Malformed`] for `what`.
    pub fn malformed(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Malformed {
            what,
            reason: reason.into(),
        }
    }
}

/// Result alias for the protocol core.
pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;
