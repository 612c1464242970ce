//! The `qflare-enclave` process: harden, measure, generate this boot's keys
//! (in a TEE: open its evidence source and ask it once), close the sandbox,
//! then serve frames on stdin/stdout until stdin closes. Logs go to stderr
//! (never keys or weights).

use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;

use qflare_ml::{Dataset, Split};
use qflare_protocol::attestation::hardware::TeeKind;
use qflare_protocol::attestation::{EnclaveRuntime, SeccompState};
use qflare_protocol::{KemSuite, SignatureSuite};

use crate::backend::{EnclaveBackend, SoftwareBackend, measure_file};
use crate::frame::{Frame, FrameReader, Kind, stream_still_aligned};
use crate::messages::ProbeRequest;
use crate::sandbox::{self, DeviceIoctl, SeccompMode};
use crate::service::EnclaveService;
use crate::tee::{self, HardwareBackend, HelperCommand, TeeOptions};

/// Command-line options of the enclave process.
#[derive(Debug, Clone)]
pub struct Options {
    /// KEM suite of this boot's key.
    pub kem_suite: KemSuite,
    /// Signature suite of this boot's key.
    pub signature_suite: SignatureSuite,
    /// FLTrust's root data set (an MNIST-format directory), read before the sandbox closes.
    pub root_data: Option<PathBuf>,
    /// How many root examples to keep.
    pub root_examples: usize,
    /// Compute threads (0: all cores).
    pub threads: usize,
    /// Seccomp enforcement.
    pub seccomp: SeccompMode,
    /// The TEE the process runs in; `None`: software mode.
    pub tee: Option<TeeOptions>,
    /// The arguments as given, for the signed report.
    pub arguments: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kem_suite: KemSuite::MlKem768,
            signature_suite: SignatureSuite::MlDsa65,
            root_data: None,
            root_examples: 500,
            threads: 1,
            seccomp: SeccompMode::Enforce,
            tee: None,
            arguments: Vec::new(),
        }
    }
}

const USAGE: &str = "usage: qflare-enclave [--kem SUITE] [--signature SUITE] [--root-data DIR] \
[--root-examples N] [--threads N] [--seccomp enforce|log] \
[--tee sev-snp|tdx|nitro [--vcek FILE] [--tdx-collateral FILE] [--tsm-root DIR]]\n\
       qflare-enclave measure\n\
Speaks QFLARE's enclave frame protocol on stdin/stdout; started by the QFLARE server. \
`--tee` runs it inside that TEE, attaching its evidence to every report \
(docs/enclave.md). `measure` prints what devices should pin for this build.";

/// Parses the process's arguments.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let arguments: Vec<String> = args.into_iter().collect();
    let mut options = Options {
        arguments: arguments.clone(),
        ..Options::default()
    };
    let mut args = arguments.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--kem" => options.kem_suite = value()?.parse().map_err(|e| format!("--kem: {e}"))?,
            "--signature" => {
                options.signature_suite =
                    value()?.parse().map_err(|e| format!("--signature: {e}"))?
            }
            "--root-data" => options.root_data = Some(PathBuf::from(value()?)),
            "--root-examples" => {
                options.root_examples = value()?
                    .parse()
                    .map_err(|e| format!("--root-examples: {e}"))?
            }
            "--threads" => {
                options.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            "--seccomp" => {
                options.seccomp = match value()?.as_str() {
                    "enforce" => SeccompMode::Enforce,
                    "log" => SeccompMode::Log,
                    other => return Err(format!("--seccomp: unknown mode {other}")),
                }
            }
            "--tee" => {
                let kind: TeeKind = value()?.parse().map_err(|e| format!("--tee: {e}"))?;
                options.tee = Some(TeeOptions::new(kind));
            }
            "--vcek" | "--tdx-collateral" | "--tsm-root" => {
                let path = PathBuf::from(value()?);
                let Some(tee) = options.tee.as_mut() else {
                    return Err(format!("{flag} needs --tee before it\n{USAGE}"));
                };
                match flag.as_str() {
                    "--vcek" => tee.vcek = Some(path),
                    "--tdx-collateral" => tee.tdx_collateral = Some(path),
                    _ => tee.tsm_root = path,
                }
            }
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(options)
}

/// SHA-256 of the examples kept: images as little-endian f32, then labels.
fn dataset_sha256(data: &Dataset) -> String {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for pixel in data.images() {
        context.update(&pixel.to_le_bytes());
    }
    context.update(data.labels());
    hex::encode(context.finish().as_ref())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This boot's backend: software, or the TEE `options.tee` names (whose
/// device is opened here, before the sandbox closes), with the device
/// requests its sandbox must let through.
fn start_backend(
    options: &Options,
    helper: &HelperCommand,
) -> Result<(Box<dyn EnclaveBackend>, Vec<DeviceIoctl>), ExitCode> {
    let Some(tee_options) = &options.tee else {
        let measurement = std::env::current_exe()
            .and_then(|exe| measure_file(&exe))
            .map_err(|err| {
                tracing::error!(%err, "cannot measure the enclave executable");
                ExitCode::from(2)
            })?;
        return SoftwareBackend::new(
            measurement,
            options.kem_suite,
            options.signature_suite,
            &mut rand::rng(),
        )
        .map(|backend| (Box::new(backend) as Box<dyn EnclaveBackend>, Vec::new()))
        .map_err(|err| {
            tracing::error!(%err, "cannot generate the enclave keys");
            ExitCode::from(2)
        });
    };
    tee::open_source(tee_options, helper)
        .and_then(|source| {
            HardwareBackend::start(
                source,
                options.kem_suite,
                options.signature_suite,
                &mut rand::rng(),
            )
        })
        .map(|backend| {
            let ioctls = backend.device_ioctls();
            (Box::new(backend) as Box<dyn EnclaveBackend>, ioctls)
        })
        .map_err(|err| {
            tracing::error!(%err, "refusing to run without the TEE --tee names");
            ExitCode::from(6)
        })
}

/// Runs the enclave until stdin closes. `helper` is how to start this
/// executable again (the TDX backend's configfs-tsm helper).
pub fn run(options: Options, helper: &HelperCommand) -> ExitCode {
    let mut hardening = sandbox::harden_process();
    let (mut backend, device_ioctls) = match start_backend(&options, helper) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let measurement = backend.measurement();
    let root_data = match &options.root_data {
        Some(dir) => match Dataset::load(dir, Split::Train) {
            Ok(data) => Some(data.head(options.root_examples)),
            Err(err) => {
                tracing::error!(%err, "cannot load the FLTrust root data");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    // Compute threads must exist before the sandbox forbids creating them.
    if let Err(err) = qflare_ml::set_compute_threads(options.threads) {
        tracing::error!(%err, "cannot start the compute threads");
        return ExitCode::from(2);
    }
    hardening.memory_locked = sandbox::lock_memory();
    if let Err(err) = sandbox::install_seccomp(options.seccomp, &device_ioctls) {
        tracing::error!(%err, "refusing to run without the seccomp sandbox");
        return ExitCode::from(3);
    }
    hardening.seccomp = options.seccomp == SeccompMode::Enforce;
    backend.set_runtime(EnclaveRuntime {
        seccomp: match options.seccomp {
            SeccompMode::Enforce => SeccompState::Enforce,
            SeccompMode::Log => SeccompState::Log,
        },
        // seccompiler sets it before installing the filter; the install
        // succeeded, so it is set.
        no_new_privs: true,
        not_dumpable: hardening.not_dumpable,
        no_core_files: hardening.no_core_files,
        memory_locked: hardening.memory_locked,
        arguments: options.arguments.clone(),
        root_data_sha256: root_data.as_ref().map(dataset_sha256),
    });
    tracing::info!(
        mode = backend.mode().as_str(),
        measurement = %hex::encode(measurement),
        kem = %options.kem_suite,
        ?hardening,
        "enclave ready"
    );

    let mut service = EnclaveService::new(backend, hardening, root_data);
    let mut reader = FrameReader::new(BufReader::with_capacity(1 << 20, std::io::stdin().lock()));
    let mut writer = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    loop {
        let answer = match reader.read() {
            Ok(frame) if frame.kind == Kind::Probe => match frame.meta::<ProbeRequest>() {
                Ok(request) => {
                    if let Some(attempt) = request.fatal_attempt {
                        sandbox::attempt_fatal(attempt);
                    }
                    Frame::new(Kind::ProbeResult, &sandbox::probe(hardening), Vec::new())
                }
                Err(err) => Frame::error(err.code(), &err.to_string()),
            },
            Ok(frame) => service.handle(&frame, unix_now()),
            Err(crate::frame::FrameError::Closed) => return ExitCode::SUCCESS,
            Err(err) => {
                let aligned = stream_still_aligned(&err);
                tracing::warn!(%err, aligned, "malformed frame");
                if Frame::error(err.code(), &err.to_string())
                    .write_to(&mut writer)
                    .is_err()
                    || !aligned
                {
                    // Without alignment there is no next frame to trust; the host restarts us.
                    return ExitCode::from(4);
                }
                continue;
            }
        };
        if let Err(err) = answer.write_to(&mut writer) {
            tracing::error!(%err, "cannot answer; exiting");
            return ExitCode::from(5);
        }
    }
}

/// The binary's `main`: logging to stderr, arguments, [`run`].
pub fn main() -> ExitCode {
    main_with_args(std::env::args().skip(1).collect())
}

/// [`main`] with explicit arguments (for `qflare enclave ...`). Must run
/// before any async runtime starts: the sandbox forbids the system calls an
/// idle runtime thread would make.
pub fn main_with_args(args: Vec<String>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if args.first().is_some_and(|first| first == "measure") {
        return measure(&args[1..]);
    }
    #[cfg(feature = "tdx")]
    if args
        .first()
        .is_some_and(|first| first == tee::tsm::HELPER_ARGUMENT)
    {
        return tee::tsm::run_helper(&args[1..]);
    }
    let helper = match helper_command(args.len()) {
        Ok(helper) => helper,
        Err(err) => {
            eprintln!("cannot find this executable: {err}");
            return ExitCode::from(2);
        }
    };
    match parse_args(args) {
        Ok(options) => run(options, &helper),
        Err(message) => {
            eprintln!("{message}");
            ExitCode::from(64)
        }
    }
}

/// This executable and the arguments before the enclave's own `own_args`
/// (`enclave` when run as `qflare enclave ...`).
fn helper_command(own_args: usize) -> std::io::Result<HelperCommand> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let prefix = argv[..argv.len().saturating_sub(own_args)].to_vec();
    Ok(HelperCommand {
        program: std::env::current_exe()?,
        prefix,
    })
}

/// `qflare-enclave measure` (or `qflare enclave measure`): what a device
/// should pin for the enclave this executable would run, per mode. Only the
/// software measurement follows from the build: it is the SHA-384 of this
/// very file, which is what the process reports about itself. A TEE's launch
/// measurement also covers what the platform loads around the program
/// (firmware, kernel, command line, the image format), so it comes from the
/// platform's tooling (docs/enclave.md §5.5).
fn measure(rest: &[String]) -> ExitCode {
    if !rest.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(64);
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            eprintln!("cannot find this executable: {err}");
            return ExitCode::from(1);
        }
    };
    match measure_file(&exe) {
        Ok(measurement) => {
            println!(
                "software  {}  SHA-384 of {}; devices pin it with --enclave-measurement",
                hex::encode(measurement),
                exe.display()
            );
            for (mode, how) in [
                (
                    "sev-snp",
                    "MEASUREMENT covers the guest firmware, kernel, initrd and command line: \
                     compute it with the VM's launch tooling (e.g. sev-snp-measure)",
                ),
                (
                    "tdx",
                    "MRTD is the TD firmware's, the kernel and workload extend RTMR1..3: \
                     take them from the platform's measurement tooling",
                ),
                (
                    "nitro",
                    "PCR0..2 are printed by `nitro-cli build-enclave` for the image",
                ),
            ] {
                println!("{mode:<8}  not computable from this build: {how}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("cannot measure {}: {err}", exe.display());
            ExitCode::from(1)
        }
    }
}
