//! `qflare attest verify FILE`: an auditor's offline check of enclave
//! attestation, with no server and no network.
//!
//! FILE may be any of the three places evidence travels:
//! - a model certificate (`NAME.cert.json` from `qflare model export`): the
//!   report of the enclave boot that signed the model is checked;
//! - an attestation report (JSON, as it reaches a device inside the sealed
//!   answer to `POST /v1/rounds/current`): signature, then for hardware
//!   modes the evidence, which must commit to the report's keys and nonce;
//! - bare evidence (`{"kind": "sev-snp" | "tdx" | "nitro", ...}`): the
//!   vendor's chain and the policy, printing the report data it carries
//!   (compared with `--report-data` when given).
//!
//! The verification time is `--at` (default: now), because vendor
//! certificates and Intel's collateral expire: evidence is judged as of
//! the time it was used, not of the audit.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use qflare_protocol::attestation::hardware::{self, Evidence, HardwarePolicy};
use qflare_protocol::attestation::{
    self, AttestationMode, AttestationPolicy, AttestationReport, VerifiedEnclave,
};
use qflare_server::federation::StoredCertificate;

/// Attestation subcommands.
#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Verify a model certificate's report, an attestation report or bare
    /// hardware evidence, offline.
    Verify(VerifyArgs),
}

/// `qflare attest verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A model certificate, an attestation report or hardware evidence (JSON).
    pub file: PathBuf,
    /// The hardware policy (YAML or JSON: `sev_snp`, `tdx`, `nitro`, each
    /// with its measurement allow-list; see docs/enclave.md). Without it no
    /// hardware evidence is accepted.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Software-mode measurements to accept (96 hex characters each);
    /// software reports are refused without one.
    #[arg(long = "measurement")]
    pub measurements: Vec<String>,
    /// Verify as of this time (RFC 3339, e.g. 2026-12-06T10:00:00Z, or Unix
    /// seconds); default: now. Reports are judged at the time they were
    /// made unless this is given.
    #[arg(long)]
    pub at: Option<String>,
    /// For bare evidence: the 64 report-data bytes (128 hex characters) it
    /// must carry.
    #[arg(long = "report-data")]
    pub report_data: Option<String>,
}

/// Runs an attestation subcommand.
pub fn run(command: &AttestCommand) -> anyhow::Result<()> {
    match command {
        AttestCommand::Verify(args) => verify(args),
    }
}

/// Reads a hardware policy file; none accepts no hardware evidence.
pub fn load_policy(path: Option<&Path>) -> anyhow::Result<HardwarePolicy> {
    let Some(path) = path else {
        return Ok(HardwarePolicy::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not a hardware policy", path.display()))
}

fn parse_time(text: &str) -> anyhow::Result<u64> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(seconds);
    }
    let time = humantime::parse_rfc3339_weak(text)
        .with_context(|| format!("--at {text:?}: expected RFC 3339 or Unix seconds"))?;
    Ok(time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the file turned out to be.
enum Input {
    Report(Box<AttestationReport>),
    Evidence(Evidence),
}

fn classify(bytes: &[u8], path: &Path) -> anyhow::Result<Input> {
    if let Ok(stored) = serde_json::from_slice::<StoredCertificate>(bytes) {
        return Ok(Input::Report(Box::new(stored.report)));
    }
    if let Ok(report) = serde_json::from_slice::<AttestationReport>(bytes) {
        return Ok(Input::Report(Box::new(report)));
    }
    if let Ok(evidence) = Evidence::from_bytes(bytes) {
        return Ok(Input::Evidence(evidence));
    }
    bail!(
        "{} is neither a model certificate, an attestation report nor hardware evidence",
        path.display()
    )
}

/// Verifies `args.file` and prints what it established.
pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let hardware_policy = load_policy(args.policy.as_deref())?;
    let at = args.at.as_deref().map(parse_time).transpose()?;
    match classify(&bytes, &args.file)? {
        Input::Report(report) => {
            let measurements = args
                .measurements
                .iter()
                .map(|text| attestation::parse_measurement(text).context("--measurement"))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let policy = AttestationPolicy {
                allowed_measurements: measurements,
                allowed_modes: AttestationMode::ALL.to_vec(),
                max_age_secs: u64::MAX,
                // Which enclave this was is the question; how it was
                // sandboxed is printed, not judged.
                require_sandbox: false,
                hardware: hardware_policy,
            };
            let when = at.unwrap_or(report.issued_at);
            let enclave = attestation::verify_report(&report, &policy, None, when)
                .context("the attestation report")?;
            print_enclave(&enclave, when);
        }
        Input::Evidence(evidence) => {
            let when = at.unwrap_or_else(now);
            let kind = evidence.kind();
            let (checked, report_data) = match &args.report_data {
                Some(text) => {
                    let mut expected = [0u8; hardware::REPORT_DATA_LEN];
                    hex::decode_to_slice(text.trim(), &mut expected)
                        .context("--report-data: expected 128 hex characters")?;
                    let verified = hardware::verify(&bytes, &hardware_policy, &expected, when)
                        .context("the hardware evidence")?;
                    let checked = hardware::Checked {
                        measurement: verified.measurement,
                        platform: verified.platform,
                    };
                    (checked, format!("{} (as expected)", hex::encode(expected)))
                }
                None => {
                    let checked = hardware::check(&evidence, &hardware_policy, when)
                        .context("the hardware evidence")?;
                    let claimed = evidence.claimed_report_data().map_or_else(
                        |_| "none of 64 bytes (so it commits to no QFLARE enclave)".to_owned(),
                        |data| format!("{} (not compared: no --report-data)", hex::encode(data)),
                    );
                    (checked, claimed)
                }
            };
            println!(
                "ok: {kind} evidence, measurement {}, as of {when} (Unix seconds)",
                hex::encode(checked.measurement)
            );
            println!("platform: {}", checked.platform);
            println!("report data: {report_data}");
            // Of the file's bytes: as a report carries them, they are what
            // the ledger's and certificates' hashes are over.
            println!(
                "evidence sha384: {}",
                hex::encode(hardware::evidence_sha384(&bytes))
            );
        }
    }
    Ok(())
}

fn print_enclave(enclave: &VerifiedEnclave, when: u64) {
    println!(
        "ok: {} mode enclave, measurement {}, report made at {} and verified as of {when} (Unix seconds)",
        enclave.mode.as_str(),
        hex::encode(enclave.measurement),
        enclave.issued_at,
    );
    match &enclave.evidence {
        Some(evidence) => {
            println!("platform: {}", evidence.platform);
            println!(
                "evidence sha384: {} (commits to this report's keys and nonce)",
                hex::encode(evidence.evidence_sha384)
            );
        }
        None => println!("no hardware evidence: the report is self-signed (software mode)"),
    }
    match &enclave.runtime {
        Some(runtime) => println!(
            "runtime: seccomp {}, no_new_privs {}, not_dumpable {}, memory_locked {}",
            runtime.seccomp.as_str(),
            runtime.no_new_privs,
            runtime.not_dumpable,
            runtime.memory_locked
        ),
        None => println!("runtime: not stated"),
    }
}
