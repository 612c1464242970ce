//! Transcripts: the only bytes that are ever signed, MACed or fed to HKDF.
//!
//! A transcript is a running SHA-384 over
//!
//! ```text
//! "QFLARE" || u16 version || u8 len(label) || label
//! then for each field:  u8 len(name) || name || u64 len(value) || value
//! ```
//!
//! Every field is named and length-prefixed, so no two different sequences of
//! fields hash alike (no ambiguity between `("ab","c")` and `("a","bc")`), and
//! the label separates domains: a signature made for one purpose never
//! verifies for another. JSON is never signed; the wire encoding can change
//! without touching what signatures mean.

use aws_lc_rs::digest;

use crate::PROTOCOL_VERSION;

/// Length of a transcript hash (SHA-384).
pub const TRANSCRIPT_HASH_LEN: usize = 48;

/// The purposes a transcript can serve. Each has its own label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    /// A device's proof of possession in its enrollment request.
    EnrollRequest,
    /// The server's signed answer to an enrollment.
    EnrollResponse,
    /// The server's signed session hello.
    ServerHello,
    /// The device's signed session confirmation.
    ClientConfirm,
    /// The key confirmation MAC that closes the handshake.
    KeyConfirmation,
    /// The device's inner signature over an update.
    UpdateInner,
    /// The device's outer signature over an envelope.
    UpdateOuter,
    /// Key derivation for an update envelope.
    EnvelopeKey,
    /// The enclave's signature over a new global model.
    GlobalModel,
    /// An enclave attestation report.
    Attestation,
    /// The fingerprint a device pins for a server.
    ServerFingerprint,
    /// The stored hash of an enrollment token.
    TokenHash,
    /// A device's request to replace its keys.
    KeyRotation,
    /// An entry of the audit ledger's hash chain.
    LedgerEntry,
    /// A signed checkpoint of the audit ledger.
    LedgerCheckpoint,
    /// The server's hand-over of its identity to a new key.
    ServerKeyHandover,
    /// What an enclave asks its TEE to sign: its keys, runtime and the
    /// verifier's nonce, committed in the evidence's report data.
    EvidenceBinding,
}

impl Domain {
    /// The label absorbed at the start of the transcript.
    pub const fn label(self) -> &'static str {
        match self {
            Self::EnrollRequest => "enroll/request",
            Self::EnrollResponse => "enroll/response",
            Self::ServerHello => "session/server-hello",
            Self::ClientConfirm => "session/client-confirm",
            Self::KeyConfirmation => "session/key-confirmation",
            Self::UpdateInner => "update/inner",
            Self::UpdateOuter => "update/outer",
            Self::EnvelopeKey => "update/envelope-key",
            Self::GlobalModel => "model/global",
            Self::Attestation => "enclave/attestation",
            Self::ServerFingerprint => "server/fingerprint",
            Self::TokenHash => "enroll/token-hash",
            Self::KeyRotation => "device/key-rotation",
            Self::LedgerEntry => "audit/entry",
            Self::LedgerCheckpoint => "audit/checkpoint",
            Self::ServerKeyHandover => "server/key-handover",
            Self::EvidenceBinding => "enclave/evidence-binding",
        }
    }
}

/// A SHA-384 transcript hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TranscriptHash(pub [u8; TRANSCRIPT_HASH_LEN]);

impl TranscriptHash {
    /// The hash bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for TranscriptHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TranscriptHash({})", hex::encode(self.0))
    }
}

/// A running, domain-separated transcript.
#[derive(Clone)]
pub struct Transcript {
    context: digest::Context,
}

impl Transcript {
    /// Starts a transcript for `domain` at the current protocol version.
    pub fn new(domain: Domain) -> Self {
        let mut context = digest::Context::new(&digest::SHA384);
        context.update(b"QFLARE");
        context.update(&PROTOCOL_VERSION.to_be_bytes());
        let label = domain.label().as_bytes();
        context.update(&[label.len() as u8]);
        context.update(label);
        Self { context }
    }

    /// Absorbs one named field.
    pub fn append(&mut self, name: &'static str, value: &[u8]) -> &mut Self {
        debug_assert!(name.len() < 256, "field names are short literals");
        self.context.update(&[name.len() as u8]);
        self.context.update(name.as_bytes());
        self.context.update(&(value.len() as u64).to_be_bytes());
        self.context.update(value);
        self
    }

    /// Absorbs one named integer field (big-endian, 8 bytes).
    pub fn append_u64(&mut self, name: &'static str, value: u64) -> &mut Self {
        self.append(name, &value.to_be_bytes())
    }

    /// Absorbs a previous transcript's hash, chaining the two.
    pub fn append_hash(&mut self, name: &'static str, hash: &TranscriptHash) -> &mut Self {
        self.append(name, hash.as_bytes())
    }

    /// The hash of everything absorbed so far; the transcript can continue.
    pub fn hash(&self) -> TranscriptHash {
        let mut out = [0u8; TRANSCRIPT_HASH_LEN];
        out.copy_from_slice(self.context.clone().finish().as_ref());
        TranscriptHash(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_unambiguous_and_domains_separate() {
        let mut a = Transcript::new(Domain::EnrollRequest);
        a.append("x", b"ab").append("y", b"c");
        let mut b = Transcript::new(Domain::EnrollRequest);
        b.append("x", b"a").append("y", b"bc");
        assert_ne!(a.hash(), b.hash());

        let mut c = Transcript::new(Domain::EnrollResponse);
        c.append("x", b"ab").append("y", b"c");
        assert_ne!(a.hash(), c.hash());

        let mut d = Transcript::new(Domain::EnrollRequest);
        d.append("x", b"ab").append("z", b"c");
        assert_ne!(a.hash(), d.hash(), "field names are bound");
    }

    #[test]
    fn hash_is_a_snapshot() {
        let mut t = Transcript::new(Domain::KeyConfirmation);
        t.append("a", b"1");
        let first = t.hash();
        assert_eq!(first, t.hash());
        t.append("b", b"2");
        assert_ne!(first, t.hash());
    }

    #[test]
    fn labels_are_distinct() {
        use std::collections::HashSet;
        let all = [
            Domain::EnrollRequest,
            Domain::EnrollResponse,
            Domain::ServerHello,
            Domain::ClientConfirm,
            Domain::KeyConfirmation,
            Domain::UpdateInner,
            Domain::UpdateOuter,
            Domain::EnvelopeKey,
            Domain::GlobalModel,
            Domain::Attestation,
            Domain::ServerFingerprint,
            Domain::TokenHash,
            Domain::KeyRotation,
            Domain::LedgerEntry,
            Domain::LedgerCheckpoint,
            Domain::ServerKeyHandover,
            Domain::EvidenceBinding,
        ];
        let labels: HashSet<_> = all.iter().map(|d| d.label()).collect();
        assert_eq!(labels.len(), all.len());
    }
}
