//! The store's error type and the mapping from backend errors into it.

use std::fmt;

/// Why an enrollment token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenRejection {
    /// No token has this hash.
    Unknown,
    /// The token was already consumed by an enrollment.
    AlreadyUsed,
    /// The token's expiry has passed.
    Expired,
    /// An administrator revoked the token.
    Revoked,
}

impl fmt::Display for TokenRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unknown => "unknown",
            Self::AlreadyUsed => "already used",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        })
    }
}

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL or another setting is unusable.
    #[error("store configuration: {0}")]
    Config(String),
    /// A uniqueness rule was violated; the text names what conflicted.
    #[error("conflict: {0} already exists")]
    Conflict(&'static str),
    /// An enrollment token was refused.
    #[error("enrollment token rejected: {0}")]
    TokenRejected(TokenRejection),
    /// Something the operation refers to does not exist; the text names what.
    #[error("not found: {0}")]
    NotFound(&'static str),
    /// A value handed to the store does not fit its column: a `u64` above `i64::MAX`, since both
    /// backends store integers as signed 64-bit, or a value outside the range the method
    /// documents (an evaluation on zero examples, a non-finite metric). The text names the field.
    #[error("value out of range: {0}")]
    OutOfRange(&'static str),
    /// A stored value does not decode (an unknown state string, a negative count), which means the
    /// database was altered outside the store or by a newer version.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// The database failed; the text is the backend's message.
    #[error("storage backend: {0}")]
    Backend(String),
}

/// Maps a backend error that has no more specific meaning at its call site.
pub(crate) fn backend(error: sqlx::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// Maps a failed write: a unique-constraint violation becomes `Conflict(what)`, a foreign-key
/// violation `NotFound(missing)`, anything else `Backend`.
pub(crate) fn write_error(
    error: sqlx::Error,
    what: &'static str,
    missing: &'static str,
) -> StoreError {
    match error.as_database_error() {
        Some(db) if db.is_unique_violation() => StoreError::Conflict(what),
        Some(db) if db.is_foreign_key_violation() => StoreError::NotFound(missing),
        _ => backend(error),
    }
}
