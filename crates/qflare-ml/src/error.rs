//! The crate's error type.
//!
//! Every failure a caller can provoke — a bad file, a wrong path, a model of
//! the wrong shape, an impossible partition — is a variant here, so nothing in
//! the crate panics on input it was handed.

use std::path::PathBuf;

use qflare_protocol::ProtocolError;

/// Result alias used throughout the crate.
pub type Result<T, E = MlError> = std::result::Result<T, E>;

/// What can go wrong in models, data, partitions and training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MlError {
    /// A file the operation needs does not exist.
    #[error("{} does not exist", path.display())]
    MissingFile {
        /// The file looked for.
        path: PathBuf,
    },

    /// Reading or writing a file failed.
    ///
    /// The inner error is part of the message, not a `source()`, so a chain
    /// printed with `{:#}` says it once.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },

    /// A `.gz` file is not valid gzip, or its stream is corrupt.
    #[error("{} is not a valid gzip file: {error}", path.display())]
    Gzip {
        /// The file involved.
        path: PathBuf,
        /// The decompressor's error (in the message, not a `source()`).
        error: std::io::Error,
    },

    /// An IDX file decompressed but its contents are not what was expected.
    #[error("{} is not a valid IDX file: {reason}", path.display())]
    Idx {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Data handed to a constructor are inconsistent (lengths, label range).
    #[error("invalid data set: {0}")]
    InvalidData(String),

    /// No way of finding the data set worked; the message lists every way to provide it.
    #[error("{dataset} data set not found.\nLooked in:\n{tried}\n{help}")]
    DataNotFound {
        /// The data set's id.
        dataset: &'static str,
        /// Every place tried, one per line, with why it did not work.
        tried: String,
        /// How to provide the data.
        help: String,
    },

    /// A download failed before its bytes could be checked.
    #[error("downloading {url} failed: {reason}")]
    Download {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },

    /// A file's SHA-256 is not the pinned one; the file has been deleted.
    #[error(
        "{} has SHA-256 {actual}, expected {expected}; the file was deleted",
        path.display()
    )]
    HashMismatch {
        /// The file (already removed).
        path: PathBuf,
        /// The pinned digest, hex.
        expected: String,
        /// The digest of what was received, hex.
        actual: String,
    },

    /// An architecture id is not one we know.
    #[error("unknown model architecture {0:?} (known: mnist-2nn, mnist-cnn)")]
    UnknownArchitecture(String),

    /// A data set id is not one we know.
    #[error("unknown data set {0:?} (known: mnist, fashion-mnist)")]
    UnknownDataset(String),

    /// A tensor map does not fit the architecture (names, shapes or values).
    #[error("model does not fit {architecture}: {reason}")]
    Layout {
        /// The architecture id.
        architecture: &'static str,
        /// What does not fit.
        reason: String,
    },

    /// Two tensor maps that must share a layout do not.
    #[error("tensor maps differ in layout: {0}")]
    LayoutMismatch(String),

    /// A training, evaluation or partition parameter is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Training produced a non-finite loss.
    #[error(
        "training diverged at epoch {epoch}, batch {batch} (loss {loss}); lower the learning rate"
    )]
    Diverged {
        /// Zero-based epoch.
        epoch: usize,
        /// Zero-based batch within the epoch.
        batch: usize,
        /// The loss observed.
        loss: f64,
    },

    /// The tensor backend reported an error.
    #[error("tensor backend: {0}")]
    Backend(String),

    /// The compute thread pool could not be built.
    #[error("compute thread pool: {0}")]
    ThreadPool(String),

    /// Encoding or decoding a tensor map failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl MlError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::MissingFile { path }
        } else {
            Self::Io {
                path,
                error: source,
            }
        }
    }

    pub(crate) fn idx(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Idx {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
