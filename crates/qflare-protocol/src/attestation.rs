//! Enclave attestation reports and their verification.
//!
//! A report binds the enclave's *measurement* (SHA-384 of its executable),
//! its per-boot KEM and signing keys, the verifier's nonce and the time, and
//! is signed by the enclave's key. In `software` mode that signature is all
//! there is: it proves the report is internally consistent and fresh, but a
//! host that controls the machine could run a different binary and claim any
//! measurement. Hardware modes (SGX, TDX, SEV-SNP, Nitro) would add vendor
//! evidence rooted outside the host, carried in `evidence`; a verifier for
//! them plugs in beside [`verify_report`] without changing the report format.
//! Devices may therefore refuse software mode by policy.

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
}

impl AttestationMode {
    /// The wire and configuration identifier.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Software => "software",
        }
    }
}

impl std::str::FromStr for AttestationMode {
    type Err = ProtocolError;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "software" => Ok(Self::Software),
            _ => Err(ProtocolError::malformed("attestation mode", "unknown mode")),
        }
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
}

/// Checks a report against a policy: mode, measurement, nonce, age, keys and signature.
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
    if !policy
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
    if report.mode == AttestationMode::Software && !report.evidence.is_empty() {
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kem::KemKeyPair;
    use rand::SeedableRng;

    #[test]
    fn measurements_parse_from_hex() {
        let hex = "Ab".repeat(MEASUREMENT_LEN);
        assert_eq!(parse_measurement(&format!(" {hex}\n")).unwrap(), [0xab; 48]);
        assert!(parse_measurement(&hex[2..]).is_err());
        assert!(parse_measurement(&"zz".repeat(MEASUREMENT_LEN)).is_err());
    }

    fn report(nonce: [u8; 32], issued_at: u64) -> (AttestationReport, AttestationPolicy) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(31);
        let kem = KemKeyPair::generate(KemSuite::MlKem768, &mut rng).unwrap();
        let sig = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
        let body = ReportBody {
            mode: AttestationMode::Software,
            measurement: [7; 48],
            kem_public_key: kem.public,
            verifying_key: sig.verifying_key().clone(),
            nonce,
            issued_at,
            evidence: vec![],
            runtime: Some(EnclaveRuntime {
                seccomp: SeccompState::Enforce,
                no_new_privs: true,
                not_dumpable: true,
                no_core_files: true,
                memory_locked: false,
                arguments: vec!["--threads".into(), "1".into()],
                root_data_sha256: None,
            }),
        };
        let policy = AttestationPolicy {
            allowed_measurements: vec![[7; 48]],
            allowed_modes: vec![AttestationMode::Software],
            max_age_secs: 3600,
            require_sandbox: true,
        };
        (sign_report(&body, &sig).unwrap(), policy)
    }

    #[test]
    fn accepts_matching_report() {
        let (r, policy) = report([1; 32], 1000);
        let verified = verify_report(&r, &policy, Some(&[1; 32]), 1010).unwrap();
        assert_eq!(verified.measurement, [7; 48]);
    }

    #[test]
    fn refuses_wrong_measurement_nonce_mode_age_and_tampering() {
        let (r, policy) = report([1; 32], 1000);
        let mut wrong_measurement = policy.clone();
        wrong_measurement.allowed_measurements = vec![[8; 48]];
        assert!(matches!(
            verify_report(&r, &wrong_measurement, None, 1000),
            Err(ProtocolError::AttestationRefused(_))
        ));
        assert!(matches!(
            verify_report(&r, &policy, Some(&[2; 32]), 1000),
            Err(ProtocolError::AttestationRefused(_))
        ));
        let mut no_software = policy.clone();
        no_software.allowed_modes.clear();
        assert!(matches!(
            verify_report(&r, &no_software, None, 1000),
            Err(ProtocolError::AttestationRefused(_))
        ));
        assert!(matches!(
            verify_report(&r, &policy, None, 10_000),
            Err(ProtocolError::Expired { .. })
        ));
        let mut claimed = r.clone();
        claimed.measurement = [9; 48];
        let mut lenient = policy.clone();
        lenient.allowed_measurements.push([9; 48]);
        assert!(matches!(
            verify_report(&claimed, &lenient, None, 1000),
            Err(ProtocolError::BadSignature(_))
        ));
    }

    fn signed_with(runtime: Option<EnclaveRuntime>) -> AttestationReport {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(32);
        let kem = KemKeyPair::generate(KemSuite::MlKem768, &mut rng).unwrap();
        let sig = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
        let body = ReportBody {
            mode: AttestationMode::Software,
            measurement: [7; 48],
            kem_public_key: kem.public,
            verifying_key: sig.verifying_key().clone(),
            nonce: [1; 32],
            issued_at: 1000,
            evidence: vec![],
            runtime,
        };
        sign_report(&body, &sig).unwrap()
    }

    #[test]
    fn an_unsandboxed_enclave_is_refused_unless_allowed() {
        let (_, policy) = report([1; 32], 1000);
        let mut lenient = policy.clone();
        lenient.require_sandbox = false;
        let mut log_only = report([1; 32], 1000).0.runtime.unwrap();
        log_only.seccomp = SeccompState::Log;
        for runtime in [None, Some(log_only), Some(EnclaveRuntime::unhardened())] {
            let r = signed_with(runtime.clone());
            assert!(
                matches!(
                    verify_report(&r, &policy, None, 1000),
                    Err(ProtocolError::AttestationRefused(m)) if m.contains("sandbox")
                ),
                "{runtime:?}"
            );
            let verified = verify_report(&r, &lenient, None, 1000).unwrap();
            assert_eq!(verified.runtime, runtime);
        }
    }

    #[test]
    fn the_runtime_is_signed() {
        let (sandboxed, policy) = report([1; 32], 1000);
        assert!(verify_report(&sandboxed, &policy, None, 1000).is_ok());
        let mut lenient = policy.clone();
        lenient.require_sandbox = false;
        let edits: [fn(&mut EnclaveRuntime); 5] = [
            |r| r.seccomp = SeccompState::Log,
            |r| r.memory_locked = true,
            |r| r.arguments.push("--seccomp".into()),
            |r| r.arguments[1] = "2".into(),
            |r| r.root_data_sha256 = Some("00".repeat(32)),
        ];
        for edit in edits {
            let mut altered = sandboxed.clone();
            edit(altered.runtime.as_mut().unwrap());
            assert!(
                matches!(
                    verify_report(&altered, &lenient, None, 1000),
                    Err(ProtocolError::BadSignature(_))
                ),
                "{:?}",
                altered.runtime
            );
        }
        // Stripping the runtime does not make an old-style report either.
        let mut stripped = sandboxed.clone();
        stripped.runtime = None;
        assert!(matches!(
            verify_report(&stripped, &lenient, None, 1000),
            Err(ProtocolError::BadSignature(_))
        ));
        // A sandboxed log-mode claim cannot be made by editing the mode back.
        let log_signed = {
            let mut runtime = sandboxed.runtime.clone().unwrap();
            runtime.seccomp = SeccompState::Log;
            signed_with(Some(runtime))
        };
        let mut relabelled = log_signed;
        relabelled.runtime.as_mut().unwrap().seccomp = SeccompState::Enforce;
        assert!(matches!(
            verify_report(&relabelled, &policy, None, 1000),
            Err(ProtocolError::BadSignature(_))
        ));
    }
}
