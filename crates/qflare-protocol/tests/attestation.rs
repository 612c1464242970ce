//! Attestation reports: what `verify_report` accepts and refuses, in
//! software mode (measurement, nonce, mode, age, signature, the signed
//! runtime) and in the hardware modes, where the evidence must commit to the
//! report's keys, nonce, mode and runtime before anything else about it is
//! believed. The vendor verifiers themselves are tested in `qflare-attest`
//! against published evidence.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

use qflare_protocol::ProtocolError;
use qflare_protocol::attestation::hardware::{self as qflare_attest, HardwarePolicy};
use qflare_protocol::attestation::*;
use qflare_protocol::kem::KemKeyPair;
use qflare_protocol::sig::SigningKey;
use qflare_protocol::{KemSuite, SignatureSuite};
use rand::SeedableRng;

#[test]
fn measurements_parse_from_hex() {
    let hex = "Ab".repeat(MEASUREMENT_LEN);
    assert_eq!(parse_measurement(&format!(" {hex}\n")).unwrap(), [0xab; 48]);
    assert!(parse_measurement(&hex[2..]).is_err());
    assert!(parse_measurement(&"zz".repeat(MEASUREMENT_LEN)).is_err());
}

/// A report body of `mode` over fresh keys (from `seed`), with the signing
/// key that must sign it.
fn body(
    seed: u64,
    mode: AttestationMode,
    nonce: [u8; 32],
    issued_at: u64,
    runtime: Option<EnclaveRuntime>,
) -> (ReportBody, SigningKey) {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let kem = KemKeyPair::generate(KemSuite::MlKem768, &mut rng).unwrap();
    let sig = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
    let body = ReportBody {
        mode,
        measurement: [7; 48],
        kem_public_key: kem.public,
        verifying_key: sig.verifying_key().clone(),
        nonce,
        issued_at,
        evidence: vec![],
        runtime,
    };
    (body, sig)
}

fn report(nonce: [u8; 32], issued_at: u64) -> (AttestationReport, AttestationPolicy) {
    let sandboxed = EnclaveRuntime {
        seccomp: SeccompState::Enforce,
        no_new_privs: true,
        not_dumpable: true,
        no_core_files: true,
        memory_locked: false,
        arguments: vec!["--threads".into(), "1".into()],
        root_data_sha256: None,
    };
    let (body, sig) = body(
        31,
        AttestationMode::Software,
        nonce,
        issued_at,
        Some(sandboxed),
    );
    let policy = AttestationPolicy {
        allowed_measurements: vec![[7; 48]],
        allowed_modes: vec![AttestationMode::Software],
        max_age_secs: 3600,
        require_sandbox: true,
        hardware: HardwarePolicy::default(),
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
    let (body, sig) = body(32, AttestationMode::Software, [1; 32], 1000, runtime);
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
/// A report in SEV-SNP mode around a 1,184-byte report whose report-data
/// field holds `report_data`, with an unusable VCEK: verification can
/// only get as far as the binding check, or past it to the VCEK.
fn snp_mode_report(report_data: impl FnOnce(&ReportBody) -> [u8; 64]) -> AttestationReport {
    let runtime = Some(EnclaveRuntime::unhardened());
    let (mut body, sig) = body(33, AttestationMode::SevSnp, [1; 32], 1000, runtime);
    let mut snp_report = vec![0u8; qflare_attest::sev_snp::REPORT_LEN];
    snp_report[0] = 2; // report version 2
    snp_report[0x50..0x90].copy_from_slice(&report_data(&body));
    body.evidence = qflare_attest::Evidence::SevSnp(qflare_attest::SevSnpEvidence {
        report: snp_report,
        vcek: b"not a certificate".to_vec(),
    })
    .to_bytes();
    sign_report(&body, &sig).unwrap()
}

fn snp_policy() -> AttestationPolicy {
    AttestationPolicy {
        allowed_measurements: vec![],
        allowed_modes: vec![AttestationMode::SevSnp],
        max_age_secs: 3600,
        require_sandbox: false,
        hardware: HardwarePolicy {
            sev_snp: Some(qflare_attest::SevSnpPolicy::trusting(vec![
                qflare_attest::Digest48([7; 48]),
            ])),
            ..HardwarePolicy::default()
        },
    }
}

#[test]
fn evidence_committing_to_other_keys_is_refused_before_anything_else() {
    // Committing to another nonce, another key, or nothing at all: the
    // binding fails first, although the VCEK would fail too.
    let other_nonce = snp_mode_report(|body| {
        evidence_binding(
            body.mode,
            &body.kem_public_key,
            &body.verifying_key,
            &[2; 32],
            body.runtime.as_ref(),
        )
    });
    let other_mode = snp_mode_report(|body| {
        evidence_binding(
            AttestationMode::Tdx,
            &body.kem_public_key,
            &body.verifying_key,
            &body.nonce,
            body.runtime.as_ref(),
        )
    });
    let no_runtime = snp_mode_report(|body| {
        evidence_binding(
            body.mode,
            &body.kem_public_key,
            &body.verifying_key,
            &body.nonce,
            None,
        )
    });
    let zeros = snp_mode_report(|_| [0; 64]);
    for report in [other_nonce, other_mode, no_runtime, zeros] {
        assert_eq!(
            verify_report(&report, &snp_policy(), None, 1000).unwrap_err(),
            ProtocolError::Evidence(qflare_attest::AttestError::BindingMismatch)
        );
    }
    // With the right commitment the verifier moves on, to the VCEK.
    let bound = snp_mode_report(|body| {
        evidence_binding(
            body.mode,
            &body.kem_public_key,
            &body.verifying_key,
            &body.nonce,
            body.runtime.as_ref(),
        )
    });
    assert!(matches!(
        verify_report(&bound, &snp_policy(), None, 1000),
        Err(ProtocolError::Evidence(
            qflare_attest::AttestError::Malformed {
                what: "VCEK certificate",
                ..
            }
        ))
    ));
    // Hardware modes need evidence, and the policy must accept the mode.
    let mut empty = bound.clone();
    empty.evidence.clear();
    assert!(matches!(
        verify_report(&empty, &snp_policy(), None, 1000),
        Err(ProtocolError::AttestationRefused(m)) if m.contains("no evidence")
    ));
    let mut software_only = snp_policy();
    software_only.allowed_modes = vec![AttestationMode::Software];
    assert!(matches!(
        verify_report(&bound, &software_only, None, 1000),
        Err(ProtocolError::AttestationRefused("mode not permitted"))
    ));
}

#[test]
fn modes_parse_from_their_names() {
    for mode in AttestationMode::ALL {
        assert_eq!(mode.as_str().parse::<AttestationMode>().unwrap(), mode);
        assert_eq!(
            mode.tee_kind().map(|k| k.as_str()).unwrap_or("software"),
            mode.as_str()
        );
        if let Some(kind) = mode.tee_kind() {
            assert_eq!(AttestationMode::of_tee(kind), mode);
        }
    }
    assert!("sgx".parse::<AttestationMode>().is_err());
}

#[test]
fn a_policy_that_no_report_can_pass_says_why() {
    let (_, software) = report([1; 32], 1000);
    assert_eq!(software.why_nothing_passes(), None);
    type Edit = fn(&mut AttestationPolicy);
    let edits: [(&str, Edit); 4] = [
        ("no attestation mode", |p| p.allowed_modes.clear()),
        ("no enclave measurement", |p| p.allowed_measurements.clear()),
        ("no rules for it", |p| {
            p.allowed_modes.push(AttestationMode::Tdx)
        }),
        ("allow-list is empty", |p| {
            p.allowed_modes = vec![AttestationMode::SevSnp];
            p.hardware.sev_snp = Some(qflare_attest::SevSnpPolicy::trusting(vec![]));
        }),
    ];
    for (why, edit) in edits {
        let mut policy = software.clone();
        edit(&mut policy);
        let said = policy.why_nothing_passes().unwrap_or_default();
        assert!(said.contains(why), "{why}: {said}");
    }
    // Hardware only, trusting one measurement: fine without software ones.
    let mut hardware_only = snp_policy();
    hardware_only.allowed_measurements.clear();
    assert_eq!(hardware_only.why_nothing_passes(), None);
}
