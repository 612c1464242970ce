//! Suite identifiers: the stable strings used on the wire and in configuration.
//!
//! A suite is a *value*. Code above this module never branches on which
//! algorithm it holds; it asks the suite for sizes and hands it to
//! [`crate::kem`] or [`crate::sig`], which dispatch once, at the bottom.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{ProtocolError, Result};

/// A key-encapsulation mechanism.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KemSuite {
    /// ML-KEM-768 (FIPS 203, security category 3). The default.
    #[default]
    MlKem768,
    /// ML-KEM-1024 (FIPS 203, security category 5).
    MlKem1024,
    /// FrodoKEM-640-AES (the ISO/IEC 18033-2 amendment draft): conservative,
    /// plain-LWE, large keys.
    FrodoKem640Aes,
    /// FrodoKEM-976-AES: the category 3 FrodoKEM parameter set.
    FrodoKem976Aes,
    /// X-Wing: ML-KEM-768 combined with X25519 (draft-connolly-cfrg-xwing-kem),
    /// secure while either component holds.
    X25519MlKem768,
}

impl KemSuite {
    /// Every KEM suite, default first.
    pub const ALL: [Self; 5] = [
        Self::MlKem768,
        Self::MlKem1024,
        Self::FrodoKem640Aes,
        Self::FrodoKem976Aes,
        Self::X25519MlKem768,
    ];

    /// The wire and configuration identifier.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MlKem768 => "ml-kem-768",
            Self::MlKem1024 => "ml-kem-1024",
            Self::FrodoKem640Aes => "frodokem-640-aes",
            Self::FrodoKem976Aes => "frodokem-976-aes",
            Self::X25519MlKem768 => "x25519-ml-kem-768",
        }
    }

    /// Length of an encoded encapsulation (public) key.
    pub const fn encapsulation_key_len(self) -> usize {
        match self {
            Self::MlKem768 => 1184,
            Self::MlKem1024 => 1568,
            Self::FrodoKem640Aes => 9616,
            Self::FrodoKem976Aes => 15632,
            Self::X25519MlKem768 => 1184 + 32,
        }
    }

    /// Length of a ciphertext. FrodoKEM's includes its 32- or 48-byte salt
    /// (the salted FO transform of the ISO submission).
    pub const fn ciphertext_len(self) -> usize {
        match self {
            Self::MlKem768 => 1088,
            Self::MlKem1024 => 1568,
            Self::FrodoKem640Aes => 9752,
            Self::FrodoKem976Aes => 15792,
            Self::X25519MlKem768 => 1088 + 32,
        }
    }

    /// Length of the shared secret the KEM outputs.
    pub const fn shared_secret_len(self) -> usize {
        match self {
            Self::FrodoKem640Aes => 16,
            Self::FrodoKem976Aes => 24,
            Self::MlKem768 | Self::MlKem1024 | Self::X25519MlKem768 => 32,
        }
    }
}

/// A signature scheme.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SignatureSuite {
    /// ML-DSA-65 (FIPS 204, security category 3). The default.
    #[default]
    MlDsa65,
    /// ML-DSA-87 (FIPS 204, security category 5).
    MlDsa87,
}

impl SignatureSuite {
    /// Every signature suite, default first.
    pub const ALL: [Self; 2] = [Self::MlDsa65, Self::MlDsa87];

    /// The wire and configuration identifier.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MlDsa65 => "ml-dsa-65",
            Self::MlDsa87 => "ml-dsa-87",
        }
    }

    /// Length of an encoded verifying (public) key.
    pub const fn verifying_key_len(self) -> usize {
        match self {
            Self::MlDsa65 => 1952,
            Self::MlDsa87 => 2592,
        }
    }

    /// Length of a signature.
    pub const fn signature_len(self) -> usize {
        match self {
            Self::MlDsa65 => 3309,
            Self::MlDsa87 => 4627,
        }
    }
}

fn truncated(name: &str) -> String {
    name.chars().take(64).collect()
}

impl FromStr for KemSuite {
    type Err = ProtocolError;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|suite| suite.as_str() == name)
            .ok_or_else(|| ProtocolError::UnknownSuite {
                kind: "kem",
                name: truncated(name),
            })
    }
}

impl FromStr for SignatureSuite {
    type Err = ProtocolError;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|suite| suite.as_str() == name)
            .ok_or_else(|| ProtocolError::UnknownSuite {
                kind: "signature",
                name: truncated(name),
            })
    }
}

macro_rules! string_serde {
    ($suite:ty) => {
        impl fmt::Display for $suite {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $suite {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $suite {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_serde!(KemSuite);
string_serde!(SignatureSuite);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_round_trip_and_unknown_is_typed() {
        for suite in KemSuite::ALL {
            assert_eq!(suite.as_str().parse::<KemSuite>(), Ok(suite));
            let json = serde_json::to_string(&suite).unwrap();
            assert_eq!(serde_json::from_str::<KemSuite>(&json).unwrap(), suite);
        }
        for suite in SignatureSuite::ALL {
            assert_eq!(suite.as_str().parse::<SignatureSuite>(), Ok(suite));
        }
        assert!(matches!(
            "kyber-768".parse::<KemSuite>(),
            Err(ProtocolError::UnknownSuite { kind: "kem", .. })
        ));
        assert!(matches!(
            "ed25519".parse::<SignatureSuite>(),
            Err(ProtocolError::UnknownSuite {
                kind: "signature",
                ..
            })
        ));
        assert!(serde_json::from_str::<KemSuite>("\"ML-KEM-768\"").is_err());
    }

    #[test]
    fn defaults_are_the_category_3_suites() {
        assert_eq!(KemSuite::default(), KemSuite::MlKem768);
        assert_eq!(SignatureSuite::default(), SignatureSuite::MlDsa65);
    }
}
