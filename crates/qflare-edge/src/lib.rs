//! # qflare-edge
//!
//! The device side of QFLARE, as a library and the `qflare-edge` binary.
//!
//! * [`transport`]: HTTPS with TLS 1.3, hybrid X25519MLKEM768 key exchange,
//!   and the server certificate pinned through the one fingerprint the
//!   operator hands over (which also covers the server's ML-DSA key).
//! * [`identity`]: the device's identity file — its id, the pinned server,
//!   and its private KEM and signing keys — owner-only; enrollment never
//!   overwrites it, key rotation replaces it atomically.
//! * [`client`]: enrollment with proof of possession, the session handshake
//!   (verifying the pinned server key), sealed calls, key rotation.
//! * [`run`](mod@run): the federated-learning loop — poll the round, verify
//!   the enclave's report and the global model, train locally, seal the
//!   update to the attested enclave, submit — with back-off, session
//!   renewal, re-sealing after an enclave restart, and progress events.
//! * [`rounds`]: the same steps one call at a time ([`RoundClient`]: wait
//!   for a round with its verified model, submit trained weights, report an
//!   evaluation), for hosts that drive training themselves.
//! * [`trainer`]: local training as the [`LocalTrainer`] trait the loop is
//!   given, so the loop's networking and security code does not depend on
//!   how an update is trained; `BurnTrainer` trains the built-in
//!   architectures with `qflare-ml` (burn).
//! * `shard`: the device's local data (an IID shard of an IDX data set).
//!
//! `BurnTrainer`, `shard` and the binary need the `burn` feature (on by
//! default); without it, this crate is the device's networking and security
//! code alone, for hosts that train elsewhere (the Python SDK).
//!
//! Private keys are generated here and never leave the device; only public
//! keys and signatures are sent.

#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod identity;
mod response;
pub mod rounds;
pub mod run;
#[cfg(feature = "burn")]
pub mod shard;
pub mod trainer;
pub mod transport;

pub use client::{
    EnrollOptions, Session, enroll, follow_server_key, load_identity, open_session, rotate_keys,
    transport_for,
};
pub use error::{EdgeError, ModelRefusal};
pub use identity::Identity;
pub use rounds::{NoRound, RoundClient, TrainingRound, UpdateRefusal, checked_delta};
pub use run::{
    Backoff, DeviceConfig, DeviceEvent, Events, RoundRecord, RoundTimings, RunSummary, StopOutcome,
    StopReason, TamperFn, run_device,
};
#[cfg(feature = "burn")]
pub use shard::{DEFAULT_PARTITION_SEED, Shard, load_local_data};
#[cfg(feature = "burn")]
pub use trainer::BurnTrainer;
pub use trainer::{
    EvalResult, FitResult, FitTask, LOSS_METRIC, LocalTrainer, TrainError, layout_mismatch,
};
