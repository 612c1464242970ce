//! What a device's per-round attestation check costs with hardware evidence,
//! against what it costs today: `verify_report` on a software-mode report
//! (one ML-DSA-65 verification and the policy checks) as the yardstick, and
//! each vendor verifier on the published evidence under
//! `$QFLARE_VECTORS_DIR/attestation/` at a time inside its validity. The two
//! sides of each row are timed in interleaved batches in one run and the
//! medians compared, since this machine is shared and noisy.
//!
//! `cargo bench -p qflare-protocol --bench attestation`

mod common;

use std::path::PathBuf;

use common::interleaved;

use qflare_protocol::attestation::hardware::{
    self, Digest48, NitroEvidence, NitroPolicy, SevSnpEvidence, SevSnpPolicy, TdxEvidence,
    TdxPolicy,
};
use qflare_protocol::attestation::{
    AttestationMode, AttestationPolicy, EnclaveRuntime, ReportBody, SeccompState, sign_report,
    verify_report,
};
use qflare_protocol::kem::KemKeyPair;
use qflare_protocol::sig::SigningKey;
use qflare_protocol::{KemSuite, SignatureSuite};
use rand::SeedableRng;

/// A verifier for a software-mode report: the check a device runs each round today.
fn software_check() -> impl FnMut() {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let kem = KemKeyPair::generate(KemSuite::MlKem768, &mut rng).expect("ML-KEM key");
    let signing = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).expect("ML-DSA key");
    let runtime = EnclaveRuntime {
        seccomp: SeccompState::Enforce,
        no_new_privs: true,
        not_dumpable: true,
        no_core_files: true,
        memory_locked: true,
        arguments: vec!["--threads".into(), "1".into()],
        root_data_sha256: None,
    };
    let body = ReportBody {
        mode: AttestationMode::Software,
        measurement: [7; 48],
        kem_public_key: kem.public,
        verifying_key: signing.verifying_key().clone(),
        nonce: [1; 32],
        issued_at: 1_000,
        evidence: Vec::new(),
        runtime: Some(runtime),
    };
    let report = sign_report(&body, &signing).expect("signed report");
    let policy = AttestationPolicy {
        allowed_measurements: vec![[7; 48]],
        allowed_modes: vec![AttestationMode::Software],
        max_age_secs: 600,
        require_sandbox: true,
        hardware: Default::default(),
    };
    move || {
        verify_report(&report, &policy, Some(&[1; 32]), 1_000)
            .expect("the software report verifies");
    }
}

fn main() {
    let Some(root) = std::env::var_os("QFLARE_VECTORS_DIR") else {
        println!("SKIP: set QFLARE_VECTORS_DIR to the folder holding attestation/");
        return;
    };
    let dir = PathBuf::from(root).join("attestation");
    let read = |file: &str| std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));

    let report = hex::decode(String::from_utf8_lossy(&read("sev-snp/report_milan.hex")).trim())
        .expect("hex report");
    let snp_policy = SevSnpPolicy::trusting(vec![Digest48(
        report[0x90..0xC0].try_into().expect("48 bytes"),
    )]);
    let snp = SevSnpEvidence {
        report,
        vcek: read("sev-snp/vcek_milan.der"),
    };
    let tdx = TdxEvidence {
        quote: read("tdx-sgx/tdx_quote"),
        collateral: serde_json::from_slice(&read("tdx-sgx/tdx_quote_collateral.json"))
            .expect("collateral JSON"),
    };
    let tdx_now = 1_750_809_600; // 2025-06-25T00:00:00Z, inside the collateral window
    let mr_td = hardware::tdx::verify_quote(&tdx.quote, &tdx.collateral, tdx_now)
        .expect("the TDX sample verifies")
        .report
        .as_td10()
        .expect("a TD report")
        .mr_td;
    let tdx_policy = TdxPolicy::trusting(vec![Digest48(mr_td)]);
    let nitro = NitroEvidence {
        document: read("nitro/beta-valid-attestation-doc-bytes"),
    };
    let nitro_now = 1_665_651_600; // 2022-10-13T09:00:00Z, inside the leaf's three hours
    let pcr0 = hardware::nitro::authenticate(&nitro.document, nitro_now)
        .expect("the Nitro sample verifies")
        .pcr(0)
        .expect("PCR0")
        .to_vec();
    let nitro_policy = NitroPolicy::trusting(vec![Digest48(pcr0.try_into().expect("48 bytes"))]);

    println!("| evidence (verifier) | hardware check | software report check | ratio |");
    println!("|---|--:|--:|--:|");
    let snp_now = 1_748_736_000; // 2025-06-01T00:00:00Z, inside the VCEK's validity
    type Check<'a> = Box<dyn FnMut() + 'a>;
    let rows: [(&str, Check<'_>, u32); 3] = [
        (
            "SEV-SNP Milan report + VCEK (sev, aws-lc-rs)",
            Box::new(|| {
                hardware::sev_snp::verify(&snp, &snp_policy, snp_now).expect("SNP verifies");
            }),
            20,
        ),
        (
            "TDX quote + collateral (dcap-qvl, RustCrypto)",
            Box::new(|| {
                hardware::tdx::verify(&tdx, &tdx_policy, tdx_now).expect("TDX verifies");
            }),
            20,
        ),
        (
            "Nitro document (coset, webpki, aws-lc-rs)",
            Box::new(|| {
                hardware::nitro::verify(&nitro, &nitro_policy, nitro_now).expect("Nitro verifies");
            }),
            50,
        ),
    ];
    for (label, mut check, batch) in rows {
        let (hardware_time, software_time) = interleaved(&mut check, software_check(), batch, 31);
        println!(
            "| {label} | {:.0} µs | {:.0} µs | {:.1}x |",
            hardware_time.as_secs_f64() * 1e6,
            software_time.as_secs_f64() * 1e6,
            hardware_time.as_secs_f64() / software_time.as_secs_f64()
        );
    }
}
