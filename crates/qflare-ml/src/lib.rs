//! QFLARE's machine learning: the models devices train, the data they train
//! on, and the local training and evaluation that produce a federated update.
//!
//! The crate owns five parts, each in its own module, that meet only through
//! plain values:
//!
//! - [`model`]: the MNIST 2NN and the CNN of McMahan et al. (2017) as
//!   [burn] modules, selected by [`Architecture`]. Models cross every
//!   boundary as a [`TensorMap`] — named f32 tensors with PyTorch's names and
//!   shapes (`fc1.weight` is `[out, in]`) — so a model file written with
//!   [`TensorMap::to_safetensors`] loads in PyTorch, the enclave can average
//!   updates without knowing burn, and a signed model digest is a function of
//!   the weights alone. Conversion runs through burn's `ModuleVisitor` and
//!   `ModuleMapper`, validating every name and shape.
//! - [`data`]: a reader for gzip'd IDX files (MNIST, Fashion-MNIST) and the
//!   in-memory [`Dataset`] of images scaled to `[0, 1]` with their labels.
//! - [`source`]: where the data come from — an explicit path, the config
//!   value, `QFLARE_DATA_DIR`, `./data/`, Debian's `/usr/share/datasets/`,
//!   and last a download from the data set's canonical mirror with every
//!   file's SHA-256 checked against pinned values.
//! - [`partition`](mod@partition): splits of a label vector among clients — IID, the paper's
//!   label shards (pathological non-IID) and Dirichlet(α) — deterministic
//!   under a seed.
//! - [`train`](mod@train): plain mini-batch SGD with cross-entropy loss as in FedAvg
//!   ([`train()`]), batched [`evaluate()`], and the update arithmetic
//!   ([`delta`], [`apply_delta`]).
//!
//! All tensor work runs on burn's pure-Rust `flex` CPU backend (with
//! autodiff for training) inside one process-wide rayon pool whose size
//! [`set_compute_threads`] controls, so any number of simulated devices in
//! one process share a fixed number of compute threads (see [`compute`]).
//!
//! Determinism: initial weights come from ChaCha20 under a caller's seed,
//! not from burn's global RNG, and each epoch's shuffle from the training
//! seed, so the same seed, data and thread count give bit-identical weights.
//!
//! Nothing here logs tensor values: weights and updates are what a curious
//! host must not learn.
//!
//! [`TensorMap`]: qflare_protocol::tensor::TensorMap
//! [`TensorMap::to_safetensors`]: qflare_protocol::tensor::TensorMap::to_safetensors

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod compute;
pub mod data;
mod error;
pub mod model;
pub mod partition;
pub mod source;
pub mod train;

pub use compute::{compute_threads, set_compute_threads};
pub use data::{Dataset, Split};
pub use error::{MlError, Result};
pub use model::{Architecture, Model, initial_model, load_model, save_model};
pub use partition::{Partition, partition};
pub use source::{DataOrigin, DataSource, DatasetKind, Download, LocatedData};
pub use train::{Metrics, TrainConfig, TrainOutcome, apply_delta, delta, evaluate, train};
