//! # qflare-edge
//!
//! The device side of QFLARE, as a library and the `qflare-edge` binary.
//!
//! * [`transport`]: HTTPS with TLS 1.3, hybrid X25519MLKEM768 key exchange,
//!   and the server certificate pinned through the one fingerprint the
//!   operator hands over (which also covers the server's ML-DSA key).
//! * [`identity`]: the device's identity file — its id, the pinned server,
//!   and its private KEM and signing keys — owner-only, never overwritten.
//! * [`client`]: enrollment with proof of possession, the session handshake
//!   (verifying the pinned server key), sealed calls, key rotation.
//!
//! Private keys are generated here and never leave the device; only public
//! keys and signatures are sent.

#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod identity;
pub mod transport;

pub use client::{EnrollOptions, Session, enroll, open_session, rotate_keys, transport_for};
pub use error::EdgeError;
pub use identity::Identity;
