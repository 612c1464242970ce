//! The edge library's error type.

use qflare_protocol::ProtocolError;

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
        code: String,
        /// The server's message.
        message: String,
    },
    /// A protocol check failed (bad signature, pin mismatch, replay...).
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The identity directory or file is unusable.
    #[error("identity: {0}")]
    Identity(String),
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
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}
