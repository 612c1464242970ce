//! TDX quotes through the kernel's configfs-tsm report interface (Linux 6.7
//! and later), from a helper process.
//!
//! configfs-tsm is a directory per request: `mkdir` an entry under
//! `/sys/kernel/config/tsm/report`, write the 64 report-data bytes to its
//! `inblob`, read the quote from `outblob`, check `generation` (the number
//! of writes: another writer in our entry would show here), `rmdir`. configfs
//! commits a write when the file is closed and fills a read once per open,
//! so every request opens files, which the enclave's sandbox forbids.
//!
//! Hence the helper: before its sandbox closes the enclave starts this same
//! executable as `... tsm-report --provider tdx_guest --root DIR` with pipes
//! for stdin and stdout, and afterwards only writes 64 bytes and reads the
//! answer. The helper has its own seccomp filter: the file calls this needs,
//! and the same fatal list as the enclave (no `execve`, no sockets, no
//! `ptrace`). It holds no secret and accepts nothing but 64-byte requests,
//! so a compromised enclave gains through it only what it could ask the TEE
//! itself: evidence for report data of its choosing.
//!
//! Answers on the pipe: one status byte (0 ok, 1 failed), then a 32-bit
//! big-endian length and that many bytes (the quote, or the failure message).

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};

use qflare_protocol::attestation::hardware::{Evidence, TdxEvidence, TeeKind};

use super::{EvidenceSource, HelperCommand, REPORT_DATA_LEN, TeeError, TeeOptions};
use crate::sandbox::{self, DeviceIoctl, SeccompMode};

const KIND: TeeKind = TeeKind::Tdx;
/// The helper's first argument after the enclave's prefix.
pub const HELPER_ARGUMENT: &str = "tsm-report";
/// configfs-tsm's name for the TDX provider.
const TDX_PROVIDER: &str = "tdx_guest";
/// Longest answer accepted from the helper: TDX quotes are a few KiB.
const MAX_ANSWER: usize = 1 << 20;

/// The enclave's side: the helper process and Intel's collateral.
pub(crate) struct TdxSource {
    // Held, never waited for: the helper ends when its stdin closes, which
    // happens when this process ends (the sandbox forbids `wait4` anyway).
    _helper: Child,
    requests: BufWriter<ChildStdin>,
    answers: BufReader<ChildStdout>,
    collateral: Box<dcap_qvl::QuoteCollateralV3>,
}

impl TdxSource {
    pub(crate) fn open(options: &TeeOptions, helper: &HelperCommand) -> Result<Self, TeeError> {
        let Some(path) = &options.tdx_collateral else {
            return Err(TeeError::device(
                KIND,
                "--tdx-collateral FILE is required: Intel's collateral for this platform \
                 (from a PCCS or Intel's PCS), which travels with every quote",
            ));
        };
        let text = std::fs::read(path).map_err(|err| {
            TeeError::device(KIND, format!("cannot read {}: {err}", path.display()))
        })?;
        let collateral = serde_json::from_slice(&text).map_err(|err| {
            TeeError::device(
                KIND,
                format!("{} is not DCAP quote collateral: {err}", path.display()),
            )
        })?;
        let mut child = Command::new(&helper.program)
            .args(&helper.prefix)
            .arg(HELPER_ARGUMENT)
            .arg("--provider")
            .arg(TDX_PROVIDER)
            .arg("--root")
            .arg(&options.tsm_root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|err| {
                TeeError::device(
                    KIND,
                    format!("cannot start {}: {err}", helper.program.display()),
                )
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(TeeError::device(KIND, "the helper has no pipes"));
        };
        Ok(Self {
            _helper: child,
            requests: BufWriter::new(stdin),
            answers: BufReader::new(stdout),
            collateral: Box::new(collateral),
        })
    }

    fn ask(&mut self, report_data: &[u8; REPORT_DATA_LEN]) -> Result<Vec<u8>, TeeError> {
        let lost = |err: std::io::Error| {
            TeeError::device(KIND, format!("the configfs-tsm helper is gone: {err}"))
        };
        self.requests.write_all(report_data).map_err(lost)?;
        self.requests.flush().map_err(lost)?;
        let mut head = [0u8; 5];
        self.answers.read_exact(&mut head).map_err(lost)?;
        let [status, length @ ..] = head;
        let length = u32::from_be_bytes(length) as usize;
        if length > MAX_ANSWER {
            return Err(TeeError::device(
                KIND,
                format!("the helper announced {length} bytes"),
            ));
        }
        let mut body = vec![0u8; length];
        self.answers.read_exact(&mut body).map_err(lost)?;
        match status {
            0 => Ok(body),
            _ => Err(TeeError::device(KIND, String::from_utf8_lossy(&body))),
        }
    }
}

impl EvidenceSource for TdxSource {
    fn kind(&self) -> TeeKind {
        KIND
    }

    fn evidence(&mut self, report_data: &[u8; REPORT_DATA_LEN]) -> Result<Evidence, TeeError> {
        let quote = self.ask(report_data)?;
        Ok(Evidence::Tdx(TdxEvidence {
            quote,
            collateral: self.collateral.clone(),
        }))
    }

    fn device_ioctls(&self) -> Vec<DeviceIoctl> {
        Vec::new()
    }
}

/// The helper's command line: `--provider NAME --root DIR`.
fn parse_helper_args(args: &[String]) -> Result<(String, PathBuf), String> {
    let mut provider = None;
    let mut root = None;
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--provider" => provider = Some(value.clone()),
            "--root" => root = Some(PathBuf::from(value)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    match (provider, root) {
        (Some(provider), Some(root)) => Ok((provider, root)),
        _ => Err("usage: tsm-report --provider NAME --root DIR".to_owned()),
    }
}

/// The helper process: answers 64-byte requests on stdin until it closes.
pub fn run_helper(args: &[String]) -> ExitCode {
    let (provider, root) = match parse_helper_args(args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(64);
        }
    };
    sandbox::harden_process();
    if let Err(err) = sandbox::install_helper_seccomp(SeccompMode::Enforce) {
        tracing::error!(%err, "the configfs-tsm helper refuses to run without its sandbox");
        return ExitCode::from(3);
    }
    let mut requests = std::io::stdin().lock();
    let mut answers = BufWriter::new(std::io::stdout().lock());
    let mut report_data = [0u8; REPORT_DATA_LEN];
    for sequence in 0u64.. {
        if requests.read_exact(&mut report_data).is_err() {
            return ExitCode::SUCCESS;
        }
        let (status, body) = match report(&root, &provider, &report_data, sequence) {
            Ok(outblob) => (0u8, outblob),
            Err(message) => (1u8, message.into_bytes()),
        };
        let length = u32::try_from(body.len()).unwrap_or(u32::MAX);
        let written = answers
            .write_all(&[status])
            .and_then(|()| answers.write_all(&length.to_be_bytes()))
            .and_then(|()| answers.write_all(&body))
            .and_then(|()| answers.flush());
        if written.is_err() {
            return ExitCode::from(5);
        }
    }
    ExitCode::SUCCESS
}

/// One configfs-tsm request in a fresh entry, removed afterwards whatever
/// happened.
fn report(
    root: &Path,
    provider: &str,
    report_data: &[u8; REPORT_DATA_LEN],
    sequence: u64,
) -> Result<Vec<u8>, String> {
    let entry = root.join(format!("qflare-{}-{sequence}", std::process::id()));
    std::fs::create_dir(&entry).map_err(|err| {
        format!(
            "cannot create {}: {err} (configfs-tsm needs Linux 6.7 or later in a TDX guest, \
             with configfs mounted)",
            entry.display()
        )
    })?;
    let outcome = report_in(&entry, provider, report_data);
    let removed = std::fs::remove_dir(&entry);
    let outblob = outcome?;
    removed.map_err(|err| format!("cannot remove {}: {err}", entry.display()))?;
    Ok(outblob)
}

fn report_in(
    entry: &Path,
    provider: &str,
    report_data: &[u8; REPORT_DATA_LEN],
) -> Result<Vec<u8>, String> {
    let read = |name: &str| {
        let path = entry.join(name);
        std::fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))
    };
    let found = read("provider")?;
    let found = String::from_utf8_lossy(&found);
    if found.trim() != provider {
        return Err(format!(
            "the TSM provider is {:?}, not {provider}: this guest is not the TEE --tee names",
            found.trim()
        ));
    }
    let inblob = entry.join("inblob");
    std::fs::write(&inblob, report_data)
        .map_err(|err| format!("cannot write {}: {err}", inblob.display()))?;
    let outblob = read("outblob")?;
    let generation = read("generation")?;
    if String::from_utf8_lossy(&generation).trim() != "1" {
        return Err("another writer changed the request while it was made".to_owned());
    }
    if outblob.is_empty() {
        return Err("the TSM returned an empty report".to_owned());
    }
    Ok(outblob)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_arguments_are_checked() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_helper_args(&args(&["--provider", "tdx_guest", "--root", "/x"])).unwrap(),
            ("tdx_guest".to_owned(), PathBuf::from("/x"))
        );
        assert!(parse_helper_args(&args(&["--provider"])).is_err());
        assert!(parse_helper_args(&args(&["--root", "/x"])).is_err());
        assert!(parse_helper_args(&args(&["--other", "1"])).is_err());
    }

    #[test]
    fn an_entry_without_the_provider_is_refused_and_removed() {
        // A plain directory where configfs-tsm would be: the entry is made,
        // found not to be a TSM report, and removed again.
        let root = std::env::temp_dir().join(format!("qflare-tsm-test-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let message = report(&root, TDX_PROVIDER, &[7; REPORT_DATA_LEN], 0).unwrap_err();
        assert!(message.contains("provider"), "{message}");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        std::fs::remove_dir(&root).unwrap();
        let message = report(&root, TDX_PROVIDER, &[7; REPORT_DATA_LEN], 1).unwrap_err();
        assert!(message.contains("Linux 6.7"), "{message}");
    }
}
