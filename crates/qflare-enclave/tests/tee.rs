//! `qflare-enclave --tee KIND` on a machine that is not that TEE: the real
//! process must refuse to start, before it serves anything, and say what is
//! missing. (Evidence from real hardware is verified in qflare-attest's
//! tests; producing it needs the hardware, which CI does not have.)

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Exit code of an enclave whose `--tee` cannot give evidence.
const NO_TEE: i32 = 6;
/// Exit code of a command-line mistake.
const USAGE: i32 = 64;

fn enclave(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qflare-enclave"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn refused(args: &[&str], code: i32, says: &[&str]) -> String {
    let output = enclave(args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
    for words in says {
        assert!(
            stderr.contains(words),
            "{args:?} should say {words:?}: {stderr}"
        );
    }
    // Nothing was served: no frame on stdout.
    assert!(output.stdout.is_empty(), "{args:?} wrote to stdout");
    stderr
}

#[test]
fn sev_snp_without_the_guest_device_refuses_to_start() {
    if Path::new("/dev/sev-guest").exists() {
        return;
    }
    refused(&["--tee", "sev-snp"], NO_TEE, &["/dev/sev-guest"]);
    // A VCEK file that cannot be read is named before the device is tried.
    refused(
        &["--tee", "sev-snp", "--vcek", "/nonexistent/vcek.der"],
        NO_TEE,
        &["/nonexistent/vcek.der"],
    );
}

#[test]
fn nitro_outside_an_enclave_refuses_to_start() {
    if Path::new("/dev/nsm").exists() {
        return;
    }
    refused(&["--tee", "nitro"], NO_TEE, &["/dev/nsm"]);
}

#[test]
fn tdx_needs_its_collateral_and_a_tsm() {
    refused(&["--tee", "tdx"], NO_TEE, &["--tdx-collateral"]);
    refused(
        &["--tee", "tdx", "--tdx-collateral", "/nonexistent/c.json"],
        NO_TEE,
        &["/nonexistent/c.json"],
    );
    let Some(collateral) = vectors_file("tdx-sgx/tdx_quote_collateral.json") else {
        return;
    };
    // A plain directory where configfs-tsm would be: the sandboxed helper
    // process makes its entry, finds no TSM provider there, removes the
    // entry and says so; the enclave stops.
    let root = std::env::temp_dir().join(format!("qflare-tee-test-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let stderr = refused(
        &[
            "--tee",
            "tdx",
            "--tdx-collateral",
            collateral.to_str().unwrap(),
            "--tsm-root",
            root.to_str().unwrap(),
        ],
        NO_TEE,
        &["provider"],
    );
    // The helper's own sandbox allowed every call the request made.
    assert!(!stderr.contains("Operation not permitted"), "{stderr}");
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "entry left");
    std::fs::remove_dir(&root).unwrap();
}

#[test]
fn tee_options_are_checked() {
    refused(&["--tee", "sgx"], USAGE, &["sev-snp, tdx, nitro"]);
    refused(&["--vcek", "x.der"], USAGE, &["needs --tee"]);
    refused(&["--tee"], USAGE, &["needs a value"]);
}

/// A file under `$QFLARE_VECTORS_DIR/attestation/`, or `None` (after saying
/// why) when the vectors are absent and not required.
fn vectors_file(name: &str) -> Option<PathBuf> {
    let required = std::env::var("QFLARE_REQUIRE_VECTORS").is_ok_and(|v| v == "1");
    match std::env::var_os("QFLARE_VECTORS_DIR") {
        Some(root) => Some(PathBuf::from(root).join("attestation").join(name)),
        None => {
            assert!(
                !required,
                "QFLARE_REQUIRE_VECTORS=1 but QFLARE_VECTORS_DIR is not set"
            );
            eprintln!("SKIP: QFLARE_VECTORS_DIR is not set");
            None
        }
    }
}
