//! The sealed channel: every request and response inside a session.
//!
//! A record is `AES-256-GCM(plaintext) ‖ tag ‖ seq` with `seq` a big-endian
//! u64 trailer. The nonce is the direction's base IV XOR `seq` (as in TLS
//! 1.3), and the associated data binds
//!
//! ```text
//! "qflare v1 record" ‖ session id ‖ direction ‖ seq
//!   ‖ len16(HTTP method) ‖ HTTP method ‖ len32(HTTP path) ‖ HTTP path
//! ```
//!
//! so a record cannot be moved to another session, direction, position,
//! method or path. Each direction has its own key. The receiver of requests
//! accepts only sequence numbers strictly above the last one it accepted,
//! which rejects replays and reordering; gaps are allowed so that one lost
//! request does not kill the session. A response carries the sequence number
//! of the request it answers and the client accepts only that one.
//!
//! The trailer layout lets both ends seal and open in place: the AEAD runs
//! over the caller's buffer with no copy, which is what keeps the channel
//! near raw AES-GCM speed on multi-megabyte model updates.

use crate::crypto::{AEAD_TAG_LEN, AeadKey};
use crate::error::{ProtocolError, Result};
use crate::identity::SessionId;
use crate::secret::SecretBytes;

/// Bytes a record adds to its plaintext.
pub const RECORD_OVERHEAD: usize = AEAD_TAG_LEN + 8;

/// Which way a record travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Device to server (requests).
    ClientToServer,
    /// Server to device (responses).
    ServerToClient,
}

impl Direction {
    fn tag(self) -> u8 {
        match self {
            Self::ClientToServer => 1,
            Self::ServerToClient => 2,
        }
    }
}

/// A little cursor for the fixed layouts this crate exports.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(ProtocolError::malformed("encoded state", "truncated"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// The traffic secrets of one session: a key and base IV per direction.
pub struct SessionSecrets {
    pub(crate) c2s_key: SecretBytes,
    pub(crate) c2s_iv: SecretBytes,
    pub(crate) s2c_key: SecretBytes,
    pub(crate) s2c_iv: SecretBytes,
}

impl std::fmt::Debug for SessionSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecrets([REDACTED])")
    }
}

impl SessionSecrets {
    pub(crate) const EXPORT_LEN: usize = 32 + 12 + 32 + 12;

    pub(crate) fn export_into(&self, out: &mut Vec<u8>) {
        for part in [&self.c2s_key, &self.c2s_iv, &self.s2c_key, &self.s2c_iv] {
            out.extend_from_slice(part.expose());
        }
    }

    pub(crate) fn import_from(reader: &mut Reader<'_>) -> Result<Self> {
        Ok(Self {
            c2s_key: SecretBytes::from_slice(reader.take(32)?),
            c2s_iv: SecretBytes::from_slice(reader.take(12)?),
            s2c_key: SecretBytes::from_slice(reader.take(32)?),
            s2c_iv: SecretBytes::from_slice(reader.take(12)?),
        })
    }

    /// Serializes the secrets. The result is secret: wrap it before it leaves memory.
    pub fn export(&self) -> SecretBytes {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(Self::EXPORT_LEN));
        self.export_into(&mut out);
        SecretBytes::from(out)
    }

    /// Restores secrets produced by [`SessionSecrets::export`].
    pub fn import(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != Self::EXPORT_LEN {
            return Err(ProtocolError::InvalidLength {
                what: "session secrets",
                expected: Self::EXPORT_LEN,
                actual: bytes.len(),
            });
        }
        Self::import_from(&mut Reader::new(bytes))
    }
}

fn associated_data(
    session: &SessionId,
    direction: Direction,
    seq: u64,
    method: &str,
    path: &str,
) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + 1 + 8 + 4 + method.len() + path.len() + 16);
    aad.extend_from_slice(b"qflare v1 record");
    aad.extend_from_slice(session.as_bytes());
    aad.push(direction.tag());
    aad.extend_from_slice(&seq.to_be_bytes());
    aad.extend_from_slice(&(method.len() as u16).to_be_bytes());
    aad.extend_from_slice(method.as_bytes());
    aad.extend_from_slice(&(path.len() as u32).to_be_bytes());
    aad.extend_from_slice(path.as_bytes());
    aad
}

/// One direction's sealing and opening, without any sequence bookkeeping.
pub struct RecordKey {
    session: SessionId,
    direction: Direction,
    key: AeadKey,
}

impl RecordKey {
    fn new(
        session: SessionId,
        direction: Direction,
        key: &SecretBytes,
        iv: &SecretBytes,
    ) -> Result<Self> {
        Ok(Self {
            session,
            direction,
            key: AeadKey::new(key, iv)?,
        })
    }

    /// Seals `buffer` (the plaintext) in place into a record with sequence `seq`.
    pub fn seal(&self, seq: u64, method: &str, path: &str, buffer: &mut Vec<u8>) -> Result<()> {
        let aad = associated_data(&self.session, self.direction, seq, method, path);
        self.key.seal_in_place(seq, &aad, buffer)?;
        buffer.extend_from_slice(&seq.to_be_bytes());
        Ok(())
    }

    /// Reads the sequence number of a record without opening it.
    pub fn sequence_of(record: &[u8]) -> Result<u64> {
        if record.len() < RECORD_OVERHEAD {
            return Err(ProtocolError::malformed(
                "sealed record",
                "shorter than its overhead",
            ));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&record[record.len() - 8..]);
        Ok(u64::from_be_bytes(seq))
    }

    /// Opens `record` in place, leaving the plaintext; returns its sequence number.
    /// Sequence policy is the caller's.
    pub fn open(&self, method: &str, path: &str, record: &mut Vec<u8>) -> Result<u64> {
        let seq = Self::sequence_of(record)?;
        record.truncate(record.len() - 8);
        let aad = associated_data(&self.session, self.direction, seq, method, path);
        self.key.open_in_place(seq, &aad, record, "sealed record")?;
        Ok(seq)
    }
}

fn check_expiry(expires_at: u64, now: u64) -> Result<()> {
    if now >= expires_at {
        Err(ProtocolError::Expired { expires_at, now })
    } else {
        Ok(())
    }
}

/// The device's end: seals requests, opens the matching responses.
pub struct ClientChannel {
    session_id: SessionId,
    expires_at: u64,
    send: RecordKey,
    receive: RecordKey,
    last_sent: u64,
}

impl ClientChannel {
    pub(crate) fn new(
        session_id: SessionId,
        expires_at: u64,
        secrets: &SessionSecrets,
    ) -> Result<Self> {
        Ok(Self {
            session_id,
            expires_at,
            send: RecordKey::new(
                session_id,
                Direction::ClientToServer,
                &secrets.c2s_key,
                &secrets.c2s_iv,
            )?,
            receive: RecordKey::new(
                session_id,
                Direction::ServerToClient,
                &secrets.s2c_key,
                &secrets.s2c_iv,
            )?,
            last_sent: 0,
        })
    }

    /// Rebuilds the device's end from exported secrets (for example in a test
    /// harness, or a device that persists its session across a restart).
    ///
    /// `last_sent` is the highest sequence number this end already sealed
    /// under these keys (0 for a session never used). It is required, not
    /// defaulted: the sequence number is the AEAD nonce, and a restored
    /// channel that started again from 0 would seal two different requests
    /// under one nonce.
    pub fn from_secrets(
        session_id: SessionId,
        expires_at: u64,
        secrets: &SessionSecrets,
        last_sent: u64,
    ) -> Result<Self> {
        let mut channel = Self::new(session_id, expires_at, secrets)?;
        channel.last_sent = last_sent;
        Ok(channel)
    }

    /// The highest sequence number sealed so far: what to persist with the
    /// secrets, and to pass back to [`Self::from_secrets`].
    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// The session's id (sent in the clear so the server can find its keys).
    pub fn session_id(&self) -> SessionId {
        self.session_id
    }

    /// When the session dies.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// Seals a request body in place; returns the sequence number to expect back.
    pub fn seal_request(
        &mut self,
        method: &str,
        path: &str,
        body: &mut Vec<u8>,
        now: u64,
    ) -> Result<u64> {
        check_expiry(self.expires_at, now)?;
        let seq = self
            .last_sent
            .checked_add(1)
            .ok_or(ProtocolError::SequenceExhausted)?;
        self.send.seal(seq, method, path, body)?;
        self.last_sent = seq;
        Ok(seq)
    }

    /// Opens the response to request `seq` in place.
    pub fn open_response(
        &self,
        seq: u64,
        method: &str,
        path: &str,
        record: &mut Vec<u8>,
    ) -> Result<()> {
        let received = RecordKey::sequence_of(record)?;
        if received != seq {
            return Err(ProtocolError::UnexpectedSequence {
                expected: seq,
                received,
            });
        }
        self.receive.open(method, path, record)?;
        Ok(())
    }
}

/// The server's end. Stateless about sequence numbers: the server keeps the
/// last accepted one in its (possibly shared) session store and passes it in.
pub struct ServerChannel {
    session_id: SessionId,
    expires_at: u64,
    receive: RecordKey,
    send: RecordKey,
}

impl ServerChannel {
    pub(crate) fn new(
        session_id: SessionId,
        expires_at: u64,
        secrets: &SessionSecrets,
    ) -> Result<Self> {
        Ok(Self {
            session_id,
            expires_at,
            receive: RecordKey::new(
                session_id,
                Direction::ClientToServer,
                &secrets.c2s_key,
                &secrets.c2s_iv,
            )?,
            send: RecordKey::new(
                session_id,
                Direction::ServerToClient,
                &secrets.s2c_key,
                &secrets.s2c_iv,
            )?,
        })
    }

    /// Rebuilds the server's end from stored secrets.
    pub fn from_secrets(
        session_id: SessionId,
        expires_at: u64,
        secrets: &SessionSecrets,
    ) -> Result<Self> {
        Self::new(session_id, expires_at, secrets)
    }

    /// The session's id.
    pub fn session_id(&self) -> SessionId {
        self.session_id
    }

    /// Opens a request in place. `last_accepted` is the highest sequence number
    /// accepted so far in this session (0 before the first). The caller must
    /// then record the returned number atomically, refusing if another request
    /// claimed it first.
    pub fn open_request(
        &self,
        method: &str,
        path: &str,
        record: &mut Vec<u8>,
        last_accepted: u64,
        now: u64,
    ) -> Result<u64> {
        check_expiry(self.expires_at, now)?;
        let received = RecordKey::sequence_of(record)?;
        if received <= last_accepted {
            return Err(ProtocolError::Replay {
                last_accepted,
                received,
            });
        }
        self.receive.open(method, path, record)
    }

    /// Seals the response to request `seq` in place.
    pub fn seal_response(
        &self,
        seq: u64,
        method: &str,
        path: &str,
        body: &mut Vec<u8>,
    ) -> Result<()> {
        self.send.seal(seq, method, path, body)
    }
}
