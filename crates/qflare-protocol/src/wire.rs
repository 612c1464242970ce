//! Wire encoding: JSON with base64url (unpadded) for bytes, size checked first.
//!
//! Every message type is `deny_unknown_fields` and every decoder takes a byte
//! limit that is enforced *before* the parser sees a byte, so an oversized
//! body costs nothing but the comparison.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ProtocolError, Result};

/// Size limits for each message, in bytes of encoded JSON.
pub mod limits {
    /// An enrollment request (the largest keys are FrodoKEM-976's 15,632 bytes).
    pub const ENROLL_REQUEST: usize = 64 * 1024;
    /// An enrollment response.
    pub const ENROLL_RESPONSE: usize = 32 * 1024;
    /// `GET /v1/server-info`: suites, the key, and up to
    /// `handover::MAX_CHAIN` key hand-overs (about 20 KiB each at ML-DSA-87).
    pub const SERVER_INFO: usize = 2 * 1024 * 1024;
    /// A client hello.
    pub const CLIENT_HELLO: usize = 64 * 1024;
    /// A server hello (two FrodoKEM-976 ciphertexts plus a signature).
    pub const SERVER_HELLO: usize = 64 * 1024;
    /// A client confirmation.
    pub const CLIENT_CONFIRM: usize = 16 * 1024;
    /// The largest model (its safetensors bytes) any part accepts: the
    /// ceiling under every size derived from a federation's model.
    pub const MAX_MODEL_BYTES: usize = 1 << 30;
    /// What an update envelope holds besides its update: in the sealed
    /// payload the example count, inner signature and AEAD tag; the KEM
    /// ciphertext and outer signature (FrodoKEM-976's 15,744 bytes and
    /// ML-DSA-87's 4,627 are the largest), base64; the JSON around them.
    const ENVELOPE_FIXED: usize = 64 * 1024;
    /// The largest update envelope (its JSON) for a model whose safetensors
    /// encoding is `model_bytes` long. An update has its model's layout, so
    /// its canonical encoding is exactly as long; base64 adds a third.
    pub const fn update_envelope_for(model_bytes: usize) -> usize {
        model_bytes
            .saturating_add(ENVELOPE_FIXED)
            .div_ceil(3)
            .saturating_mul(4)
            .saturating_add(ENVELOPE_FIXED)
    }
    /// A sealed session record carrying a message of `message` bytes.
    pub const fn sealed_record_for(message: usize) -> usize {
        message.saturating_add(1024)
    }
    /// The largest update envelope of all: one for a model of [`MAX_MODEL_BYTES`].
    /// Each part applies the smaller limit derived from the actual model.
    pub const UPDATE_ENVELOPE: usize = update_envelope_for(MAX_MODEL_BYTES);
    /// An attestation report.
    pub const ATTESTATION_REPORT: usize = 64 * 1024;
    /// A global-model certificate.
    pub const MODEL_CERTIFICATE: usize = 16 * 1024;
    /// The largest sealed session record (the largest envelope plus record overhead).
    pub const SEALED_RECORD: usize = sealed_record_for(UPDATE_ENVELOPE);
    /// A model or update in safetensors form.
    pub const TENSORS: usize = MAX_MODEL_BYTES;
}

/// Decodes a JSON message, refusing anything over `limit` bytes before parsing.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8], limit: usize) -> Result<T> {
    if bytes.len() > limit {
        return Err(ProtocolError::TooLarge {
            what,
            limit,
            actual: bytes.len(),
        });
    }
    serde_json::from_slice(bytes).map_err(|err| {
        // serde_json's messages name the field and position, never the data.
        ProtocolError::malformed(what, err.to_string())
    })
}

/// Encodes a message as JSON.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(message).map_err(|_| ProtocolError::Backend("json encode"))
}

/// Serde adapter: `Vec<u8>` as unpadded base64url.
pub mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes bytes as base64url.
    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Deserializes base64url into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        URL_SAFE_NO_PAD
            .decode(text.as_bytes())
            .map_err(|_| serde::de::Error::custom("invalid base64url"))
    }
}

/// Serde adapter: fixed-size arrays as unpadded base64url.
pub mod b64_array {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes a byte array as base64url.
    pub fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Deserializes base64url into a byte array of exactly `N` bytes.
    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(text.as_bytes())
            .map_err(|_| serde::de::Error::custom("invalid base64url"))?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom(format!("expected {N} bytes")))
    }
}

/// Serde adapter: fixed-size arrays as lowercase hex (digests, measurements).
pub mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes a byte array as lowercase hex.
    pub fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(bytes))
    }

    /// Deserializes exactly `N` bytes of hex.
    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        let mut out = [0u8; N];
        hex::decode_to_slice(text.as_bytes(), &mut out)
            .map_err(|_| serde::de::Error::custom(format!("expected {} hex characters", 2 * N)))?;
        Ok(out)
    }
}

/// Encodes bytes as unpadded base64url (tokens, ids in URLs).
pub fn to_base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes unpadded base64url.
pub fn from_base64url(what: &'static str, text: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.as_bytes())
        .map_err(|_| ProtocolError::malformed(what, "invalid base64url"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Probe {
        #[serde(with = "b64")]
        data: Vec<u8>,
        #[serde(with = "b64_array")]
        nonce: [u8; 4],
    }

    #[test]
    fn round_trip_and_limits() {
        let probe = Probe {
            data: vec![0xff, 0xfe, 0x00],
            nonce: [1, 2, 3, 4],
        };
        let bytes = encode(&probe).unwrap();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"data":"__4A","nonce":"AQIDBA"}"#
        );
        assert_eq!(decode::<Probe>("probe", &bytes, 1024).unwrap(), probe);
        assert!(matches!(
            decode::<Probe>("probe", &bytes, 8),
            Err(ProtocolError::TooLarge { limit: 8, .. })
        ));
        for bad in [
            &br#"{"data":"__4A","nonce":"AQIDBA","extra":1}"#[..],
            br#"{"data":"__4A"}"#,
            br#"{"data":"!!","nonce":"AQIDBA"}"#,
            br#"{"data":"__4A","nonce":"AQID"}"#,
            br#"{"data":"__4A","nonce":"AQIDBA""#,
            b"\xff\xfe",
        ] {
            assert!(matches!(
                decode::<Probe>("probe", bad, 1024),
                Err(ProtocolError::Malformed { .. })
            ));
        }
    }
}
