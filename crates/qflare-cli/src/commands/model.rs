//! `qflare model`: register the federation's initial model from a
//! safetensors file, export a certified version with its certificate, and
//! verify an exported file offline.
//!
//! An exported `NAME.safetensors` travels with `NAME.cert.json`: the
//! enclave's certificate of those bytes and the attestation report of the
//! enclave boot that signed it. `verify` needs nothing else — no server.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use qflare_protocol::api::routes;
use qflare_protocol::attestation::{self, AttestationPolicy};
use qflare_protocol::crypto::sha256;
use qflare_protocol::model::{self, validate_model_name};
use qflare_protocol::tensor::TensorMap;
use qflare_server::federation::{RegisteredModel, StoredCertificate};

use crate::admin::AdminClient;
use crate::output::{OutputArgs, OutputFormat, print_json};

/// Model subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Register the federation's initial model (version 0) from a
    /// safetensors file of F32, F16 or BF16 tensors. The server must run
    /// with `federation.architecture: custom` and hold no model yet.
    Init(InitArgs),
    /// Write a certified model and its certificate (`FILE.cert.json`).
    Export(ExportArgs),
    /// Check an exported file against its certificate, offline.
    Verify(VerifyArgs),
}

/// `qflare model init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The safetensors file (e.g. from `safetensors.torch.save_file(model.state_dict(), ...)`).
    #[arg(long)]
    pub from: PathBuf,
    /// The model's name (default: the file's name without its extension).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `qflare model export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The version to export (default: the latest).
    #[arg(long)]
    pub version: Option<u64>,
    /// Where to write the safetensors file; the certificate goes beside it
    /// as `<stem>.cert.json`.
    #[arg(long)]
    pub out: PathBuf,
}

/// `qflare model verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The exported safetensors file.
    pub file: PathBuf,
    /// Its certificate (default: `<stem>.cert.json` beside it).
    #[arg(long)]
    pub certificate: Option<PathBuf>,
    /// Require the signing enclave to have one of these measurements (hex).
    #[arg(long = "measurement")]
    pub measurements: Vec<String>,
    /// Refuse a certificate from a software-mode enclave.
    #[arg(long)]
    pub require_hardware: bool,
    /// The hardware policy that a hardware-mode enclave's evidence must meet
    /// (YAML or JSON, as for `qflare attest verify`); required to accept one.
    #[arg(long)]
    pub policy: Option<PathBuf>,
}

/// `model.safetensors` → `model.cert.json`.
pub fn certificate_path(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{stem}.cert.json"))
}

/// A model name from a file name: lowercase, other characters as `-`.
fn name_from_file(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(model::MAX_MODEL_NAME_LEN)
        .collect();
    name.trim_start_matches(['-', '.', '_']).to_owned()
}

/// Runs `init` or `export` against the server.
pub async fn run_remote(client: &AdminClient, command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Init(args) => init(client, args).await,
        ModelCommand::Export(args) => export(client, args).await,
        ModelCommand::Verify(args) => verify(&args),
    }
}

async fn init(client: &AdminClient, args: InitArgs) -> anyhow::Result<()> {
    let name = args.name.unwrap_or_else(|| name_from_file(&args.from));
    validate_model_name(&name).with_context(|| format!("model name {name:?} (use --name)"))?;
    let file =
        std::fs::read(&args.from).with_context(|| format!("reading {}", args.from.display()))?;
    // Checked here first, for an immediate error that names the tensor.
    let tensors = TensorMap::from_safetensors(&file, usize::MAX)
        .with_context(|| format!("{} cannot be federated", args.from.display()))?;
    let registered: RegisteredModel = client
        .post_bytes(routes::ADMIN_MODELS, &[("name", name.as_str())], file)
        .await?;
    match args.output.output {
        OutputFormat::Json => print_json(&registered)?,
        OutputFormat::Table => println!(
            "registered {} as version {}: {} tensors, {} parameters, sha256 {}",
            registered.name,
            registered.version,
            tensors.len(),
            registered.parameters,
            registered.model_sha256
        ),
    }
    Ok(())
}

async fn export(client: &AdminClient, args: ExportArgs) -> anyhow::Result<()> {
    let version = args
        .version
        .map_or_else(|| "latest".to_owned(), |v| v.to_string());
    let certificate: StoredCertificate = client
        .get(&routes::admin_model_certificate(&version))
        .await?;
    // By the certified version, not `latest` again: a round may have
    // finished between the two requests.
    let bytes = client
        .get_bytes(&routes::admin_model(
            &certificate.certificate.model_version.to_string(),
        ))
        .await?;
    if sha256(&bytes) != certificate.certificate.model_sha256 {
        bail!("the server sent a model whose digest is not the certified one");
    }
    let cert_path = certificate_path(&args.out);
    std::fs::write(&args.out, &bytes).with_context(|| format!("writing {}", args.out.display()))?;
    std::fs::write(
        &cert_path,
        serde_json::to_vec_pretty(&certificate).context("encoding the certificate")?,
    )
    .with_context(|| format!("writing {}", cert_path.display()))?;
    println!(
        "wrote {} (model {} version {}, {} bytes) and {}",
        args.out.display(),
        certificate.certificate.architecture,
        certificate.certificate.model_version,
        bytes.len(),
        cert_path.display()
    );
    Ok(())
}

/// Checks `args.file` against its certificate: the attestation report's
/// signature (and, when asked, its measurement and mode), then the
/// certificate's signature by that report's enclave key over the file's digest.
pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let cert_path = args
        .certificate
        .clone()
        .unwrap_or_else(|| certificate_path(&args.file));
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let stored: StoredCertificate = serde_json::from_slice(
        &std::fs::read(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?,
    )
    .with_context(|| format!("{} is not a QFLARE model certificate", cert_path.display()))?;
    let report = &stored.report;
    let allowed_measurements = if args.measurements.is_empty() {
        vec![report.measurement]
    } else {
        args.measurements
            .iter()
            .map(|text| attestation::parse_measurement(text).context("--measurement"))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let mode = report.mode;
    if args.require_hardware && mode == attestation::AttestationMode::Software {
        bail!("the certificate was signed by a software-mode enclave (--require-hardware)");
    }
    let policy = AttestationPolicy {
        allowed_measurements,
        allowed_modes: vec![mode],
        max_age_secs: u64::MAX,
        // Which enclave signed the model is the question here; how it was
        // sandboxed then is the devices' concern at the time.
        require_sandbox: false,
        hardware: super::attest::load_policy(args.policy.as_deref())?,
    };
    let enclave = attestation::verify_report(report, &policy, None, report.issued_at)
        .context("the signing enclave's attestation report")?;
    model::verify(&stored.certificate, &bytes, &enclave.verifying_key)
        .context("the model does not match its certificate")?;
    let cert = &stored.certificate;
    println!(
        "ok: {} is model {} version {} (round {}), sha256 {}, certified by an enclave with \
         measurement {} ({} mode)",
        args.file.display(),
        cert.architecture,
        cert.model_version,
        cert.round_id,
        hex::encode(cert.model_sha256),
        hex::encode(enclave.measurement),
        enclave.mode.as_str()
    );
    if let Some(evidence) = &enclave.evidence {
        println!(
            "hardware evidence: {}, sha384 {}",
            evidence.platform,
            hex::encode(evidence.evidence_sha384)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_from_files() {
        assert_eq!(
            name_from_file(Path::new("/x/My Model.v2.safetensors")),
            "my-model.v2"
        );
        assert_eq!(name_from_file(Path::new("_cnn.safetensors")), "cnn");
        assert_eq!(
            certificate_path(Path::new("out/global.safetensors")),
            Path::new("out/global.cert.json")
        );
    }
}
