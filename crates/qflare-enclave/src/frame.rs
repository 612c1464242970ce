//! The enclave's wire: length-prefixed binary frames over its stdin and stdout.
//!
//! ```text
//! frame  = "QFLE" | version u8 (=1) | kind u8 | flags u16 (=0) | body_len u32 BE | body
//! body   = meta_len u32 BE | meta (JSON object) | blob_count u32 BE | (blob_len u64 BE | blob)*
//! ```
//!
//! Metadata is small structured JSON (`deny_unknown_fields` on every
//! message); models and envelopes travel as raw blobs, so a 6.65 MB model is
//! not inflated by base64. Every size is checked before anything is
//! allocated, and every way a frame can be malformed is a [`FrameError`],
//! which the enclave answers with an [`Kind::Error`] frame instead of dying.
//! The codec is pure (it works on byte slices and `Read`/`Write`), so it is
//! fuzzed directly.

use std::io::{Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"QFLE";
/// The frame protocol version.
pub const VERSION: u8 = 1;
/// Header size.
pub const HEADER_LEN: usize = 12;
/// Largest body accepted (a CNN model plus a previous model plus headroom).
pub const MAX_BODY: usize = 3 * qflare_protocol::wire::limits::MAX_MODEL_BYTES;
/// Most devices one round may select: `BeginRound` names each with its
/// verifying key in the metadata.
pub const MAX_ROUND_DEVICES: usize = 16_384;
/// Largest metadata object: a `BeginRound` of [`MAX_ROUND_DEVICES`] devices,
/// each entry at most about 3.6 KB (an ML-DSA-87 key in base64 with its id
/// and suite), with room to spare. It was 1 MiB, which a round of about 300
/// ML-DSA-65 devices already overflowed.
pub const MAX_META: usize = MAX_ROUND_DEVICES * 4096;
/// Most blobs in one frame.
pub const MAX_BLOBS: usize = 8;

/// One blob of an encoded frame: its big-endian length prefix and its bytes.
pub type BlobPart<'a> = ([u8; 8], &'a [u8]);

/// Frame kinds. Requests go host → enclave, answers enclave → host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Request: an attestation report for a nonce.
    Attest = 0x01,
    /// Request: create and certify the initial model.
    InitModel = 0x02,
    /// Request: re-certify the current model after an enclave restart.
    Certify = 0x03,
    /// Request: start aggregating a round.
    BeginRound = 0x04,
    /// Request: one device's sealed update.
    Submit = 0x05,
    /// Request: aggregate, sign the new model.
    Finalize = 0x06,
    /// Request: drop the current round.
    Abort = 0x07,
    /// Request: report the sandbox's state by trying forbidden operations.
    Probe = 0x08,
    /// Request: certify an admin-supplied initial model (a model of the
    /// admin's own, not one of the built-in architectures).
    ImportModel = 0x09,
    /// Answer to `Attest`.
    Report = 0x81,
    /// Answer to `InitModel`, `ImportModel` and `Certify` (a certified model).
    Model = 0x82,
    /// Answer to `BeginRound` and `Abort`.
    Ack = 0x84,
    /// Answer to `Submit`.
    Verdict = 0x85,
    /// Answer to `Finalize`: the round's outcome and, when aggregated, the new model.
    Outcome = 0x86,
    /// Answer to `Probe`.
    ProbeResult = 0x88,
    /// Any request that failed.
    Error = 0xff,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::Attest,
            0x02 => Self::InitModel,
            0x03 => Self::Certify,
            0x04 => Self::BeginRound,
            0x05 => Self::Submit,
            0x06 => Self::Finalize,
            0x07 => Self::Abort,
            0x08 => Self::Probe,
            0x09 => Self::ImportModel,
            0x81 => Self::Report,
            0x82 => Self::Model,
            0x84 => Self::Ack,
            0x85 => Self::Verdict,
            0x86 => Self::Outcome,
            0x88 => Self::ProbeResult,
            0xff => Self::Error,
            _ => return None,
        })
    }
}

/// Everything that can be wrong with a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly between frames.
    #[error("end of stream")]
    Closed,
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The header does not start with `QFLE`.
    #[error("bad magic")]
    BadMagic,
    /// Another protocol version.
    #[error("unsupported frame version {0}")]
    Version(u8),
    /// An unknown frame kind.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// Flags must be zero in version 1.
    #[error("reserved flags set")]
    Flags,
    /// The body is over [`MAX_BODY`].
    #[error("body of {0} bytes is over the limit")]
    TooLarge(u64),
    /// The body's internal lengths do not add up.
    #[error("malformed body: {0}")]
    Body(&'static str),
    /// The metadata is not the JSON this kind needs.
    #[error("malformed metadata: {0}")]
    Meta(String),
    /// The wrong number of blobs for this kind.
    #[error("expected {expected} blobs, got {got}")]
    Blobs {
        /// Required.
        expected: usize,
        /// Present.
        got: usize,
    },
}

impl FrameError {
    /// A stable code for the error frame.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Closed | Self::Io(_) => "io",
            Self::BadMagic | Self::Version(_) | Self::Flags => "bad_header",
            Self::UnknownKind(_) => "unknown_kind",
            Self::TooLarge(_) => "too_large",
            Self::Body(_) | Self::Blobs { .. } => "malformed_body",
            Self::Meta(_) => "malformed_metadata",
        }
    }
}

/// One frame.
#[derive(Clone, PartialEq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// JSON metadata.
    pub meta: Vec<u8>,
    /// Raw payloads.
    pub blobs: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Blob sizes only: blobs may be models or sealed updates.
        f.debug_struct("Frame")
            .field("kind", &self.kind)
            .field("meta_len", &self.meta.len())
            .field(
                "blob_lens",
                &self.blobs.iter().map(Vec::len).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Frame {
    /// A frame with `meta` serialized as JSON.
    pub fn new<M: Serialize>(kind: Kind, meta: &M, blobs: Vec<Vec<u8>>) -> Self {
        Self {
            kind,
            // Our own metadata types always serialize.
            meta: serde_json::to_vec(meta).unwrap_or_else(|_| b"{}".to_vec()),
            blobs,
        }
    }

    /// An error answer.
    pub fn error(code: &str, message: &str) -> Self {
        Self::new(
            Kind::Error,
            &ErrorMeta {
                code: code.to_owned(),
                message: message.to_owned(),
            },
            Vec::new(),
        )
    }

    /// The metadata decoded as `M`.
    pub fn meta<M: DeserializeOwned>(&self) -> Result<M, FrameError> {
        serde_json::from_slice(&self.meta).map_err(|e| FrameError::Meta(e.to_string()))
    }

    /// Checks the blob count.
    pub fn expect_blobs(&self, expected: usize) -> Result<(), FrameError> {
        if self.blobs.len() == expected {
            Ok(())
        } else {
            Err(FrameError::Blobs {
                expected,
                got: self.blobs.len(),
            })
        }
    }

    /// The encoded frame as pieces: the header, meta and blob count, then
    /// each blob's length prefix and the blob itself, borrowed. Writing the
    /// pieces in order writes the frame; a blob as large as a model is
    /// never copied to do so.
    pub fn encode_parts(&self) -> Result<(Vec<u8>, Vec<BlobPart<'_>>), FrameError> {
        let blob_bytes: usize = self.blobs.iter().map(|b| 8 + b.len()).sum();
        let body_len = 8 + self.meta.len() + blob_bytes;
        if body_len > MAX_BODY {
            return Err(FrameError::TooLarge(body_len as u64));
        }
        let mut head = Vec::with_capacity(HEADER_LEN + 8 + self.meta.len());
        head.extend_from_slice(&MAGIC);
        head.push(VERSION);
        head.push(self.kind as u8);
        head.extend_from_slice(&0u16.to_be_bytes());
        head.extend_from_slice(&(body_len as u32).to_be_bytes());
        head.extend_from_slice(&(self.meta.len() as u32).to_be_bytes());
        head.extend_from_slice(&self.meta);
        head.extend_from_slice(&(self.blobs.len() as u32).to_be_bytes());
        let blobs = self
            .blobs
            .iter()
            .map(|blob| ((blob.len() as u64).to_be_bytes(), blob.as_slice()))
            .collect();
        Ok((head, blobs))
    }

    /// Encodes the whole frame into one buffer.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let (head, blobs) = self.encode_parts()?;
        let total = head.len() + blobs.iter().map(|(_, b)| 8 + b.len()).sum::<usize>();
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&head);
        for (len, blob) in blobs {
            out.extend_from_slice(&len);
            out.extend_from_slice(blob);
        }
        Ok(out)
    }

    /// Writes the frame and flushes.
    pub fn write_to(&self, writer: &mut impl Write) -> Result<(), FrameError> {
        let (head, blobs) = self.encode_parts()?;
        writer.write_all(&head)?;
        for (len, blob) in blobs {
            writer.write_all(&len)?;
            writer.write_all(blob)?;
        }
        writer.flush()?;
        Ok(())
    }

    /// Decodes a body of a known kind.
    pub fn decode_body(kind: Kind, body: &[u8]) -> Result<Self, FrameError> {
        let mut rest = body;
        let meta_len = take_u32(&mut rest)? as usize;
        if meta_len > MAX_META {
            return Err(FrameError::Body("metadata over its limit"));
        }
        let meta = take(&mut rest, meta_len)?.to_vec();
        let count = take_u32(&mut rest)? as usize;
        if count > MAX_BLOBS {
            return Err(FrameError::Body("too many blobs"));
        }
        let mut blobs = Vec::with_capacity(count);
        for _ in 0..count {
            let len = take_u64(&mut rest)?;
            let len = usize::try_from(len).map_err(|_| FrameError::Body("blob length"))?;
            blobs.push(take(&mut rest, len)?.to_vec());
        }
        if !rest.is_empty() {
            return Err(FrameError::Body("trailing bytes"));
        }
        Ok(Self { kind, meta, blobs })
    }

    /// Decodes one whole frame from a byte slice (the fuzzing entry point).
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        if bytes.len() < HEADER_LEN {
            return Err(FrameError::Body("shorter than a header"));
        }
        let (header, body) = bytes.split_at(HEADER_LEN);
        let (kind, len) = parse_header(header)?;
        if body.len() != len {
            return Err(FrameError::Body("body length differs from the header"));
        }
        Self::decode_body(kind?, body)
    }
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], FrameError> {
    if rest.len() < n {
        return Err(FrameError::Body("truncated"));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_u32(rest: &mut &[u8]) -> Result<u32, FrameError> {
    let b = take(rest, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn take_u64(rest: &mut &[u8]) -> Result<u64, FrameError> {
    let b = take(rest, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_be_bytes(a))
}

/// Parses a header: the kind (or why it is unusable) and the body length.
/// The length is returned even when the kind is bad, so the reader can skip
/// the body and stay in step.
pub fn parse_header(header: &[u8]) -> Result<(Result<Kind, FrameError>, usize), FrameError> {
    if header[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if len > MAX_BODY {
        return Err(FrameError::TooLarge(len as u64));
    }
    let kind = if header[4] != VERSION {
        Err(FrameError::Version(header[4]))
    } else if header[6] != 0 || header[7] != 0 {
        Err(FrameError::Flags)
    } else {
        Kind::from_byte(header[5]).ok_or(FrameError::UnknownKind(header[5]))
    };
    Ok((kind, len))
}

/// Reads frames from a stream, staying in step after recoverable errors.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    /// Wraps a stream.
    pub fn new(inner: R) -> Self {
        Self { inner }
    }

    /// Reads the next frame.
    ///
    /// A bad version, flags or kind, or a malformed body, is an error but the
    /// stream stays aligned (the body was consumed). A bad magic or an
    /// oversized length leaves the stream unaligned; the caller answers with
    /// an error and should stop, as there is no trustworthy next frame.
    pub fn read(&mut self) -> Result<Frame, FrameError> {
        let mut header = [0u8; HEADER_LEN];
        match self.inner.read_exact(&mut header[..1]) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Closed);
            }
            Err(err) => return Err(err.into()),
        }
        self.inner.read_exact(&mut header[1..])?;
        let (kind, len) = parse_header(&header)?;
        let mut body = vec![0u8; len];
        self.inner.read_exact(&mut body)?;
        Frame::decode_body(kind?, &body)
    }
}

/// True when the stream is still aligned after `error` (see [`FrameReader::read`]).
pub fn stream_still_aligned(error: &FrameError) -> bool {
    !matches!(
        error,
        FrameError::Closed | FrameError::Io(_) | FrameError::BadMagic | FrameError::TooLarge(_)
    )
}

/// The metadata of an error frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorMeta {
    /// Stable code.
    pub code: String,
    /// Human-readable; never contains update contents or keys.
    pub message: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_stream() {
        let frame = Frame::new(
            Kind::Submit,
            &serde_json::json!({"device_id": "ab"}),
            vec![vec![1, 2, 3], vec![]],
        );
        let bytes = frame.encode().unwrap();
        assert_eq!(Frame::decode(&bytes).unwrap(), frame);
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        let mut reader = FrameReader::new(&two[..]);
        assert_eq!(reader.read().unwrap(), frame);
        assert_eq!(reader.read().unwrap(), frame);
        assert!(matches!(reader.read(), Err(FrameError::Closed)));
    }

    #[test]
    fn a_begin_round_of_the_most_devices_with_the_largest_keys_fits() {
        use crate::messages::{BeginRoundRequest, RoundDevice};
        use qflare_protocol::SignatureSuite;
        let device = RoundDevice {
            device_id: qflare_protocol::identity::DeviceId::from_bytes([7; 16]),
            signature_suite: SignatureSuite::MlDsa87,
            verifying_key: vec![0xA5; 2592],
        };
        let request = BeginRoundRequest {
            round_id: 1,
            model_version: 0,
            architecture: "mnist-2nn".into(),
            config: crate::AggregationConfig::default(),
            update_encoding: Default::default(),
            devices: vec![device; MAX_ROUND_DEVICES],
            reference_training: None,
            expected_participants: None,
        };
        let frame = Frame::new(Kind::BeginRound, &request, vec![vec![0; 16]]);
        let decoded = Frame::decode(&frame.encode().unwrap()).unwrap();
        let back: BeginRoundRequest = decoded.meta().unwrap();
        assert_eq!(back.devices.len(), MAX_ROUND_DEVICES);
    }

    #[test]
    fn every_malformation_is_typed() {
        let good = Frame::new(Kind::Attest, &serde_json::json!({}), vec![])
            .encode()
            .unwrap();
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(Frame::decode(&magic), Err(FrameError::BadMagic)));
        let mut version = good.clone();
        version[4] = 2;
        assert!(matches!(
            Frame::decode(&version),
            Err(FrameError::Version(2))
        ));
        let mut kind = good.clone();
        kind[5] = 0x42;
        assert!(matches!(
            Frame::decode(&kind),
            Err(FrameError::UnknownKind(0x42))
        ));
        let mut flags = good.clone();
        flags[7] = 1;
        assert!(matches!(Frame::decode(&flags), Err(FrameError::Flags)));
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Frame::decode(&huge), Err(FrameError::TooLarge(_))));
        assert!(matches!(
            Frame::decode(&good[..good.len() - 1]),
            Err(FrameError::Body(_))
        ));
        let mut blob_lie = Frame::new(Kind::Submit, &serde_json::json!({}), vec![vec![9; 4]])
            .encode()
            .unwrap();
        let n = blob_lie.len();
        blob_lie[n - 12..n - 4].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(Frame::decode(&blob_lie).is_err());

        // After a bad kind the reader is still in step.
        let mut stream = kind.clone();
        stream.extend_from_slice(&good);
        let mut reader = FrameReader::new(&stream[..]);
        let err = reader.read().unwrap_err();
        assert!(stream_still_aligned(&err));
        assert_eq!(reader.read().unwrap().kind, Kind::Attest);
    }
}
