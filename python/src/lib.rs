//! `qflare._native`: the QFLARE device, driven from Python.
//!
//! Everything that makes a device trustworthy stays in Rust and is the edge
//! library's own code: enrollment with proof of possession, pinned TLS,
//! the post-quantum session, the enclave's attestation and every model
//! certificate, signing and sealing updates to the enclave. Python only
//! moves tensors: the device loop ([`qflare_edge::run_device`]) is given a
//! [`PythonTrainer`], whose `fit` hands the verified global model to a
//! Python callable as safetensors bytes and takes the trained weights back
//! the same way (the `qflare` package turns both into `dict[str,
//! numpy.ndarray]`).
//!
//! What the callable returns is checked here before it can be sealed: the
//! global model's tensor names and shapes ([`ShapeMismatch`] names the first
//! difference) and finite values ([`NonFiniteUpdate`] names the tensor); the
//! delta to the global model is computed here too. An exception raised by
//! the callable ends the run and is re-raised to the caller as it was.
//!
//! The loop runs on a Tokio runtime with the GIL released; the calling
//! thread wakes every 100 ms to let Python deliver signals, so Ctrl-C ends
//! the run (the loop is dropped) and raises `KeyboardInterrupt`.
//!
//! Modules: `errors` (the exceptions and the mapping to them), `runtime`
//! (the Tokio runtime, logging, interruptible blocking), `trainer` (the
//! `PythonTrainer`), `client` (`qflare.Client` and `qflare.Round` over the
//! edge library's `RoundClient`); here, `enroll` and `run_device`.

#![forbid(unsafe_code)]

mod client;
mod errors;
mod runtime;
mod trainer;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use qflare_edge::{DeviceConfig, EnrollOptions, Events, RunSummary};
use qflare_protocol::attestation::hardware::HardwarePolicy;
use qflare_protocol::attestation::{
    AttestationMode, AttestationPolicy, hardware_modes, parse_measurement,
};
use qflare_protocol::identity::{EnrollmentToken, ServerFingerprint};
use qflare_protocol::{KemSuite, SignatureSuite};

use crate::client::{PyClient, PyRound};
use crate::errors::{
    AttestationRefused, DeviceRevoked, EnrollmentRefused, ModelRefused, NonFiniteUpdate,
    QflareError, RoundRefused, ServerKeyMismatch, ServerUnreachable, ShapeMismatch, to_py,
};
use crate::runtime::{block_on_interruptible, init_logging};
use crate::trainer::PythonTrainer;

/// Enrolls this device with a single-use token: generates its post-quantum
/// key pairs, proves possession of them to the server (pinned by
/// `server_key`, the fingerprint the admin hands out) and writes the
/// owner-only identity file into `identity_dir`, with `also_servers` (other
/// replicas of the same server) to fail over to. Returns the device id.
#[pyfunction]
#[pyo3(signature = (server, token, server_key, identity_dir, name = None, kem = None, signature = None, also_servers = Vec::new()))]
// The arguments are the Python signature's; a struct would only move them.
#[allow(clippy::too_many_arguments)]
fn enroll(
    py: Python<'_>,
    server: String,
    token: String,
    server_key: String,
    identity_dir: PathBuf,
    name: Option<String>,
    kem: Option<String>,
    signature: Option<String>,
    also_servers: Vec<String>,
) -> PyResult<String> {
    init_logging();
    let token =
        EnrollmentToken::parse(&token).map_err(|e| PyValueError::new_err(format!("token: {e}")))?;
    let fingerprint = ServerFingerprint::parse(&server_key)
        .map_err(|e| PyValueError::new_err(format!("server_key: {e}")))?;
    let kem_suite = kem
        .map(|k| k.parse::<KemSuite>())
        .transpose()
        .map_err(|e| PyValueError::new_err(format!("kem: {e}")))?;
    let signature_suite = signature
        .map(|s| s.parse::<SignatureSuite>())
        .transpose()
        .map_err(|e| PyValueError::new_err(format!("signature: {e}")))?;
    let options = EnrollOptions {
        server_url: server,
        token,
        fingerprint,
        device_name: name.unwrap_or_else(|| "python-device".into()),
        kem_suite,
        signature_suite,
        alternate_urls: also_servers,
    };
    let identity = block_on_interruptible(py, async move {
        qflare_edge::enroll(options, &identity_dir).await
    })?
    .map_err(to_py)?;
    Ok(identity.device_id.to_string())
}

/// The enclaves a device trusts: these measurements, in software mode only
/// when allowed, in the hardware modes that `hardware_policy` (JSON, as the
/// `qflare-edge --hardware-policy` file) accepts, with reports at most
/// `max_age_secs` old, whose signed runtime says the sandbox is enforced
/// unless `allow_unsandboxed`.
pub(crate) fn policy(
    measurements: &[String],
    allow_software_attestation: bool,
    hardware_policy: Option<&str>,
    max_age_secs: u64,
    allow_unsandboxed: bool,
) -> PyResult<AttestationPolicy> {
    let allowed_measurements = measurements
        .iter()
        .map(|m| parse_measurement(m).map_err(|e| PyValueError::new_err(e.to_string())))
        .collect::<PyResult<Vec<_>>>()?;
    let hardware: HardwarePolicy = match hardware_policy {
        Some(json) => serde_json::from_str(json)
            .map_err(|e| PyValueError::new_err(format!("hardware_policy: {e}")))?,
        None => HardwarePolicy::default(),
    };
    let mut allowed_modes = hardware_modes(&hardware);
    if allow_software_attestation {
        allowed_modes.push(AttestationMode::Software);
    }
    Ok(AttestationPolicy {
        allowed_measurements,
        allowed_modes,
        max_age_secs,
        require_sandbox: !allow_unsandboxed,
        hardware,
    })
}

fn summary_dict<'py>(py: Python<'py>, summary: &RunSummary) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    out.set_item("stop", format!("{:?}", summary.stop))?;
    let rounds = PyList::empty(py);
    for round in &summary.rounds {
        let entry = PyDict::new(py);
        entry.set_item("round_id", round.round_id)?;
        entry.set_item("model_version", round.model_version)?;
        entry.set_item("examples", round.examples)?;
        entry.set_item("loss", round.mean_loss)?;
        entry.set_item("status", &round.status)?;
        entry.set_item("code", &round.code)?;
        entry.set_item("seconds", round.timings.total().as_secs_f64())?;
        entry.set_item("training_seconds", round.timings.training.as_secs_f64())?;
        rounds.append(entry)?;
    }
    out.set_item("rounds", rounds)?;
    out.set_item("models_downloaded", summary.models_downloaded)?;
    out.set_item("refusals", summary.refusals)?;
    Ok(out)
}

/// Runs the device: polls for rounds that select it, verifies the enclave's
/// attestation and the global model's certificate, calls `fit` (and
/// `evaluate`), checks and seals the update to the enclave, submits it, and
/// reports the evaluation; until the server finishes training, `max_rounds`
/// updates were submitted, or the device is revoked.
#[pyfunction]
#[pyo3(signature = (
    identity_dir, fit, evaluate = None, *, enclave_measurements,
    allow_software_attestation = false, max_rounds = None, max_report_age_secs = 300,
    max_local_epochs = 50, stop_when_finished = true, allow_unsandboxed_enclave = false,
    hardware_policy = None
))]
#[allow(clippy::too_many_arguments)]
fn run_device<'py>(
    py: Python<'py>,
    identity_dir: PathBuf,
    fit: Py<PyAny>,
    evaluate: Option<Py<PyAny>>,
    enclave_measurements: Vec<String>,
    allow_software_attestation: bool,
    max_rounds: Option<u64>,
    max_report_age_secs: u64,
    max_local_epochs: usize,
    stop_when_finished: bool,
    allow_unsandboxed_enclave: bool,
    hardware_policy: Option<String>,
) -> PyResult<Bound<'py, PyDict>> {
    init_logging();
    // Settles a key rotation whose answer was lost (see load_identity).
    let dir = identity_dir.clone();
    let identity =
        block_on_interruptible(py, async move { qflare_edge::load_identity(&dir).await })?
            .map_err(to_py)?;
    let policy = policy(
        &enclave_measurements,
        allow_software_attestation,
        hardware_policy.as_deref(),
        max_report_age_secs,
        allow_unsandboxed_enclave,
    )?;
    let failure = Arc::new(Mutex::new(None));
    let trainer = PythonTrainer {
        fit,
        evaluate,
        failure: failure.clone(),
    };
    let mut config = DeviceConfig::new(policy, Arc::new(trainer));
    config.max_rounds = max_rounds;
    config.max_local_epochs = max_local_epochs;
    config.stop_when_finished = stop_when_finished;
    let result = block_on_interruptible(py, async move {
        qflare_edge::run_device(&identity, config, Events::none()).await
    })?;
    // A Python failure is re-raised as it was, whatever the loop made of it.
    if let Some(err) = failure.lock().ok().and_then(|mut slot| slot.take()) {
        return Err(err);
    }
    let summary = result.map_err(to_py)?;
    summary_dict(py, &summary)
}

/// The native half of the `qflare` package.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(enroll, m)?)?;
    m.add_function(wrap_pyfunction!(run_device, m)?)?;
    m.add_class::<PyClient>()?;
    m.add_class::<PyRound>()?;
    let py = m.py();
    m.add("QflareError", py.get_type::<QflareError>())?;
    m.add("ServerUnreachable", py.get_type::<ServerUnreachable>())?;
    m.add("ServerKeyMismatch", py.get_type::<ServerKeyMismatch>())?;
    m.add("EnrollmentRefused", py.get_type::<EnrollmentRefused>())?;
    m.add("DeviceRevoked", py.get_type::<DeviceRevoked>())?;
    m.add("AttestationRefused", py.get_type::<AttestationRefused>())?;
    m.add("ModelRefused", py.get_type::<ModelRefused>())?;
    m.add("ShapeMismatch", py.get_type::<ShapeMismatch>())?;
    m.add("NonFiniteUpdate", py.get_type::<NonFiniteUpdate>())?;
    m.add("RoundRefused", py.get_type::<RoundRefused>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
