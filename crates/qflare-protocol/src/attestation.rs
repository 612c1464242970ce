//! Enclave attestation reports and their verification.
//!
//! A report binds the enclave's *measurement*, its per-boot KEM and signing
//! keys, the verifier's nonce, the time and how the process runs, and is
//! signed by the enclave's key. What stands behind it depends on the mode:
//!
//! - `software`: the signature is all there is. It proves the report is
//!   internally consistent and fresh, but a host that controls the machine
//!   could run a different binary and claim any measurement (SHA-384 of the
//!   executable). Devices may refuse this mode by policy.
//! - `sev-snp`, `tdx`, `nitro`: the report carries the TEE's *evidence*
//!   (`qflare-attest` encodes and verifies it offline), whose 64 bytes of
//!   report data are [`evidence_binding`]: a transcript hash over the mode,
//!   both keys, the nonce and the runtime. A verifier recomputes it from the
//!   report and refuses evidence that commits to anything else before it
//!   believes any of it, then has the vendor's chain and the hardware policy
//!   checked, and requires the report's measurement to be the one the
//!   hardware signed (SNP `MEASUREMENT`, TDX `MRTD`, Nitro `PCR0`).

/// The hardware-evidence verifiers and their policy types, re-exported so
/// that devices, the server and the CLI name them through the protocol.
pub use qflare_attest as hardware;
use qflare_attest::{HardwarePolicy, TeeKind, VerifiedEvidence};
use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;
use crate::error::{ProtocolError, Result};
use crate::kem::KemPublicKey;
use crate::sig::{SigningKey, VerifyingKey};
use crate::suite::{KemSuite, SignatureSuite};
use crate::transcript::{Domain, Transcript, TranscriptHash};
use crate::wire::{b64, b64_array, hex_array};

/// Length of a measurement (SHA-384).
pub const MEASUREMENT_LEN: usize = 48;

/// Parses a measurement as operators write it: 96 hex characters (either
/// case, surrounding whitespace ignored).
pub fn parse_measurement(text: &str) -> Result<[u8; MEASUREMENT_LEN]> {
    let text = text.trim();
    let mut out = [0u8; MEASUREMENT_LEN];
    hex::decode_to_slice(text, &mut out).map_err(|_| {
        ProtocolError::malformed(
            "enclave measurement",
            format!(
                "expected {} hex characters (SHA-384), got {:?}",
                2 * MEASUREMENT_LEN,
                text
            ),
        )
    })?;
    Ok(out)
}
/// Length of an attestation nonce.
pub const ATTESTATION_NONCE_LEN: usize = 32;

/// How the enclave is isolated, and so what its report can prove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AttestationMode {
    /// A hardened OS process; the report is self-signed.
    Software,
    /// Inside an AMD SEV-SNP confidential VM; the report carries its
    /// attestation report and VCEK.
    SevSnp,
    /// Inside an Intel TDX trust domain; the report carries a DCAP quote
    /// and Intel's collateral.
    Tdx,
    /// Inside an AWS Nitro Enclave; the report carries the NSM's
    /// attestation document.
    Nitro,
}

impl AttestationMode {
    /// Every mode.
    pub const ALL: [Self; 4] = [Self::Software, Self::SevSnp, Self::Tdx, Self::Nitro];

    /// The wire and configuration identifier.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Software => "software",
            Self::SevSnp => "sev-snp",
            Self::Tdx => "tdx",
            Self::Nitro => "nitro",
        }
    }

    /// The TEE whose evidence a report of this mode must carry; `None` for
    /// software mode.
    pub const fn tee_kind(self) -> Option<TeeKind> {
        match self {
            Self::Software => None,
            Self::SevSnp => Some(TeeKind::SevSnp),
            Self::Tdx => Some(TeeKind::Tdx),
            Self::Nitro => Some(TeeKind::Nitro),
        }
    }

    /// The mode of an enclave running in `kind`.
    pub const fn of_tee(kind: TeeKind) -> Self {
        match kind {
            TeeKind::SevSnp => Self::SevSnp,
            TeeKind::Tdx => Self::Tdx,
            TeeKind::Nitro => Self::Nitro,
        }
    }
}

/// The hardware modes whose evidence `policy` can accept, for a verifier's
/// `allowed_modes`.
pub fn hardware_modes(policy: &HardwarePolicy) -> Vec<AttestationMode> {
    AttestationMode::ALL
        .into_iter()
        .filter(|mode| mode.tee_kind().is_some_and(|kind| policy.accepts(kind)))
        .collect()
}

impl std::str::FromStr for AttestationMode {
    type Err = ProtocolError;
    fn from_str(text: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| {
                ProtocolError::malformed(
                    "attestation mode",
                    "expected software, sev-snp, tdx or nitro",
                )
            })
    }
}

/// Whether the enclave's system-call allow-list is in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum SeccompState {
    /// The sandbox is on: forbidden calls fail, the few that only an
    /// intruder would make (`execve`, `ptrace`, `socket`, ...) kill the
    /// process, and no memory can be mapped executable.
    Enforce,
    /// Forbidden calls are allowed and only logged (diagnosis): the sandbox is off.
    Log,
    /// No filter.
    Off,
}

impl SeccompState {
    /// The wire identifier.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Log => "log",
            Self::Off => "off",
        }
    }
}

/// How the enclave process was started and how it hardened itself, signed
/// into its report so that a host cannot run it with the sandbox off (or
/// with other arguments) and still present the report of a sandboxed one.
/// The process fills this in about itself once its sandbox is closed; in
/// software mode that is as good as the measured code that does it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnclaveRuntime {
    /// The seccomp allow-list's mode.
    pub seccomp: SeccompState,
    /// `PR_SET_NO_NEW_PRIVS` is set (no privilege gain through exec).
    pub no_new_privs: bool,
    /// `PR_SET_DUMPABLE` is 0 (no ptrace attach, no `/proc/<pid>/mem`).
    pub not_dumpable: bool,
    /// `RLIMIT_CORE` is 0.
    pub no_core_files: bool,
    /// `mlockall` succeeded (secrets never reach swap).
    pub memory_locked: bool,
    /// The process's arguments as the host gave them, verbatim.
    pub arguments: Vec<String>,
    /// SHA-256 (hex) of FLTrust's root data as loaded (the examples kept,
    /// images as little-endian f32 then labels), when there is any.
    #[serde(default)]
    pub root_data_sha256: Option<String>,
}

impl EnclaveRuntime {
    /// What a process that did nothing to protect itself reports.
    pub fn unhardened() -> Self {
        Self {
            seccomp: SeccompState::Off,
            no_new_privs: false,
            not_dumpable: false,
            no_core_files: false,
            memory_locked: false,
            arguments: Vec::new(),
            root_data_sha256: None,
        }
    }

    /// True when the system-call sandbox is enforced: forbidden calls fail
    /// and cannot be regained through exec.
    pub fn sandboxed(&self) -> bool {
        self.seccomp == SeccompState::Enforce && self.no_new_privs
    }

    fn absorb(&self, t: &mut Transcript) {
        let flag = |b: bool| [u8::from(b)];
        t.append("seccomp", self.seccomp.as_str().as_bytes())
            .append("no_new_privs", &flag(self.no_new_privs))
            .append("not_dumpable", &flag(self.not_dumpable))
            .append("no_core_files", &flag(self.no_core_files))
            .append("memory_locked", &flag(self.memory_locked))
            .append_u64("arguments", self.arguments.len() as u64);
        for argument in &self.arguments {
            t.append("argument", argument.as_bytes());
        }
        // Absent and present differ in length (0 against 64 hex characters
        // or more), so the two cannot be confused.
        t.append(
            "root_data_sha256",
            self.root_data_sha256.as_deref().unwrap_or("").as_bytes(),
        );
    }
}

/// A signed attestation report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AttestationReport {
    /// Protocol version.
    pub version: u16,
    /// Isolation mode.
    pub mode: AttestationMode,
    /// SHA-384 of the enclave executable.
    #[serde(with = "hex_array")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[0-9a-f]+$"))]
    pub measurement: [u8; MEASUREMENT_LEN],
    /// Suite of the enclave's KEM key.
    pub kem_suite: KemSuite,
    /// The key devices seal their updates to.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub kem_public_key: Vec<u8>,
    /// Suite of the enclave's signing key.
    pub signature_suite: SignatureSuite,
    /// The key that signs reports and global models.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub verifying_key: Vec<u8>,
    /// The verifier's nonce, echoed.
    #[serde(with = "b64_array")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub nonce: [u8; ATTESTATION_NONCE_LEN],
    /// Unix seconds when the report was made.
    pub issued_at: u64,
    /// Hardware evidence (a quote); empty in software mode.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub evidence: Vec<u8>,
    /// How the process runs (signed). Absent only in reports of enclaves
    /// built before it was added, which a verifier that requires the
    /// sandbox refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<EnclaveRuntime>,
    /// The enclave's signature over the report transcript.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub signature: Vec<u8>,
}

/// What a report says, before signing.
#[derive(Debug, Clone)]
pub struct ReportBody {
    /// Isolation mode.
    pub mode: AttestationMode,
    /// SHA-384 of the enclave executable.
    pub measurement: [u8; MEASUREMENT_LEN],
    /// The enclave's KEM key.
    pub kem_public_key: KemPublicKey,
    /// The enclave's verifying key.
    pub verifying_key: VerifyingKey,
    /// The verifier's nonce.
    pub nonce: [u8; ATTESTATION_NONCE_LEN],
    /// Unix seconds now.
    pub issued_at: u64,
    /// Hardware evidence, if any.
    pub evidence: Vec<u8>,
    /// How the process runs (see [`EnclaveRuntime`]).
    pub runtime: Option<EnclaveRuntime>,
}

fn report_transcript(body: &ReportBody) -> TranscriptHash {
    let mut t = Transcript::new(Domain::Attestation);
    t.append("mode", body.mode.as_str().as_bytes())
        .append("measurement", &body.measurement)
        .append("kem_suite", body.kem_public_key.suite().as_str().as_bytes())
        .append("kem_public_key", body.kem_public_key.as_bytes())
        .append(
            "signature_suite",
            body.verifying_key.suite().as_str().as_bytes(),
        )
        .append("verifying_key", body.verifying_key.as_bytes())
        .append("nonce", &body.nonce)
        .append_u64("issued_at", body.issued_at)
        .append("evidence", &body.evidence);
    if let Some(runtime) = &body.runtime {
        runtime.absorb(&mut t);
    }
    t.hash()
}

/// The 64 bytes an enclave in a TEE asks its hardware to sign as report
/// data: a transcript hash (SHA-384) over the mode, both public keys, the
/// verifier's nonce and the runtime, then 16 zero bytes. Everything a device
/// relies on is in it, so evidence cannot be moved to other keys, another
/// request or a process started differently.
pub fn evidence_binding(
    mode: AttestationMode,
    kem_public_key: &KemPublicKey,
    verifying_key: &VerifyingKey,
    nonce: &[u8; ATTESTATION_NONCE_LEN],
    runtime: Option<&EnclaveRuntime>,
) -> [u8; qflare_attest::REPORT_DATA_LEN] {
    let mut t = Transcript::new(Domain::EvidenceBinding);
    t.append("mode", mode.as_str().as_bytes())
        .append("kem_suite", kem_public_key.suite().as_str().as_bytes())
        .append("kem_public_key", kem_public_key.as_bytes())
        .append("signature_suite", verifying_key.suite().as_str().as_bytes())
        .append("verifying_key", verifying_key.as_bytes())
        .append("nonce", nonce)
        .append_u64("runtime", u64::from(runtime.is_some()));
    if let Some(runtime) = runtime {
        runtime.absorb(&mut t);
    }
    let mut out = [0u8; qflare_attest::REPORT_DATA_LEN];
    out[..crate::transcript::TRANSCRIPT_HASH_LEN].copy_from_slice(t.hash().as_bytes());
    out
}

/// Signs a report with the enclave's key; the key must be the one in `body`.
pub fn sign_report(body: &ReportBody, signing_key: &SigningKey) -> Result<AttestationReport> {
    if signing_key.verifying_key() != &body.verifying_key {
        return Err(ProtocolError::Mismatch("report signing key"));
    }
    Ok(AttestationReport {
        version: PROTOCOL_VERSION,
        mode: body.mode,
        measurement: body.measurement,
        kem_suite: body.kem_public_key.suite(),
        kem_public_key: body.kem_public_key.as_bytes().to_vec(),
        signature_suite: body.verifying_key.suite(),
        verifying_key: body.verifying_key.as_bytes().to_vec(),
        nonce: body.nonce,
        issued_at: body.issued_at,
        evidence: body.evidence.clone(),
        runtime: body.runtime.clone(),
        signature: signing_key.sign(report_transcript(body).as_bytes())?,
    })
}

/// Which enclaves a verifier accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationPolicy {
    /// Measurements (SHA-384 of the executable) that are trusted. Empty trusts none.
    pub allowed_measurements: Vec<[u8; MEASUREMENT_LEN]>,
    /// Modes that are acceptable.
    pub allowed_modes: Vec<AttestationMode>,
    /// How old a report may be, in seconds.
    pub max_age_secs: u64,
    /// Refuse a report whose signed runtime does not say the sandbox is
    /// enforced (or says nothing). Devices set this unless told otherwise.
    pub require_sandbox: bool,
    /// What hardware evidence is accepted (kinds, measurements, minimum
    /// security versions); consulted for the hardware modes in
    /// `allowed_modes`. `allowed_measurements` is software mode's list.
    pub hardware: HardwarePolicy,
}

impl AttestationPolicy {
    /// Why no report at all could pass this policy, if that is so: a
    /// configuration mistake that a device refuses before it starts rather
    /// than once per round.
    pub fn why_nothing_passes(&self) -> Option<String> {
        if self.allowed_modes.is_empty() {
            return Some(
                "no attestation mode is allowed (give a hardware policy, or allow software mode \
                 explicitly)"
                    .into(),
            );
        }
        if self.allowed_modes.contains(&AttestationMode::Software)
            && self.allowed_measurements.is_empty()
        {
            return Some(
                "software mode is allowed but no enclave measurement is, so no enclave can be \
                 trusted"
                    .into(),
            );
        }
        let accepts = |mode: &AttestationMode| {
            mode.tee_kind()
                .is_some_and(|kind| self.hardware.accepts(kind))
        };
        if let Some(mode) = self
            .allowed_modes
            .iter()
            .find(|mode| mode.tee_kind().is_some() && !accepts(mode))
        {
            return Some(format!(
                "{} mode is allowed but the hardware policy has no rules for it",
                mode.as_str()
            ));
        }
        self.hardware.first_trusting_nothing().map(|kind| {
            format!("the hardware policy accepts {kind} but its measurement allow-list is empty")
        })
    }
}

/// The enclave keys a verified report vouches for.
#[derive(Debug, Clone)]
pub struct VerifiedEnclave {
    /// Isolation mode.
    pub mode: AttestationMode,
    /// The trusted measurement.
    pub measurement: [u8; MEASUREMENT_LEN],
    /// Seal updates to this key.
    pub kem_public_key: KemPublicKey,
    /// Check global models against this key.
    pub verifying_key: VerifyingKey,
    /// When the report was made.
    pub issued_at: u64,
    /// How the process runs, as it signed.
    pub runtime: Option<EnclaveRuntime>,
    /// What the hardware evidence established (hardware modes only).
    pub evidence: Option<VerifiedEvidence>,
}

/// Checks a report against a policy: mode, measurement, nonce, age, keys,
/// hardware evidence (hardware modes) and signature.
pub fn verify_report(
    report: &AttestationReport,
    policy: &AttestationPolicy,
    expected_nonce: Option<&[u8; ATTESTATION_NONCE_LEN]>,
    now: u64,
) -> Result<VerifiedEnclave> {
    if report.version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(report.version));
    }
    if !policy.allowed_modes.contains(&report.mode) {
        return Err(ProtocolError::AttestationRefused("mode not permitted"));
    }
    let software = report.mode.tee_kind().is_none();
    if software
        && !policy
            .allowed_measurements
            .iter()
            .any(|m| crate::secret::ct_eq(m, &report.measurement))
    {
        return Err(ProtocolError::AttestationRefused(
            "measurement not on the allow-list",
        ));
    }
    if let Some(nonce) = expected_nonce
        && !crate::secret::ct_eq(nonce, &report.nonce)
    {
        return Err(ProtocolError::AttestationRefused("nonce does not match"));
    }
    // A little clock skew forward is tolerated; old reports are not.
    if report.issued_at > now.saturating_add(300) {
        return Err(ProtocolError::AttestationRefused("issued in the future"));
    }
    if now.saturating_sub(report.issued_at) > policy.max_age_secs {
        return Err(ProtocolError::Expired {
            expires_at: report.issued_at.saturating_add(policy.max_age_secs),
            now,
        });
    }
    if software && !report.evidence.is_empty() {
        return Err(ProtocolError::AttestationRefused(
            "software reports carry no evidence",
        ));
    }
    let body = ReportBody {
        mode: report.mode,
        measurement: report.measurement,
        kem_public_key: KemPublicKey::from_bytes(report.kem_suite, report.kem_public_key.clone())?,
        verifying_key: VerifyingKey::from_bytes(
            report.signature_suite,
            report.verifying_key.clone(),
        )?,
        nonce: report.nonce,
        issued_at: report.issued_at,
        evidence: report.evidence.clone(),
        runtime: report.runtime.clone(),
    };
    let evidence = match report.mode.tee_kind() {
        None => None,
        Some(kind) => Some(verify_evidence(&body, kind, policy, now)?),
    };
    body.verifying_key.verify(
        report_transcript(&body).as_bytes(),
        &report.signature,
        "attestation report",
    )?;
    // After the signature: only the enclave's own claim counts.
    if policy.require_sandbox && !body.runtime.as_ref().is_some_and(EnclaveRuntime::sandboxed) {
        return Err(ProtocolError::AttestationRefused(
            "the enclave's sandbox is off (seccomp not enforced)",
        ));
    }
    Ok(VerifiedEnclave {
        mode: body.mode,
        measurement: body.measurement,
        kem_public_key: body.kem_public_key,
        verifying_key: body.verifying_key,
        issued_at: body.issued_at,
        runtime: body.runtime,
        evidence,
    })
}

/// The hardware half of [`verify_report`]: the evidence must commit to the
/// report's keys, nonce and runtime (checked first, inside
/// `qflare_attest::verify`), be vouched for by its vendor at `now`, satisfy
/// the hardware policy, be of the report's kind, and have signed the
/// measurement the report states.
fn verify_evidence(
    body: &ReportBody,
    kind: TeeKind,
    policy: &AttestationPolicy,
    now: u64,
) -> Result<VerifiedEvidence> {
    if body.evidence.is_empty() {
        return Err(ProtocolError::AttestationRefused(
            "a hardware-mode report carries no evidence",
        ));
    }
    let binding = evidence_binding(
        body.mode,
        &body.kem_public_key,
        &body.verifying_key,
        &body.nonce,
        body.runtime.as_ref(),
    );
    let verified = qflare_attest::verify(&body.evidence, &policy.hardware, &binding, now)?;
    if verified.kind != kind {
        return Err(ProtocolError::AttestationRefused(
            "the evidence is of another TEE than the report's mode",
        ));
    }
    if !crate::secret::ct_eq(&verified.measurement, &body.measurement) {
        return Err(ProtocolError::AttestationRefused(
            "the report's measurement is not the one the hardware signed",
        ));
    }
    Ok(verified)
}
