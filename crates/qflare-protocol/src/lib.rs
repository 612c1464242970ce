//! # qflare-protocol
//!
//! The sans-I/O core of QFLARE's post-quantum protocol. It owns every byte
//! that crosses a trust boundary: suites, transcripts, enrollment, the session
//! handshake, the sealed channel, update envelopes, attestation reports,
//! model certificates, tensors and their wire encodings. It never touches a
//! socket, a file or a clock: callers pass time as `now` (Unix seconds) and
//! randomness as an injected `rand_core::CryptoRng`, which is what makes it
//! testable and fuzzable.
//!
//! ## Layers
//!
//! ```text
//!   enrollment   handshake ─▶ channel   envelope   attestation   model
//!        \            |          |          |            |         /
//!         └─────── identity · transcript · wire · tensor ─────────┘
//!                      kem · sig · crypto · secret
//!                          (aws-lc-rs, frodo-kem-rs)
//! ```
//!
//! * [`kem`], [`sig`]: typed traits per algorithm plus a value layer, so a
//!   [`suite`] is data, not a code path.
//! * [`transcript`]: domain-separated, length-prefixed SHA-384 transcripts —
//!   the only thing ever signed, MACed or fed to HKDF.
//! * [`api`]: every route path and error code, shared by server and device
//!   (a path is bound into each sealed record, so both must spell it alike).
//! * [`enrollment`] (step 1), [`handshake`] and [`channel`] (step 2),
//!   [`model`] (step 3), [`envelope`] (step 4), [`attestation`] (step 5).
//! * [`update_encoding`]: how an update's numbers travel inside the envelope
//!   (exact f32, f16, or 8-bit with stochastic rounding), on top of
//!   [`tensor`]'s safetensors codec.
//! * [`rotation`] (a device replaces its keys) and [`handover`] (the server
//!   hands its identity to a new key; devices move their pin along the
//!   signed chain).
//!
//! ## The five steps
//!
//! 1. **Enrollment**: a single-use 256-bit token, fresh device key pairs and a
//!    proof of possession bound to the pinned server fingerprint; the server
//!    answers with a signed device id.
//! 2. **Session**: the server encapsulates to the device's registered KEM key
//!    (authentication) and to an ephemeral key (forward secrecy), signs the
//!    transcript; the device verifies the pinned key, derives directional
//!    AES-256-GCM keys with HKDF-SHA-256 and confirms with a signature and a
//!    key-confirmation MAC. Records carry strictly increasing sequence numbers
//!    bound, with the HTTP method and path, into nonce and associated data.
//! 3. **Model**: each global model carries the enclave's certificate; devices
//!    verify it against an attested key before training.
//! 4. **Update**: signed by the device, sealed HPKE-style to the enclave's KEM
//!    key, signed again as a whole so the host can check who sent it without
//!    being able to read it.
//! 5. **Aggregation**: the enclave's report binds its measurement and keys
//!    (see `qflare-enclave`).
//!
//! ## Standards
//!
//! * ML-KEM-768/1024: NIST FIPS 203, *Module-Lattice-Based Key-Encapsulation
//!   Mechanism Standard* (2024), via aws-lc-rs.
//! * ML-DSA-65/87: NIST FIPS 204, *Module-Lattice-Based Digital Signature
//!   Standard* (2024), via aws-lc-rs; keys stored as the 32-byte seed ξ.
//! * FrodoKEM-640/976-AES: *FrodoKEM: Learning With Errors Key Encapsulation*,
//!   the specification submitted for ISO/IEC 18033-2 standardization (2023),
//!   via frodo-kem-rs.
//! * X-Wing: draft-connolly-cfrg-xwing-kem (ML-KEM-768 + X25519, SHA3-256
//!   combiner).
//! * AES-256-GCM (NIST SP 800-38D), HKDF (RFC 5869) with SHA-256, SHA-256 and
//!   SHA-384 (FIPS 180-4), all via aws-lc-rs.
//! * Model files: the safetensors format. Update envelopes travel in a
//!   binary layout of their own ([`envelope::UpdateEnvelope::to_bytes`]).
//!
//! Secrets live in [`secret::SecretBytes`] (zeroized on drop, constant-time
//! equality, redacted `Debug`); no error carries secret material.

#![forbid(unsafe_code)]

pub mod api;
pub mod at_rest;
pub mod attestation;
pub mod channel;
pub mod crypto;
pub mod enrollment;
pub mod envelope;
pub mod error;
pub mod federation;
pub mod handover;
pub mod handshake;
pub mod identity;
pub mod kem;
pub mod model;
#[cfg(feature = "openapi")]
pub mod openapi;
pub mod rotation;
pub mod secret;
pub mod sig;
pub mod suite;
pub mod tensor;
pub mod transcript;
pub mod update_encoding;
pub mod wire;

#[doc(hidden)]
pub mod fuzzing;

pub use error::{ProtocolError, Result};
pub use suite::{KemSuite, SignatureSuite};

/// The protocol version every message carries and every transcript absorbs.
pub const PROTOCOL_VERSION: u16 = 1;
