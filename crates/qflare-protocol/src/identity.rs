//! Identities: device ids, session ids, enrollment tokens, the server
//! fingerprint a device pins, and the key bundle a device keeps.

use std::fmt;

use rand_core::CryptoRng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{ProtocolError, Result};
use crate::kem::{KemKeyPair, KemPublicKey};
use crate::secret::{SecretBytes, ct_eq};
use crate::sig::{SigningKey, VerifyingKey};
use crate::suite::{KemSuite, SignatureSuite};
use crate::transcript::{Domain, Transcript};
use crate::wire;

/// Bytes in an enrollment token (256 bits).
pub const TOKEN_LEN: usize = 32;
/// Bytes in a device id.
pub const DEVICE_ID_LEN: usize = 16;
/// Bytes in a session id.
pub const SESSION_ID_LEN: usize = 16;

fn parse_hex_id<const N: usize>(what: &'static str, text: &str) -> Result<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(ProtocolError::malformed(
            what,
            format!("expected {} lowercase hex characters", 2 * N),
        ));
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).map_err(|_| ProtocolError::malformed(what, "bad hex"))?;
    Ok(out)
}

macro_rules! hex_id {
    ($name:ident, $len:expr, $what:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Draws a fresh random id.
            pub fn random<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
                let mut bytes = [0u8; $len];
                rng.fill_bytes(&mut bytes);
                Self(bytes)
            }

            /// Wraps raw id bytes.
            pub const fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            /// Parses the lowercase-hex text form.
            pub fn parse(text: &str) -> Result<Self> {
                parse_hex_id::<$len>($what, text).map(Self)
            }

            /// The raw id bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// The lowercase-hex text form.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl std::str::FromStr for $name {
            type Err = ProtocolError;
            fn from_str(text: &str) -> Result<Self> {
                Self::parse(text)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(
    DeviceId,
    DEVICE_ID_LEN,
    "device id",
    "A device's id: 128 random bits chosen by the server at enrollment, 32 hex characters."
);
hex_id!(
    SessionId,
    SESSION_ID_LEN,
    "session id",
    "A session's id: 128 random bits chosen by the server, 32 hex characters."
);

/// A single-use enrollment token: 256 random bits, shown once as base64url.
///
/// The server keeps only [`EnrollmentToken::hash`].
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken(SecretBytes);

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollmentToken([REDACTED])")
    }
}

impl EnrollmentToken {
    /// Draws a fresh token.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = vec![0u8; TOKEN_LEN];
        rng.fill_bytes(&mut bytes);
        Self(SecretBytes::new(bytes))
    }

    /// Parses the base64url text form; anything but exactly 256 bits is refused.
    pub fn parse(text: &str) -> Result<Self> {
        if text.len() != 43 {
            return Err(ProtocolError::malformed(
                "enrollment token",
                "expected 43 base64url characters",
            ));
        }
        let bytes = SecretBytes::new(wire::from_base64url("enrollment token", text)?);
        if bytes.len() != TOKEN_LEN {
            return Err(ProtocolError::malformed(
                "enrollment token",
                "expected 256 bits",
            ));
        }
        Ok(Self(bytes))
    }

    /// The base64url text to hand to the device operator. Show it once.
    pub fn reveal(&self) -> String {
        wire::to_base64url(self.0.expose())
    }

    /// The value the server stores and looks tokens up by.
    pub fn hash(&self) -> TokenHash {
        let mut transcript = Transcript::new(Domain::TokenHash);
        transcript.append("token", self.0.expose());
        TokenHash(hex::encode(transcript.hash().as_bytes()))
    }
}

/// The stored, one-way hash of an enrollment token (hex).
///
/// A lookup by this hash reveals nothing useful through timing: an attacker
/// cannot choose inputs that hash near a stored value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenHash(pub String);

/// Length of a server fingerprint.
pub const FINGERPRINT_LEN: usize = 32;

/// What a device pins for a server: one value covering both the TLS
/// certificate and the server's ML-DSA key, printed as 64 hex characters.
///
/// It is the SHA-384 transcript of (certificate DER, signature suite,
/// verifying key) truncated to 256 bits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ServerFingerprint([u8; FINGERPRINT_LEN]);

impl ServerFingerprint {
    /// Computes the fingerprint of a certificate and server key.
    pub fn compute(certificate_der: &[u8], server_key: &VerifyingKey) -> Self {
        let mut transcript = Transcript::new(Domain::ServerFingerprint);
        transcript
            .append("tls_certificate", certificate_der)
            .append("signature_suite", server_key.suite().as_str().as_bytes())
            .append("server_key", server_key.as_bytes());
        let mut out = [0u8; FINGERPRINT_LEN];
        out.copy_from_slice(&transcript.hash().as_bytes()[..FINGERPRINT_LEN]);
        Self(out)
    }

    /// Parses 64 hex characters (either case; spaces and colons ignored).
    pub fn parse(text: &str) -> Result<Self> {
        let cleaned: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        parse_hex_id::<FINGERPRINT_LEN>("server fingerprint", &cleaned).map(Self)
    }

    /// Constant-time comparison.
    pub fn matches(&self, other: &Self) -> bool {
        ct_eq(&self.0, &other.0)
    }

    /// Checks a certificate and key against this pin.
    pub fn verify(&self, certificate_der: &[u8], server_key: &VerifyingKey) -> Result<()> {
        if self.matches(&Self::compute(certificate_der, server_key)) {
            Ok(())
        } else {
            Err(ProtocolError::PinMismatch)
        }
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; FINGERPRINT_LEN] {
        &self.0
    }
}

impl fmt::Display for ServerFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ServerFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerFingerprint({self})")
    }
}

/// The long-term keys a device generates at enrollment. Never leave the device.
#[derive(Debug)]
pub struct DeviceKeys {
    /// The device's KEM key pair: the server encapsulates session secrets to it.
    pub kem: KemKeyPair,
    /// The device's signing key: proofs of possession, confirmations, updates.
    pub signing: SigningKey,
}

impl DeviceKeys {
    /// Generates both key pairs.
    pub fn generate<R: CryptoRng + ?Sized>(
        kem_suite: KemSuite,
        signature_suite: SignatureSuite,
        rng: &mut R,
    ) -> Result<Self> {
        Ok(Self {
            kem: KemKeyPair::generate(kem_suite, rng)?,
            signing: SigningKey::generate(signature_suite, rng)?,
        })
    }
}

/// What the server knows of an enrolled device: its public keys.
#[derive(Debug, Clone)]
pub struct DevicePublicKeys {
    /// The registered KEM key.
    pub kem: KemPublicKey,
    /// The registered verifying key.
    pub verifying: VerifyingKey,
}

/// Checks a human-chosen device name: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn validate_device_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ProtocolError::malformed(
            "device name",
            "use 1 to 64 characters of A-Z a-z 0-9 . _ -",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ids_parse_strictly() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let id = DeviceId::random(&mut rng);
        assert_eq!(DeviceId::parse(&id.to_hex()).unwrap(), id);
        assert!(DeviceId::parse(&id.to_hex().to_uppercase()).is_err());
        assert!(DeviceId::parse(&id.to_hex()[1..]).is_err());
        assert!(DeviceId::parse("zz").is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<DeviceId>(&json).unwrap(), id);
    }

    #[test]
    fn tokens_round_trip_and_hash() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let token = EnrollmentToken::generate(&mut rng);
        let text = token.reveal();
        assert_eq!(text.len(), 43);
        let parsed = EnrollmentToken::parse(&text).unwrap();
        assert_eq!(parsed.hash(), token.hash());
        assert_ne!(EnrollmentToken::generate(&mut rng).hash(), token.hash());
        assert!(!format!("{token:?}").contains(&text));
        assert!(EnrollmentToken::parse(&text[1..]).is_err());
        assert!(EnrollmentToken::parse(&format!("{}=", &text[1..])).is_err());
    }

    #[test]
    fn fingerprint_covers_certificate_and_key() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let key = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
        let other = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
        let pin = ServerFingerprint::compute(b"cert", key.verifying_key());
        assert_eq!(pin.to_string().len(), 64);
        pin.verify(b"cert", key.verifying_key()).unwrap();
        assert_eq!(
            pin.verify(b"cert2", key.verifying_key()),
            Err(ProtocolError::PinMismatch)
        );
        assert_eq!(
            pin.verify(b"cert", other.verifying_key()),
            Err(ProtocolError::PinMismatch)
        );
        let spaced = pin
            .to_string()
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert!(ServerFingerprint::parse(&spaced).unwrap().matches(&pin));
    }

    #[test]
    fn device_names() {
        validate_device_name("edge-01.lab_A").unwrap();
        for bad in ["", "has space", "slash/", "ü", &"x".repeat(65)] {
            assert!(validate_device_name(bad).is_err(), "{bad:?}");
        }
    }
}
