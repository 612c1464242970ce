//! `qflare attest verify` as an auditor runs it: the real binary, no server,
//! no configuration, real hardware evidence from
//! `$QFLARE_VECTORS_DIR/attestation/` (the README there gives provenance),
//! and a policy file written as an operator would; and `qflare enclave
//! measure`, which says what to pin.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qflare_protocol::attestation::hardware::{Evidence, NitroEvidence, SevSnpEvidence};

const QFLARE: &str = env!("CARGO_BIN_EXE_qflare");

/// The attestation vectors, or `None` (after saying why) when they are absent
/// and `QFLARE_REQUIRE_VECTORS` is not `1`.
fn vectors(test: &str) -> Option<PathBuf> {
    let required = std::env::var("QFLARE_REQUIRE_VECTORS").is_ok_and(|v| v == "1");
    let why = match std::env::var_os("QFLARE_VECTORS_DIR") {
        None => "QFLARE_VECTORS_DIR is not set".to_owned(),
        Some(root) => {
            let dir = PathBuf::from(root).join("attestation");
            if dir.is_dir() {
                return Some(dir);
            }
            format!("{} is not a directory", dir.display())
        }
    };
    assert!(!required, "{test}: QFLARE_REQUIRE_VECTORS=1 but {why}");
    eprintln!("SKIP {test}: {why}");
    None
}

/// `qflare attest verify ARGS` in an empty directory with a clean environment.
fn attest_verify(workdir: &Path, args: &[&str]) -> Output {
    Command::new(QFLARE)
        .env_clear()
        .env("RUST_LOG", "warn")
        .current_dir(workdir)
        .args(["attest", "verify"])
        .args(args)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn an_auditor_verifies_snp_and_nitro_evidence_offline() {
    let Some(vectors) = vectors("an_auditor_verifies_snp_and_nitro_evidence_offline") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();

    let report = hex::decode(
        std::fs::read_to_string(vectors.join("sev-snp/report_milan.hex"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let measurement = hex::encode(&report[0x90..0xC0]);
    let report_data = hex::encode(&report[0x50..0x90]);
    let snp = Evidence::SevSnp(SevSnpEvidence {
        report,
        vcek: std::fs::read(vectors.join("sev-snp/vcek_milan.der")).unwrap(),
    });
    std::fs::write(dir.join("snp.json"), snp.to_bytes()).unwrap();
    std::fs::write(
        dir.join("policy.yaml"),
        format!("sev_snp:\n  measurements: [\"{measurement}\"]\n  min_tcb: {{snp: 1}}\n"),
    )
    .unwrap();

    let at = ["--at", "2025-06-01T00:00:00Z"];
    // The SNP evidence under the operator's policy at a valid time, plus `extra`.
    let snp = |extra: &[&str]| {
        let mut args = vec!["snp.json", "--policy", "policy.yaml", at[0], at[1]];
        args.extend_from_slice(extra);
        attest_verify(dir, &args)
    };
    let ok = snp(&[]);
    assert!(ok.status.success(), "{}", text(&ok));
    let out = text(&ok);
    assert!(out.contains("ok: sev-snp evidence"), "{out}");
    assert!(out.contains(&measurement), "{out}");
    assert!(out.contains("AMD Milan"), "{out}");
    assert!(out.contains("not compared"), "{out}");
    assert!(out.contains(&report_data), "{out}");

    // With the report data the auditor expects, and with another.
    let matching = snp(&["--report-data", &report_data]);
    assert!(matching.status.success(), "{}", text(&matching));
    assert!(text(&matching).contains("(as expected)"));
    let other = snp(&["--report-data", &"00".repeat(64)]);
    assert!(!other.status.success());
    assert!(text(&other).contains("does not commit"), "{}", text(&other));

    // No policy, a policy that does not list the measurement, an expired VCEK.
    let no_policy = attest_verify(dir, &["snp.json", at[0], at[1]]);
    assert!(!no_policy.status.success());
    assert!(
        text(&no_policy).contains("not accepted by this policy"),
        "{}",
        text(&no_policy)
    );
    std::fs::write(
        dir.join("other.yaml"),
        format!("sev_snp:\n  measurements: [\"{}\"]\n", "ab".repeat(48)),
    )
    .unwrap();
    let unlisted = attest_verify(dir, &["snp.json", "--policy", "other.yaml", at[0], at[1]]);
    assert!(!unlisted.status.success());
    assert!(
        text(&unlisted).contains("MEASUREMENT"),
        "{}",
        text(&unlisted)
    );
    let expired = attest_verify(
        dir,
        &[
            "snp.json",
            "--policy",
            "policy.yaml",
            "--at",
            "2031-01-01T00:00:00Z",
        ],
    );
    assert!(!expired.status.success());
    assert!(
        text(&expired).contains("VCEK certificate is valid from"),
        "{}",
        text(&expired)
    );

    // A Nitro document from an enclave in debug mode: vouched for by AWS, refused.
    let nitro_text =
        std::fs::read_to_string(vectors.join("nitro/valid-attestation-doc-base64")).unwrap();
    let nitro = Evidence::Nitro(NitroEvidence {
        document: base64_decode(nitro_text.trim()),
    });
    std::fs::write(dir.join("nitro.json"), nitro.to_bytes()).unwrap();
    std::fs::write(
        dir.join("nitro.yaml"),
        format!("nitro:\n  pcr0: [\"{}\"]\n", "00".repeat(48)),
    )
    .unwrap();
    let debug = attest_verify(
        dir,
        &[
            "nitro.json",
            "--policy",
            "nitro.yaml",
            "--at",
            "2023-09-18T15:16:05Z",
        ],
    );
    assert!(!debug.status.success());
    assert!(text(&debug).contains("debug mode"), "{}", text(&debug));

    // Not evidence at all, and a policy with a typo.
    std::fs::write(dir.join("junk.json"), b"{\"kind\": \"sgx\"}").unwrap();
    let junk = attest_verify(dir, &["junk.json"]);
    assert!(!junk.status.success());
    assert!(
        text(&junk).contains("neither a model certificate"),
        "{}",
        text(&junk)
    );
    std::fs::write(dir.join("typo.yaml"), "sev_snp:\n  measurement: []\n").unwrap();
    let typo = attest_verify(dir, &["snp.json", "--policy", "typo.yaml"]);
    assert!(!typo.status.success());
    assert!(
        text(&typo).contains("is not a hardware policy"),
        "{}",
        text(&typo)
    );
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

#[test]
fn an_auditor_verifies_a_software_report_against_a_pinned_measurement() {
    use qflare_protocol::attestation::{AttestationMode, ReportBody, sign_report};
    use qflare_protocol::kem::KemKeyPair;
    use qflare_protocol::sig::SigningKey;
    use qflare_protocol::{KemSuite, SignatureSuite};
    use rand::SeedableRng;

    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let kem = KemKeyPair::generate(KemSuite::MlKem768, &mut rng).unwrap();
    let signing = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
    let report = sign_report(
        &ReportBody {
            mode: AttestationMode::Software,
            measurement: [0x42; 48],
            kem_public_key: kem.public,
            verifying_key: signing.verifying_key().clone(),
            nonce: [3; 32],
            issued_at: 1_800_000_000,
            evidence: Vec::new(),
            runtime: None,
        },
        &signing,
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_vec(&report).unwrap(),
    )
    .unwrap();

    let pinned = "42".repeat(48);
    let ok = attest_verify(dir, &["report.json", "--measurement", &pinned]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        text(&ok).contains("ok: software mode enclave"),
        "{}",
        text(&ok)
    );
    assert!(text(&ok).contains("self-signed"), "{}", text(&ok));

    let unpinned = attest_verify(dir, &["report.json"]);
    assert!(!unpinned.status.success());
    assert!(
        text(&unpinned).contains("measurement not on the allow-list"),
        "{}",
        text(&unpinned)
    );

    let mut forged = report.clone();
    forged.measurement = [0x43; 48];
    std::fs::write(
        dir.join("forged.json"),
        serde_json::to_vec(&forged).unwrap(),
    )
    .unwrap();
    let refused = attest_verify(dir, &["forged.json", "--measurement", &"43".repeat(48)]);
    assert!(!refused.status.success());
}

#[test]
fn enclave_measure_prints_what_devices_pin() {
    let work = tempfile::tempdir().unwrap();
    let output = Command::new(QFLARE)
        .env_clear()
        .current_dir(work.path())
        .args(["enclave", "measure"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let out = String::from_utf8_lossy(&output.stdout);
    // `qflare enclave` runs this very file, so it reports this digest.
    let expected = hex::encode(qflare_enclave::backend::measure_file(Path::new(QFLARE)).unwrap());
    let software = out.lines().find(|l| l.starts_with("software")).unwrap();
    assert!(software.contains(&expected), "{out}");
    for mode in ["sev-snp", "tdx", "nitro"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(mode) && l.contains("not computable")),
            "{out}"
        );
    }
    let extra = Command::new(QFLARE)
        .env_clear()
        .args(["enclave", "measure", "--now"])
        .output()
        .unwrap();
    assert!(!extra.status.success());
}
