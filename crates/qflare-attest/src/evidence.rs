//! The evidence each TEE produces, with what a verifier needs beside it, in
//! one self-describing JSON encoding: `{"kind": "sev-snp" | "tdx" | "nitro",
//! ...}` with binary fields as unpadded base64url (as every QFLARE wire
//! type). These bytes are what an attestation report's `evidence` field
//! carries and what `qflare attest verify` reads; their SHA-384 is what
//! model certificates and the ledger record.
//!
//! What travels with each kind, and why it need not be trusted:
//! - SEV-SNP: the 1,184-byte report and the chip's VCEK certificate (from the
//!   extended report's certificate table or the operator). The VCEK must
//!   chain to an AMD root built into the verifier.
//! - TDX: the quote (which holds its PCK certificate chain) and the
//!   collateral (TCB info, QE identity, CRLs, their issuer chains), all
//!   signed by Intel and checked against Intel's root built into `dcap-qvl`.
//! - Nitro: the COSE_Sign1 document, which holds its own certificate chain;
//!   its root must match the pinned AWS Nitro root.

use serde::{Deserialize, Serialize};

use crate::error::{AttestError, Result};
use crate::{MEASUREMENT_LEN, REPORT_DATA_LEN, nitro, sev_snp, tdx};

/// The kinds of hardware TEE whose evidence QFLARE verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeeKind {
    /// AMD SEV-SNP confidential VM.
    SevSnp,
    /// Intel TDX trust domain.
    Tdx,
    /// AWS Nitro Enclave.
    Nitro,
}

impl TeeKind {
    /// Every kind, in a fixed order.
    pub const ALL: [Self; 3] = [Self::SevSnp, Self::Tdx, Self::Nitro];

    /// The wire and configuration identifier.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SevSnp => "sev-snp",
            Self::Tdx => "tdx",
            Self::Nitro => "nitro",
        }
    }
}

impl std::fmt::Display for TeeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TeeKind {
    type Err = AttestError;
    fn from_str(text: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| {
                AttestError::malformed(
                    "TEE kind",
                    format!("{text:?} is not one of sev-snp, tdx, nitro"),
                )
            })
    }
}

/// AMD SEV-SNP evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevSnpEvidence {
    /// The attestation report as the firmware returned it (1,184 bytes).
    #[serde(with = "b64")]
    pub report: Vec<u8>,
    /// The VCEK certificate (DER) of the chip and TCB that signed it.
    #[serde(with = "b64")]
    pub vcek: Vec<u8>,
}

/// Intel TDX evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TdxEvidence {
    /// The DCAP quote (version 4 or 5) as the quoting enclave produced it.
    #[serde(with = "b64")]
    pub quote: Vec<u8>,
    /// Intel's collateral for the quote's platform, as a PCCS serves it.
    pub collateral: Box<dcap_qvl::QuoteCollateralV3>,
}

/// AWS Nitro Enclaves evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NitroEvidence {
    /// The attestation document (COSE_Sign1, CBOR) from the Nitro Secure Module.
    #[serde(with = "b64")]
    pub document: Vec<u8>,
}

/// Evidence of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Evidence {
    /// See [`SevSnpEvidence`].
    SevSnp(SevSnpEvidence),
    /// See [`TdxEvidence`].
    Tdx(TdxEvidence),
    /// See [`NitroEvidence`].
    Nitro(NitroEvidence),
}

impl Evidence {
    /// Which TEE this evidence is from.
    pub const fn kind(&self) -> TeeKind {
        match self {
            Self::SevSnp(_) => TeeKind::SevSnp,
            Self::Tdx(_) => TeeKind::Tdx,
            Self::Nitro(_) => TeeKind::Nitro,
        }
    }

    /// The encoding carried in reports and files.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain structs of bytes and strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses [`Evidence::to_bytes`] output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| AttestError::malformed("evidence", e))
    }

    /// The report data the evidence *claims*, read without checking any
    /// signature: only to compare with the expected commitment before
    /// anything else (see [`crate::verify`]).
    pub fn claimed_report_data(&self) -> Result<[u8; REPORT_DATA_LEN]> {
        match self {
            Self::SevSnp(snp) => sev_snp::claimed_report_data(&snp.report),
            Self::Tdx(tdx) => tdx::claimed_report_data(&tdx.quote),
            Self::Nitro(nitro) => nitro::claimed_report_data(&nitro.document),
        }
    }

    /// The launch measurement the evidence *claims* (SEV-SNP `MEASUREMENT`,
    /// TDX `MRTD`, Nitro `PCR0`), unverified: an enclave copies it into its
    /// own report, and verifiers hold that copy to the signed value.
    pub fn claimed_measurement(&self) -> Result<[u8; MEASUREMENT_LEN]> {
        match self {
            Self::SevSnp(snp) => sev_snp::claimed_measurement(&snp.report),
            Self::Tdx(tdx) => tdx::claimed_measurement(&tdx.quote),
            Self::Nitro(nitro) => nitro::claimed_measurement(&nitro.document),
        }
    }
}

/// Serde adapter: bytes as unpadded base64url, the encoding of every binary
/// field on QFLARE's wire.
pub(crate) mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&URL_SAFE_NO_PAD.encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        URL_SAFE_NO_PAD
            .decode(text.as_bytes())
            .map_err(|_| serde::de::Error::custom("invalid base64url"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_round_trips_and_refuses_unknown_kinds_and_fields() {
        let evidence = Evidence::Nitro(NitroEvidence {
            document: vec![1, 2, 3],
        });
        let bytes = evidence.to_bytes();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"kind":"nitro","document":"AQID"}"#
        );
        assert_eq!(Evidence::from_bytes(&bytes).unwrap(), evidence);
        for bad in [
            r#"{"kind":"sgx","document":"AQID"}"#,
            r#"{"kind":"nitro","document":"AQID","extra":1}"#,
            r#"{"kind":"nitro","document":"not base64!"}"#,
            r#"{"document":"AQID"}"#,
        ] {
            assert!(
                matches!(
                    Evidence::from_bytes(bad.as_bytes()),
                    Err(AttestError::Malformed { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn kinds_parse_from_their_names() {
        for kind in TeeKind::ALL {
            assert_eq!(kind.as_str().parse::<TeeKind>().unwrap(), kind);
        }
        assert!("software".parse::<TeeKind>().is_err());
    }
}
