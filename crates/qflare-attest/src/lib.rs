//! Offline verification of hardware TEE evidence: AMD SEV-SNP attestation
//! reports, Intel TDX quotes and AWS Nitro Enclaves attestation documents.
//!
//! An enclave running inside a TEE asks its hardware for *evidence*: a
//! structure signed by a key that only the vendor's silicon or firmware
//! holds, naming what was launched (its *measurement*) and carrying 64 bytes
//! of *report data* chosen by the enclave. QFLARE's enclave puts a
//! commitment to its per-boot keys, its runtime options and the verifier's
//! nonce there (`qflare-protocol` computes it), so the evidence vouches for
//! exactly those keys and cannot be replayed for others.
//!
//! This crate checks such evidence with no network access and with the
//! verification time as an argument (vendor certificates and collateral
//! expire). It owns:
//!
//! - [`Evidence`] (`evidence`): the self-describing encoding of each kind's
//!   evidence and what is needed to check it, as JSON;
//! - [`HardwarePolicy`] (`policy`): which kinds are accepted and, per kind,
//!   the measurement allow-lists and minimum security versions;
//! - one module per kind, each a parser plus a verifier: `sev_snp` (the
//!   `sev` crate's parsers and AMD roots, the report signature checked over
//!   its raw bytes), `tdx` (Phala's `dcap-qvl`, pure Rust, no network
//!   feature), `nitro` (COSE via `coset`, the chain via rustls' `webpki`);
//! - [`verify`], which ties them together in the order that matters: the
//!   report-data commitment first (so evidence for other keys is refused
//!   before anything else is believed), then the vendor's signatures and
//!   chain at the given time, then the policy.
//!
//! Nothing here does I/O or reads a clock; the enclave backends that obtain
//! evidence from the hardware live in `qflare-enclave`.

#![forbid(unsafe_code)]

mod error;
pub mod evidence;
pub mod fuzzing;
pub mod nitro;
pub mod policy;
pub mod sev_snp;
pub mod tdx;

pub use error::{AttestError, Result};
pub use evidence::{Evidence, NitroEvidence, SevSnpEvidence, TdxEvidence, TeeKind};
pub use policy::{
    Digest48, HardwarePolicy, NitroPolicy, SevSnpPolicy, SnpProduct, SnpTcbFloor, TdxPolicy,
};

use aws_lc_rs::digest;
use subtle::ConstantTimeEq;

/// Length of the report-data field every kind carries (SNP `REPORT_DATA`,
/// TDX `REPORTDATA`; QFLARE puts the same 64 bytes in Nitro's `user_data`).
pub const REPORT_DATA_LEN: usize = 64;

/// Length of a measurement: SNP `MEASUREMENT`, TDX `MRTD`, Nitro `PCR0`
/// are all SHA-384 sized.
pub const MEASUREMENT_LEN: usize = 48;

/// What verified evidence established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedEvidence {
    /// Which TEE produced it.
    pub kind: TeeKind,
    /// The launch measurement: SNP `MEASUREMENT`, TDX `MRTD`, Nitro `PCR0`.
    pub measurement: [u8; MEASUREMENT_LEN],
    /// The report data the hardware signed (already compared with the
    /// expected commitment).
    pub report_data: [u8; REPORT_DATA_LEN],
    /// SHA-384 of the encoded evidence, for certificates and the ledger.
    pub evidence_sha384: [u8; MEASUREMENT_LEN],
    /// The platform's security state in words (TCB versions or status).
    pub platform: String,
}

/// SHA-384 of encoded evidence: the value model certificates and ledger
/// entries carry.
pub fn evidence_sha384(encoded: &[u8]) -> [u8; MEASUREMENT_LEN] {
    let mut out = [0u8; MEASUREMENT_LEN];
    out.copy_from_slice(digest::digest(&digest::SHA384, encoded).as_ref());
    out
}

/// Verifies encoded evidence (as [`Evidence::to_bytes`] writes it) at
/// `now_unix` against `policy`, requiring its report data to equal
/// `expected_report_data`.
///
/// The order is deliberate. The commitment is compared first, from the
/// parsed but not yet verified structure, so evidence made for other keys or
/// another nonce is refused with [`AttestError::BindingMismatch`] whatever
/// else is wrong with it. Then the kind must be one the policy accepts, then
/// the vendor's signatures and certificate chain must hold at `now_unix`,
/// and only then are the signed values (measurements, security versions,
/// debug state) compared with the policy.
pub fn verify(
    encoded: &[u8],
    policy: &HardwarePolicy,
    expected_report_data: &[u8; REPORT_DATA_LEN],
    now_unix: u64,
) -> Result<VerifiedEvidence> {
    let evidence = Evidence::from_bytes(encoded)?;
    let claimed = evidence.claimed_report_data()?;
    if !bool::from(claimed.ct_eq(expected_report_data)) {
        return Err(AttestError::BindingMismatch);
    }
    let checked = check(&evidence, policy, now_unix)?;
    // The claimed report data was part of what the vendor's signature just
    // covered, so it is now the hardware's word.
    Ok(VerifiedEvidence {
        kind: evidence.kind(),
        measurement: checked.measurement,
        report_data: claimed,
        evidence_sha384: evidence_sha384(encoded),
        platform: checked.platform,
    })
}

/// The vendor's checks and the policy for `evidence`, without the report
/// data: for an auditor looking at evidence on its own. A verifier that
/// relies on the evidence for keys uses [`verify`].
pub fn check(evidence: &Evidence, policy: &HardwarePolicy, now_unix: u64) -> Result<Checked> {
    let kind = evidence.kind();
    Ok(match evidence {
        Evidence::SevSnp(snp) => {
            let rules = policy
                .sev_snp
                .as_ref()
                .ok_or(AttestError::KindNotAccepted(kind))?;
            sev_snp::verify(snp, rules, now_unix)?
        }
        Evidence::Tdx(tdx) => {
            let rules = policy
                .tdx
                .as_ref()
                .ok_or(AttestError::KindNotAccepted(kind))?;
            tdx::verify(tdx, rules, now_unix)?
        }
        Evidence::Nitro(nitro) => {
            let rules = policy
                .nitro
                .as_ref()
                .ok_or(AttestError::KindNotAccepted(kind))?;
            nitro::verify(nitro, rules, now_unix)?
        }
    })
}

/// What one kind's verifier returns; [`verify`] adds the kind, the report
/// data and the hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// See [`VerifiedEvidence::measurement`].
    pub measurement: [u8; MEASUREMENT_LEN],
    /// See [`VerifiedEvidence::platform`].
    pub platform: String,
}

/// The published evidence under `$QFLARE_VECTORS_DIR/attestation/` (see that
/// folder's README for provenance and known answers), for the tests beside
/// each verifier.
#[cfg(test)]
pub(crate) mod vectors {
    use std::path::PathBuf;

    /// The folder of one kind's files, or `None` (after saying why) when the
    /// vectors are absent and `QFLARE_REQUIRE_VECTORS` is not `1`.
    pub(crate) fn dir(test: &str, kind: &str) -> Option<PathBuf> {
        let required = std::env::var("QFLARE_REQUIRE_VECTORS").is_ok_and(|v| v == "1");
        let why = match std::env::var_os("QFLARE_VECTORS_DIR") {
            None => "QFLARE_VECTORS_DIR is not set".to_owned(),
            Some(root) => {
                let dir = PathBuf::from(root).join("attestation").join(kind);
                if dir.is_dir() {
                    return Some(dir);
                }
                format!("{} is not a directory", dir.display())
            }
        };
        assert!(!required, "{test}: QFLARE_REQUIRE_VECTORS=1 but {why}");
        eprintln!("SKIP {test}: {why}; set QFLARE_VECTORS_DIR to the folder holding attestation/");
        None
    }

    /// One file's bytes; a missing file in a present folder is a failure.
    pub(crate) fn read(dir: &std::path::Path, file: &str) -> Vec<u8> {
        let path = dir.join(file);
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }

    /// Unix seconds of an RFC 3339 time such as `2023-09-18T15:16:05Z`.
    pub(crate) fn unix(rfc3339: &str) -> u64 {
        let time = chrono::DateTime::parse_from_rfc3339(rfc3339).expect("an RFC 3339 time");
        u64::try_from(time.timestamp()).expect("after 1970")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milan(test: &str) -> Option<(Vec<u8>, [u8; REPORT_DATA_LEN], HardwarePolicy)> {
        let dir = vectors::dir(test, "sev-snp")?;
        let hex_text = String::from_utf8(vectors::read(&dir, "report_milan.hex")).unwrap();
        let report = hex::decode(hex_text.trim()).unwrap();
        let measurement: [u8; MEASUREMENT_LEN] = report[0x90..0xC0].try_into().unwrap();
        let report_data: [u8; REPORT_DATA_LEN] = report[0x50..0x90].try_into().unwrap();
        let evidence = Evidence::SevSnp(SevSnpEvidence {
            report,
            vcek: vectors::read(&dir, "vcek_milan.der"),
        });
        let policy = HardwarePolicy {
            sev_snp: Some(SevSnpPolicy::trusting(vec![Digest48(measurement)])),
            ..HardwarePolicy::default()
        };
        Some((evidence.to_bytes(), report_data, policy))
    }

    #[test]
    fn encoded_evidence_verifies_end_to_end_and_is_hashed() {
        let Some((encoded, report_data, policy)) = milan("encoded_evidence_verifies_end_to_end")
        else {
            return;
        };
        let now = vectors::unix("2025-06-01T00:00:00Z");
        let verified = verify(&encoded, &policy, &report_data, now).unwrap();
        assert_eq!(verified.kind, TeeKind::SevSnp);
        assert_eq!(verified.report_data, report_data);
        assert_eq!(verified.evidence_sha384, evidence_sha384(&encoded));
        assert_ne!(verified.evidence_sha384, [0; MEASUREMENT_LEN]);
    }

    #[test]
    fn the_commitment_is_checked_before_anything_else() {
        let Some((encoded, report_data, policy)) = milan("the_commitment_is_checked_first") else {
            return;
        };
        let now = vectors::unix("2025-06-01T00:00:00Z");
        let mut other = report_data;
        other[63] ^= 1;
        // Refused for the commitment even where everything else would fail
        // too: a policy without SNP, an expired time.
        for (policy, now) in [(&policy, now), (&HardwarePolicy::default(), 0)] {
            assert_eq!(
                verify(&encoded, policy, &other, now).unwrap_err(),
                AttestError::BindingMismatch
            );
        }
        // With the right commitment the same refusals are reached.
        assert_eq!(
            verify(&encoded, &HardwarePolicy::default(), &report_data, now).unwrap_err(),
            AttestError::KindNotAccepted(TeeKind::SevSnp)
        );
        assert!(matches!(
            verify(&encoded, &policy, &report_data, 0),
            Err(AttestError::Chain { .. })
        ));
        assert!(matches!(
            verify(b"{\"kind\":\"sev-snp\"}", &policy, &report_data, now),
            Err(AttestError::Malformed { .. })
        ));
    }
}
