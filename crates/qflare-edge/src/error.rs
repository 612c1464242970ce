//! The edge library's error type.

#[cfg(feature = "burn")]
use qflare_ml::MlError;
use qflare_protocol::ProtocolError;
use qflare_protocol::api::ErrorCode;

use crate::trainer::TrainError;

/// Everything that can go wrong on the device side.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The server could not be reached (retryable).
    #[error("network: {0}")]
    Network(String),
    /// TLS could not be set up or the certificate did not match the pin.
    #[error("tls: {0}")]
    Tls(String),
    /// The server answered with an error.
    #[error("server refused ({status}): {code}: {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The stable error code.
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// A protocol check failed (bad signature, pin mismatch, replay...).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The identity directory or file is unusable.
    #[error("identity: {0}")]
    Identity(String),
    /// The enclave's attestation report was refused (mode, measurement,
    /// nonce, age or signature); nothing is sealed to its key.
    #[error("attestation refused: {0}")]
    Attestation(ProtocolError),
    /// A downloaded global model failed verification; the device does not
    /// train on it.
    #[error("model refused: {0}")]
    ModelRefused(ModelRefusal),
    /// The server's description of a round is unusable (a missing field, an
    /// unknown architecture, a training plan outside the device's limits).
    #[error("round refused: {0}")]
    RoundRefused(String),
    /// Loading data or checking a model against its architecture failed.
    #[error(transparent)]
    #[cfg(feature = "burn")]
    Ml(#[from] MlError),
    /// Trained weights that cannot become an update (another layout, a NaN),
    /// refused before anything was sealed.
    #[error(transparent)]
    UpdateRefused(#[from] crate::rounds::UpdateRefusal),
    /// The [`LocalTrainer`](crate::LocalTrainer) produced no update (its
    /// message is the error's, unprefixed).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The device's run configuration cannot work.
    #[error("configuration: {0}")]
    Config(String),
}

/// Why a downloaded global model was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelRefusal {
    /// The download is not a header followed by model bytes.
    #[error("malformed download: {0}")]
    Malformed(ProtocolError),
    /// The download names another enclave key than the attested one.
    #[error("the certificate's enclave key is not the attested enclave's key")]
    EnclaveKeyMismatch,
    /// The certificate does not verify against the attested key, or the
    /// bytes are not the certified ones (a flipped byte, a swapped model).
    #[error("certificate check failed: {0}")]
    Certificate(ProtocolError),
    /// The certified model is another version than the round trains from.
    #[error("certified model version {received}, the round trains from version {expected}")]
    VersionMismatch {
        /// The round's model version.
        expected: u64,
        /// The certificate's.
        received: u64,
    },
    /// The certified architecture is not the round's.
    #[error("certified architecture {received:?}, the round uses {expected:?}")]
    ArchitectureMismatch {
        /// The round's architecture id.
        expected: String,
        /// The certificate's.
        received: String,
    },
    /// The certified bytes do not decode to the architecture's tensors with
    /// finite values.
    #[error("model does not fit its architecture: {0}")]
    Layout(String),
}

impl EdgeError {
    pub(crate) fn network(err: reqwest::Error) -> Self {
        // reqwest's Display omits the cause chain; the cause is what helps.
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::Network(message)
    }

    /// True for failures worth retrying with back-off (network, 429, 503).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Network(_) => true,
            Self::Server { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            _ => false,
        }
    }

    /// The server's error code, if the server refused.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The server's error code as it travelled, if the server refused.
    pub fn code(&self) -> Option<&'static str> {
        self.error_code().map(ErrorCode::as_str)
    }
}
