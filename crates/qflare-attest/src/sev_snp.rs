//! AMD SEV-SNP: a 1,184-byte attestation report signed (ECDSA P-384,
//! SHA-384) by the chip's VCEK, a key derived from the chip's secret and its
//! firmware security versions; the VCEK is certified by the generation's ASK,
//! the ASK by AMD's root ARK (both RSA-PSS, both built into the `sev` crate,
//! which is where the roots are pinned).
//!
//! The `sev` crate supplies those roots and the RSA-PSS chain checks (its
//! pure-Rust `crypto_nossl` feature). The report's own signature is checked
//! here over the raw bytes the firmware signed, not over `sev`'s re-encoding
//! of its parsed fields, so that every signed byte (reserved ones included)
//! counts. The fields read are at the offsets of AMD's SEV-SNP ABI
//! specification (table "ATTESTATION_REPORT structure"), which is stable
//! from report version 2 on.
//!
//! Beyond the signatures: each certificate's validity period at the given
//! time, and the VCEK's AMD extensions (the TCB levels and chip ID it was
//! issued for) must equal the report's `REPORTED_TCB` and `CHIP_ID`, so a
//! VCEK of another chip or of older firmware cannot vouch for this report.
//!
//! About 670 lines: half are the known-answer tests, which stay beside the
//! parser because they flip bytes at its private field offsets.

use std::ops::Range;
use std::sync::OnceLock;

use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED, UnparsedPublicKey};
use sev::certs::snp::{Certificate, Verifiable, builtin, ca};
use x509_cert_sev::der::{Decode, asn1::ObjectIdentifier};

use crate::error::{AttestError, Result};
use crate::evidence::{SevSnpEvidence, TeeKind};
use crate::policy::{SevSnpPolicy, SnpProduct, SnpTcbFloor};
use crate::{Checked, MEASUREMENT_LEN, REPORT_DATA_LEN};

const KIND: TeeKind = TeeKind::SevSnp;

/// Length of an attestation report.
pub const REPORT_LEN: usize = 0x4A0;
/// The signature covers the bytes before it.
const SIGNED: Range<usize> = 0x000..0x2A0;
const VERSION: Range<usize> = 0x000..0x004;
const GUEST_SVN: Range<usize> = 0x004..0x008;
const POLICY: Range<usize> = 0x008..0x010;
const SIGNATURE_ALGO: Range<usize> = 0x034..0x038;
const KEY_INFO: Range<usize> = 0x048..0x04C;
const REPORT_DATA: Range<usize> = 0x050..0x090;
const MEASUREMENT: Range<usize> = 0x090..0x0C0;
const REPORTED_TCB: Range<usize> = 0x180..0x188;
const CHIP_ID: Range<usize> = 0x1A0..0x1E0;
/// R then S, each a 72-byte little-endian field of which 48 bytes are used.
const SIGNATURE_R: Range<usize> = 0x2A0..0x2E8;
const SIGNATURE_S: Range<usize> = 0x2E8..0x330;

/// `POLICY` bit: the host may debug the guest (read and write its memory).
const POLICY_DEBUG: u64 = 1 << 19;
/// `POLICY` bit: a migration agent may be associated with the guest.
const POLICY_MIGRATE_MA: u64 = 1 << 18;
/// `SIGNATURE_ALGO` value for ECDSA P-384 with SHA-384.
const ECDSA_P384_SHA384: u32 = 1;

/// The VCEK's extensions (AMD's "VCEK Certificate and KDS Interface
/// Specification", 57230, chapter 3): TCB components it was derived for and
/// the chip it belongs to.
const OID_BL_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.1");
const OID_TEE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.2");
const OID_SNP_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.3");
const OID_UCODE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.8");
const OID_FMC_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.9");
const OID_HW_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.4");

/// A platform's security patch levels, as a report or a VCEK states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnpTcb {
    /// FMC SVN (Turin and later).
    pub fmc: Option<u8>,
    /// PSP bootloader SVN.
    pub bootloader: u8,
    /// PSP OS SVN.
    pub tee: u8,
    /// SNP firmware SVN.
    pub snp: u8,
    /// Microcode patch level.
    pub microcode: u8,
}

impl SnpTcb {
    /// Reads a `TCB_VERSION`, whose layout changed with Turin.
    fn from_le(bytes: [u8; 8], product: SnpProduct) -> Self {
        match product {
            SnpProduct::Milan | SnpProduct::Genoa => Self {
                fmc: None,
                bootloader: bytes[0],
                tee: bytes[1],
                snp: bytes[6],
                microcode: bytes[7],
            },
            SnpProduct::Turin => Self {
                fmc: Some(bytes[0]),
                bootloader: bytes[1],
                tee: bytes[2],
                snp: bytes[3],
                microcode: bytes[7],
            },
        }
    }

    fn first_below(&self, floor: &SnpTcbFloor) -> Option<(&'static str, u8, u8)> {
        [
            ("bootloader", self.bootloader, floor.bootloader),
            ("tee", self.tee, floor.tee),
            ("snp", self.snp, floor.snp),
            ("microcode", self.microcode, floor.microcode),
            ("fmc", self.fmc.unwrap_or(u8::MAX), floor.fmc),
        ]
        .into_iter()
        .find(|(_, have, need)| have < need)
    }
}

impl std::fmt::Display for SnpTcb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(fmc) = self.fmc {
            write!(f, "fmc {fmc} ")?;
        }
        write!(
            f,
            "bootloader {} tee {} snp {} microcode {}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

fn field<const N: usize>(report: &[u8], range: Range<usize>) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&report[range]);
    out
}

fn check_length(report: &[u8]) -> Result<()> {
    if report.len() == REPORT_LEN {
        Ok(())
    } else {
        Err(AttestError::malformed(
            "SEV-SNP report",
            format!("{} bytes, expected {REPORT_LEN}", report.len()),
        ))
    }
}

/// The report data as the report states it, unverified.
pub fn claimed_report_data(report: &[u8]) -> Result<[u8; REPORT_DATA_LEN]> {
    check_length(report)?;
    Ok(field(report, REPORT_DATA))
}

/// The launch measurement as the report states it, unverified: what an
/// enclave puts in its own report, which verifiers then hold to the signed one.
pub fn claimed_measurement(report: &[u8]) -> Result<[u8; MEASUREMENT_LEN]> {
    check_length(report)?;
    Ok(field(report, MEASUREMENT))
}

fn builtin_chain(product: SnpProduct) -> Result<ca::Chain> {
    let pair = match product {
        SnpProduct::Milan => (builtin::milan::ark(), builtin::milan::ask()),
        SnpProduct::Genoa => (builtin::genoa::ark(), builtin::genoa::ask()),
        SnpProduct::Turin => (builtin::turin::ark(), builtin::turin::ask()),
    };
    match pair {
        (Ok(ark), Ok(ask)) => Ok(ca::Chain { ark, ask }),
        // The roots are compiled in; failing to parse them is a build defect.
        _ => Err(AttestError::chain(
            KIND,
            format!("the built-in {} roots do not parse", product.as_str()),
        )),
    }
}

/// A generation's built-in ARK and ASK with their signatures (the ARK's over
/// itself and over the ASK) checked once per process: they are constants
/// compiled in, so a report costs only the VCEK's link (RSA-PSS in pure Rust
/// is most of the verification time) and the validity checks, which depend
/// on the time and are made every time.
struct Roots {
    chain: ca::Chain,
    ark: x509_cert_sev::Certificate,
    ask: x509_cert_sev::Certificate,
}

fn roots(product: SnpProduct) -> Result<&'static Roots> {
    static CHECKED: [OnceLock<Result<Roots, String>>; 3] = [const { OnceLock::new() }; 3];
    let index = match product {
        SnpProduct::Milan => 0,
        SnpProduct::Genoa => 1,
        SnpProduct::Turin => 2,
    };
    CHECKED[index]
        .get_or_init(|| {
            let chain = builtin_chain(product).map_err(|e| e.to_string())?;
            chain
                .verify()
                .map_err(|e| format!("{} ARK/ASK: {e}", product.as_str()))?;
            Ok(Roots {
                ark: x509(&chain.ark),
                ask: x509(&chain.ask),
                chain,
            })
        })
        .as_ref()
        .map_err(|detail| AttestError::chain(KIND, detail))
}

fn x509(certificate: &Certificate) -> x509_cert_sev::Certificate {
    certificate.clone().into()
}

fn check_validity(name: &str, certificate: &x509_cert_sev::Certificate, now: u64) -> Result<()> {
    let validity = &certificate.tbs_certificate.validity;
    let not_before = validity.not_before.to_unix_duration().as_secs();
    let not_after = validity.not_after.to_unix_duration().as_secs();
    if now < not_before || now > not_after {
        return Err(AttestError::chain(
            KIND,
            format!(
                "the {name} certificate is valid from {not_before} to {not_after} (Unix seconds), not at {now}"
            ),
        ));
    }
    Ok(())
}

/// Finds the accepted product whose ASK issued `vcek`, and checks ARK → ASK
/// → VCEK: signatures and validity at `now`.
fn chain_to_amd_root(vcek: &Certificate, policy: &SevSnpPolicy, now: u64) -> Result<SnpProduct> {
    let vcek_x509 = x509(vcek);
    let issuer = &vcek_x509.tbs_certificate.issuer;
    for &product in &policy.products {
        let roots = roots(product)?;
        if roots.ask.tbs_certificate.subject != *issuer {
            continue;
        }
        (&roots.chain.ask, vcek).verify().map_err(|e| {
            AttestError::chain(
                KIND,
                format!("the {} ASK did not sign the VCEK: {e}", product.as_str()),
            )
        })?;
        check_validity("ARK", &roots.ark, now)?;
        check_validity("ASK", &roots.ask, now)?;
        check_validity("VCEK", &vcek_x509, now)?;
        return Ok(product);
    }
    Err(AttestError::chain(
        KIND,
        format!(
            "the VCEK was not issued by the ASK of an accepted product ({})",
            policy
                .products
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

fn check_report_signature(report: &[u8], vcek: &Certificate) -> Result<()> {
    let algorithm = u32::from_le_bytes(field(report, SIGNATURE_ALGO));
    if algorithm != ECDSA_P384_SHA384 {
        return Err(AttestError::signature(
            KIND,
            format!("unsupported signature algorithm {algorithm}"),
        ));
    }
    // AMD stores each scalar little-endian in 72 bytes; P-384 uses 48.
    let mut fixed = [0u8; 96];
    for (half, range) in [SIGNATURE_R, SIGNATURE_S].into_iter().enumerate() {
        let scalar = &report[range];
        if scalar[48..].iter().any(|&b| b != 0) {
            return Err(AttestError::signature(
                KIND,
                "a signature scalar is longer than 48 bytes",
            ));
        }
        for (i, &byte) in scalar[..48].iter().rev().enumerate() {
            fixed[half * 48 + i] = byte;
        }
    }
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, vcek.public_key_sec1())
        .verify(&report[SIGNED], &fixed)
        .map_err(|_| AttestError::signature(KIND, "the VCEK did not sign this report"))
}

fn extension<'a>(vcek: &'a x509_cert_sev::Certificate, oid: &ObjectIdentifier) -> Option<&'a [u8]> {
    vcek.tbs_certificate
        .extensions
        .as_ref()?
        .iter()
        .find(|e| e.extn_id == *oid)
        .map(|e| e.extn_value.as_bytes())
}

/// The TCB levels and hardware ID the VCEK certifies.
fn vcek_claims(
    vcek: &x509_cert_sev::Certificate,
    product: SnpProduct,
) -> Result<(SnpTcb, Vec<u8>)> {
    let level = |oid: &ObjectIdentifier, name: &str| -> Result<u8> {
        let value = extension(vcek, oid)
            .ok_or_else(|| AttestError::chain(KIND, format!("the VCEK has no {name} extension")))?;
        u8::from_der(value).map_err(|e| {
            AttestError::chain(
                KIND,
                format!("the VCEK's {name} is not a small integer: {e}"),
            )
        })
    };
    let tcb = SnpTcb {
        fmc: match product {
            SnpProduct::Turin => Some(level(&OID_FMC_SPL, "fmcSPL")?),
            SnpProduct::Milan | SnpProduct::Genoa => None,
        },
        bootloader: level(&OID_BL_SPL, "blSPL")?,
        tee: level(&OID_TEE_SPL, "teeSPL")?,
        snp: level(&OID_SNP_SPL, "snpSPL")?,
        microcode: level(&OID_UCODE_SPL, "ucodeSPL")?,
    };
    let raw = extension(vcek, &OID_HW_ID)
        .ok_or_else(|| AttestError::chain(KIND, "the VCEK has no hwID extension"))?;
    // AMD's KDS has issued hwID both as raw bytes and wrapped in an OCTET
    // STRING; accept either, exactly.
    let hw_id = match x509_cert_sev::der::asn1::OctetString::from_der(raw) {
        Ok(wrapped) => wrapped.as_bytes().to_vec(),
        Err(_) => raw.to_vec(),
    };
    Ok((tcb, hw_id))
}

/// Verifies SEV-SNP evidence at `now` against `policy` (the report data is
/// compared by [`crate::verify`]).
pub fn verify(evidence: &SevSnpEvidence, policy: &SevSnpPolicy, now: u64) -> Result<Checked> {
    let report = evidence.report.as_slice();
    check_length(report)?;
    let version = u32::from_le_bytes(field(report, VERSION));
    if version < 2 {
        return Err(AttestError::malformed(
            "SEV-SNP report",
            format!("version {version}, expected 2 or later"),
        ));
    }
    // KEY_INFO.SIGNING_KEY (bits 4:2): 0 is the VCEK. A report signed with a
    // VLEK would need AMD's VLEK chain, which this verifier does not take.
    let signing_key = (u32::from_le_bytes(field(report, KEY_INFO)) >> 2) & 0b111;
    if signing_key != 0 {
        return Err(AttestError::signature(
            KIND,
            format!(
                "signed with key {signing_key}, not the VCEK (0); VLEK reports are not accepted"
            ),
        ));
    }
    let vcek = Certificate::from_der(&evidence.vcek)
        .map_err(|e| AttestError::malformed("VCEK certificate", e))?;
    let product = chain_to_amd_root(&vcek, policy, now)?;
    check_report_signature(report, &vcek)?;

    // The report is AMD's word from here on. It must be about the chip and
    // TCB the VCEK was issued for.
    let reported_tcb = SnpTcb::from_le(field(report, REPORTED_TCB), product);
    let (vcek_tcb, hw_id) = vcek_claims(&x509(&vcek), product)?;
    if vcek_tcb != reported_tcb {
        return Err(AttestError::chain(
            KIND,
            format!("the VCEK is for TCB {vcek_tcb}, the report says {reported_tcb}"),
        ));
    }
    // A platform configured with MASK_CHIP_ID reports zeros here, and then
    // nothing ties the VCEK to this chip: refused like any other mismatch.
    let chip_id: [u8; 64] = field(report, CHIP_ID);
    let same_chip = hw_id.len() <= chip_id.len()
        && !hw_id.is_empty()
        && chip_id[..hw_id.len()] == hw_id[..]
        && chip_id[hw_id.len()..].iter().all(|&b| b == 0);
    if !same_chip {
        return Err(AttestError::chain(
            KIND,
            "the report's CHIP_ID is not the VCEK's hwID (or is masked)",
        ));
    }

    judge(report, product, policy)
}

/// Compares a report that AMD vouches for with `policy`.
fn judge(report: &[u8], product: SnpProduct, policy: &SevSnpPolicy) -> Result<Checked> {
    let version = u32::from_le_bytes(field(report, VERSION));
    let reported_tcb = SnpTcb::from_le(field(report, REPORTED_TCB), product);
    let guest_policy = u64::from_le_bytes(field(report, POLICY));
    if guest_policy & POLICY_DEBUG != 0 {
        return Err(AttestError::policy(
            KIND,
            "the guest policy allows debugging",
        ));
    }
    if guest_policy & POLICY_MIGRATE_MA != 0 && !policy.allow_migration_agent {
        return Err(AttestError::policy(
            KIND,
            "the guest policy allows a migration agent (allow_migration_agent is off)",
        ));
    }
    let measurement: [u8; MEASUREMENT_LEN] = field(report, MEASUREMENT);
    if !policy.measurements.iter().any(|m| m.0 == measurement) {
        return Err(AttestError::policy(
            KIND,
            format!(
                "MEASUREMENT {} is not on the allow-list",
                hex::encode(measurement)
            ),
        ));
    }
    let guest_svn = u32::from_le_bytes(field(report, GUEST_SVN));
    if guest_svn < policy.min_guest_svn {
        return Err(AttestError::policy(
            KIND,
            format!(
                "guest SVN {guest_svn} is below the minimum {}",
                policy.min_guest_svn
            ),
        ));
    }
    if let Some((component, have, need)) = reported_tcb.first_below(&policy.min_tcb) {
        return Err(AttestError::policy(
            KIND,
            format!("TCB {component} {have} is below the minimum {need}"),
        ));
    }
    Ok(Checked {
        measurement,
        platform: format!(
            "AMD {} SEV-SNP, report version {version}, TCB {reported_tcb}, guest SVN {guest_svn}",
            product.as_str()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Digest48;
    use crate::vectors;

    /// The Milan evidence (virtee/sev's test data) and a time inside the
    /// VCEK's validity (2023-04-03 to 2030-04-03).
    fn milan(test: &str) -> Option<(SevSnpEvidence, u64)> {
        let dir = vectors::dir(test, "sev-snp")?;
        let hex_text = String::from_utf8(vectors::read(&dir, "report_milan.hex")).unwrap();
        let report = hex::decode(hex_text.trim()).unwrap();
        let vcek = vectors::read(&dir, "vcek_milan.der");
        Some((
            SevSnpEvidence { report, vcek },
            vectors::unix("2025-06-01T00:00:00Z"),
        ))
    }

    fn trusting_its_measurement(evidence: &SevSnpEvidence) -> SevSnpPolicy {
        SevSnpPolicy::trusting(vec![Digest48(field(&evidence.report, MEASUREMENT))])
    }

    #[test]
    fn the_genuine_milan_report_verifies() {
        let Some((evidence, now)) = milan("the_genuine_milan_report_verifies") else {
            return;
        };
        let policy = trusting_its_measurement(&evidence);
        let checked = verify(&evidence, &policy, now).unwrap();
        assert_eq!(checked.measurement, field(&evidence.report, MEASUREMENT));
        assert_eq!(
            claimed_measurement(&evidence.report).unwrap(),
            checked.measurement
        );
        assert!(
            checked.platform.starts_with("AMD Milan SEV-SNP"),
            "{}",
            checked.platform
        );
    }

    #[test]
    fn the_published_chain_is_the_built_in_one() {
        let Some(dir) = vectors::dir("the_published_chain_is_the_built_in_one", "sev-snp") else {
            return;
        };
        for (file, product) in [
            ("cert_chain_milan", SnpProduct::Milan),
            ("cert_chain_turin", SnpProduct::Turin),
        ] {
            let pem = String::from_utf8(vectors::read(&dir, file)).unwrap();
            let blocks: Vec<&str> = pem.split_inclusive("-----END CERTIFICATE-----").collect();
            let ask = Certificate::from_pem(blocks[0].trim().as_bytes()).unwrap();
            let ark = Certificate::from_pem(blocks[1].trim().as_bytes()).unwrap();
            let built_in = builtin_chain(product).unwrap();
            assert_eq!(ask, built_in.ask, "{file}: ASK");
            assert_eq!(ark, built_in.ark, "{file}: ARK");
        }
    }

    #[test]
    fn a_flipped_byte_in_the_signed_report_or_the_signature_fails() {
        let Some((evidence, now)) = milan("a_flipped_byte_in_the_signed_report_fails") else {
            return;
        };
        let policy = trusting_its_measurement(&evidence);
        // Every signed byte would take a minute of RSA in a debug build;
        // a stride that is coprime to the field sizes, plus each named field,
        // plus the signature's used and padding bytes.
        let mut offsets: Vec<usize> = (0..SIGNED.end).step_by(7).collect();
        offsets.extend([
            VERSION.start,
            GUEST_SVN.start,
            POLICY.start + 2,
            SIGNATURE_ALGO.start,
            KEY_INFO.start,
            REPORT_DATA.start,
            REPORT_DATA.end - 1,
            MEASUREMENT.start,
            REPORTED_TCB.start,
            CHIP_ID.end - 1,
            SIGNED.end - 1,
            SIGNATURE_R.start,
            SIGNATURE_R.start + 47,
            SIGNATURE_R.start + 60,
            SIGNATURE_S.start,
            SIGNATURE_S.start + 71,
        ]);
        for offset in offsets {
            let mut tampered = evidence.clone();
            tampered.report[offset] ^= 0x01;
            let mut lenient = policy.clone();
            lenient
                .measurements
                .push(Digest48(field(&tampered.report, MEASUREMENT)));
            assert!(
                verify(&tampered, &lenient, now).is_err(),
                "a flip at {offset:#x} was accepted"
            );
        }
    }

    #[test]
    fn a_tampered_or_foreign_vcek_fails() {
        let Some((evidence, now)) = milan("a_tampered_or_foreign_vcek_fails") else {
            return;
        };
        let policy = trusting_its_measurement(&evidence);
        let mut flipped = evidence.clone();
        let middle = flipped.vcek.len() / 2;
        flipped.vcek[middle] ^= 0x01;
        assert!(verify(&flipped, &policy, now).is_err());

        let dir = vectors::dir("a_tampered_or_foreign_vcek_fails", "sev-snp").unwrap();
        let mut turin = evidence.clone();
        turin.vcek = vectors::read(&dir, "vcek_turin.der");
        assert!(matches!(
            verify(&turin, &policy, vectors::unix("2026-01-01T00:00:00Z")),
            Err(AttestError::Signature { .. } | AttestError::Chain { .. })
        ));
    }

    #[test]
    fn a_chain_through_another_generations_ask_fails() {
        let Some((evidence, now)) = milan("a_chain_through_another_generations_ask_fails") else {
            return;
        };
        let mut policy = trusting_its_measurement(&evidence);
        policy.products = vec![SnpProduct::Genoa, SnpProduct::Turin];
        assert!(matches!(
            verify(&evidence, &policy, now),
            Err(AttestError::Chain { detail, .. }) if detail.contains("not issued by the ASK")
        ));
        // The Milan ASK swapped for Genoa's under Milan's name still fails:
        // the signature on the VCEK is the ASK's.
        let genoa = builtin_chain(SnpProduct::Genoa).unwrap();
        assert!(
            (&genoa.ask, &Certificate::from_der(&evidence.vcek).unwrap())
                .verify()
                .is_err()
        );
    }

    #[test]
    fn outside_the_vceks_validity_fails() {
        let Some((evidence, _)) = milan("outside_the_vceks_validity_fails") else {
            return;
        };
        let policy = trusting_its_measurement(&evidence);
        for when in ["2023-04-01T00:00:00Z", "2030-04-04T00:00:00Z"] {
            assert!(
                matches!(
                    verify(&evidence, &policy, vectors::unix(when)),
                    Err(AttestError::Chain { detail, .. }) if detail.contains("VCEK certificate is valid from")
                ),
                "{when}"
            );
        }
    }

    #[test]
    fn policy_rules_refuse_what_they_name() {
        let Some((evidence, now)) = milan("policy_rules_refuse_what_they_name") else {
            return;
        };
        let policy = trusting_its_measurement(&evidence);
        let refusal = |policy: &SevSnpPolicy| match verify(&evidence, policy, now) {
            Err(AttestError::Policy { rule, .. }) => rule,
            other => panic!("expected a policy refusal, got {other:?}"),
        };
        let mut unlisted = policy.clone();
        unlisted.measurements = vec![Digest48([0x5a; 48])];
        assert!(refusal(&unlisted).contains("MEASUREMENT"));

        let reported = SnpTcb::from_le(field(&evidence.report, REPORTED_TCB), SnpProduct::Milan);
        let mut newer_firmware = policy.clone();
        newer_firmware.min_tcb.snp = reported.snp + 1;
        assert!(refusal(&newer_firmware).contains("TCB snp"));
        let mut newer_microcode = policy.clone();
        newer_microcode.min_tcb.microcode = reported.microcode.saturating_add(1);
        assert!(refusal(&newer_microcode).contains("TCB microcode"));
        let mut newer_guest = policy.clone();
        newer_guest.min_guest_svn = u32::from_le_bytes(field(&evidence.report, GUEST_SVN)) + 1;
        assert!(refusal(&newer_guest).contains("guest SVN"));
    }

    #[test]
    fn debug_and_migration_agent_guests_are_refused() {
        let Some((evidence, _)) = milan("debug_and_migration_agent_guests_are_refused") else {
            return;
        };
        // No published report of a debug guest exists; the rule is applied
        // to the genuine report with the bit set, past the signature (which
        // the bit would break, see the flipped-byte test).
        let policy = trusting_its_measurement(&evidence);
        assert!(judge(&evidence.report, SnpProduct::Milan, &policy).is_ok());
        let with_bit = |bit: u64| {
            let mut report = evidence.report.clone();
            let value = u64::from_le_bytes(field(&report, POLICY)) | bit;
            report[POLICY].copy_from_slice(&value.to_le_bytes());
            report
        };
        assert!(matches!(
            judge(&with_bit(POLICY_DEBUG), SnpProduct::Milan, &policy),
            Err(AttestError::Policy { rule, .. }) if rule.contains("debugging")
        ));
        let with_agent = with_bit(POLICY_MIGRATE_MA);
        assert!(matches!(
            judge(&with_agent, SnpProduct::Milan, &policy),
            Err(AttestError::Policy { rule, .. }) if rule.contains("migration agent")
        ));
        let mut allowing = policy.clone();
        allowing.allow_migration_agent = true;
        assert!(judge(&with_agent, SnpProduct::Milan, &allowing).is_ok());
    }

    #[test]
    fn vlek_signed_reports_are_refused_by_name() {
        let Some((mut evidence, now)) = milan("vlek_signed_reports_are_refused_by_name") else {
            return;
        };
        let policy = trusting_its_measurement(&evidence);
        evidence.report[KEY_INFO.start] |= 1 << 2;
        assert!(matches!(
            verify(&evidence, &policy, now),
            Err(AttestError::Signature { detail, .. }) if detail.contains("VLEK")
        ));
    }

    #[test]
    fn reports_of_the_wrong_length_are_malformed() {
        for len in [0, REPORT_LEN - 1, REPORT_LEN + 1] {
            assert!(matches!(
                claimed_report_data(&vec![0; len]),
                Err(AttestError::Malformed { .. })
            ));
        }
    }
}
