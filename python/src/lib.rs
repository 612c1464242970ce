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

#![forbid(unsafe_code)]
// `create_exception!` generates items without docs.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pyo3::exceptions::{PyException, PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use qflare_edge::{
    DeviceConfig, EdgeError, EnrollOptions, EvalResult, Events, FitResult, FitTask, Identity,
    LOSS_METRIC, LocalTrainer, NoRound, RoundClient, RunSummary, TrainError, TrainingRound,
    UpdateRefusal, checked_delta,
};
use qflare_protocol::api::ErrorCode;
use qflare_protocol::attestation::{AttestationMode, AttestationPolicy, MEASUREMENT_LEN};
use qflare_protocol::identity::{EnrollmentToken, ServerFingerprint};
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::wire::limits;
use qflare_protocol::{KemSuite, ProtocolError, SignatureSuite};

pyo3::create_exception!(qflare, QflareError, PyException, "Any QFLARE failure.");
pyo3::create_exception!(
    qflare,
    ServerUnreachable,
    QflareError,
    "The server could not be reached."
);
pyo3::create_exception!(
    qflare,
    ServerKeyMismatch,
    QflareError,
    "The server's certificate or key is not the pinned one."
);
pyo3::create_exception!(
    qflare,
    EnrollmentRefused,
    QflareError,
    "The enrollment token is invalid, expired, revoked or used."
);
pyo3::create_exception!(
    qflare,
    DeviceRevoked,
    QflareError,
    "An admin revoked this device."
);
pyo3::create_exception!(
    qflare,
    AttestationRefused,
    QflareError,
    "The enclave's attestation report does not satisfy this device's policy."
);
pyo3::create_exception!(
    qflare,
    ModelRefused,
    QflareError,
    "A downloaded model failed verification against the enclave's certificate."
);
pyo3::create_exception!(
    qflare,
    ShapeMismatch,
    QflareError,
    "The trained weights do not have the global model's tensor names and shapes."
);
pyo3::create_exception!(
    qflare,
    NonFiniteUpdate,
    QflareError,
    "The trained weights hold a NaN or an infinity."
);
pyo3::create_exception!(
    qflare,
    RoundRefused,
    QflareError,
    "The server's round cannot be trained by this device."
);

/// The Python error for an edge error, by what went wrong.
fn to_py(err: EdgeError) -> PyErr {
    let text = err.to_string();
    match err {
        EdgeError::Network(_) => ServerUnreachable::new_err(text),
        EdgeError::Protocol(ProtocolError::PinMismatch) | EdgeError::Tls(_) => {
            ServerKeyMismatch::new_err(text)
        }
        EdgeError::Server { code, .. } => match code {
            ErrorCode::DeviceRevoked => DeviceRevoked::new_err(text),
            ErrorCode::InvalidToken => EnrollmentRefused::new_err(text),
            _ => QflareError::new_err(text),
        },
        EdgeError::Attestation(_) => AttestationRefused::new_err(text),
        EdgeError::ModelRefused(_) => ModelRefused::new_err(text),
        EdgeError::RoundRefused(_) => RoundRefused::new_err(text),
        EdgeError::UpdateRefused(UpdateRefusal::ShapeMismatch(what)) => {
            ShapeMismatch::new_err(what)
        }
        EdgeError::UpdateRefused(UpdateRefusal::NonFinite(_)) => NonFiniteUpdate::new_err(text),
        _ => QflareError::new_err(text),
    }
}

fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| QflareError::new_err(format!("starting the runtime: {e}")))
}

/// Logs to stderr, filtered by `RUST_LOG` (default: the device's progress).
fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("qflare_edge=info"));
        // Another library may own the global subscriber already; then it logs.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init();
    });
}

/// Runs `work` on the runtime with the GIL released, checking for signals
/// every 100 ms: Ctrl-C drops `work` and raises `KeyboardInterrupt`.
fn block_on_interruptible<T: Send + 'static>(
    py: Python<'_>,
    work: impl Future<Output = T> + Send + 'static,
) -> PyResult<T> {
    let handle = runtime()?.spawn(work);
    let abort = handle.abort_handle();
    let (tx, rx) = std::sync::mpsc::channel();
    runtime()?.spawn(async move {
        let _ = tx.send(handle.await);
    });
    let mut rx = rx;
    loop {
        // The receiver is `Send`, not `Sync`: it moves into the GIL-free
        // closure and back out each time.
        let (received, back) = py.detach(move || {
            let received = rx.recv_timeout(Duration::from_millis(100));
            (received, rx)
        });
        rx = back;
        match received {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(join)) => {
                return Err(QflareError::new_err(format!(
                    "the device loop failed: {join}"
                )));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(signal) = py.check_signals() {
                    abort.abort();
                    return Err(signal);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PyKeyboardInterrupt::new_err(
                    "the device loop was cancelled",
                ));
            }
        }
    }
}

/// Enrolls this device with a single-use token: generates its post-quantum
/// key pairs, proves possession of them to the server (pinned by
/// `server_key`, the fingerprint the admin hands out) and writes the
/// owner-only identity file into `identity_dir`. Returns the device id.
#[pyfunction]
#[pyo3(signature = (server, token, server_key, identity_dir, name = None, kem = None, signature = None))]
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
    };
    let identity = block_on_interruptible(py, async move {
        qflare_edge::enroll(options, &identity_dir).await
    })?
    .map_err(to_py)?;
    Ok(identity.device_id.to_string())
}

/// Local training as Python callables over safetensors bytes.
struct PythonTrainer {
    /// `fit(model: bytes, config: dict) -> (weights: bytes, examples: int, metrics: dict)`.
    fit: Py<PyAny>,
    /// `evaluate(model: bytes, config: dict) -> (examples: int, metrics: dict) | None`.
    evaluate: Option<Py<PyAny>>,
    /// The first Python-side failure, re-raised when the run ends.
    failure: Arc<Mutex<Option<PyErr>>>,
}

impl PythonTrainer {
    fn fail(&self, err: PyErr) -> TrainError {
        let text = err.to_string();
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert(err);
        }
        TrainError::Failed(text)
    }

    fn arguments<'py>(
        py: Python<'py>,
        task: &FitTask<'_>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyDict>)> {
        let model = PyBytes::new(py, &task.global.to_safetensors());
        let config = PyDict::new(py);
        config.set_item("round_id", task.round_id)?;
        config.set_item("model_version", task.model_version)?;
        config.set_item("model", task.architecture)?;
        config.set_item("learning_rate", task.plan.learning_rate)?;
        config.set_item("batch_size", task.plan.batch_size)?;
        config.set_item("epochs", task.plan.epochs)?;
        config.set_item("seed", task.seed)?;
        Ok((model, config))
    }
}

/// Trained weights minus the global model, after the edge library's checks
/// (names, shapes, finite values), as the Python exception that names the
/// tensor.
fn delta(trained: &TensorMap, global: &TensorMap) -> PyResult<TensorMap> {
    checked_delta(trained, global).map_err(to_py)
}

impl LocalTrainer for PythonTrainer {
    fn fit(
        &self,
        task: &FitTask<'_>,
        _progress: &dyn Fn(usize, usize),
    ) -> Result<FitResult, TrainError> {
        let answer = Python::attach(|py| -> PyResult<_> {
            let (model, config) = Self::arguments(py, task)?;
            let result = self.fit.call1(py, (model, config))?;
            let (weights, examples, metrics): (Vec<u8>, u64, BTreeMap<String, f64>) =
                result.extract(py)?;
            Ok((weights, examples, metrics))
        });
        let (weights, examples, mut metrics) = answer.map_err(|e| self.fail(e))?;
        let trained = TensorMap::from_safetensors(&weights, limits::TENSORS)
            .map_err(|e| self.fail(ShapeMismatch::new_err(e.to_string())))?;
        let update = delta(&trained, task.global).map_err(|e| self.fail(e))?;
        metrics.entry(LOSS_METRIC.to_owned()).or_insert(f64::NAN);
        Ok(FitResult {
            update,
            examples,
            metrics,
        })
    }

    fn evaluate(&self, task: &FitTask<'_>) -> Result<Option<EvalResult>, TrainError> {
        let Some(evaluate) = &self.evaluate else {
            return Ok(None);
        };
        let answer = Python::attach(|py| -> PyResult<_> {
            let (model, config) = Self::arguments(py, task)?;
            let result = evaluate.call1(py, (model, config))?;
            let parsed: Option<(u64, BTreeMap<String, f64>)> = result.extract(py)?;
            Ok(parsed)
        });
        let parsed = answer.map_err(|e| self.fail(e))?;
        Ok(parsed.map(|(examples, metrics)| EvalResult { examples, metrics }))
    }
}

fn parse_measurement(text: &str) -> PyResult<[u8; MEASUREMENT_LEN]> {
    let mut out = [0u8; MEASUREMENT_LEN];
    let bytes = text.as_bytes();
    if bytes.len() != 2 * MEASUREMENT_LEN {
        return Err(PyValueError::new_err(format!(
            "an enclave measurement is {} hex characters (SHA-384), got {}",
            2 * MEASUREMENT_LEN,
            bytes.len()
        )));
    }
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok();
        out[i] = hex
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| PyValueError::new_err("an enclave measurement is hex"))?;
    }
    Ok(out)
}

/// The enclaves a device trusts: these measurements, in software mode only
/// when allowed, with reports at most `max_age_secs` old.
fn policy(
    measurements: &[String],
    allow_software_attestation: bool,
    max_age_secs: u64,
) -> PyResult<AttestationPolicy> {
    let allowed_measurements = measurements
        .iter()
        .map(|m| parse_measurement(m))
        .collect::<PyResult<Vec<_>>>()?;
    Ok(AttestationPolicy {
        allowed_measurements,
        allowed_modes: if allow_software_attestation {
            vec![AttestationMode::Software]
        } else {
            Vec::new()
        },
        max_age_secs,
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
    max_local_epochs = 50, stop_when_finished = true
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
) -> PyResult<Bound<'py, PyDict>> {
    init_logging();
    let identity = Identity::load(&identity_dir).map_err(to_py)?;
    let policy = policy(
        &enclave_measurements,
        allow_software_attestation,
        max_report_age_secs,
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

/// A round that selected this device, with its verified global model.
#[pyclass(name = "Round", module = "qflare", frozen)]
struct PyRound {
    round: Arc<TrainingRound>,
}

#[pymethods]
impl PyRound {
    /// The round id.
    #[getter]
    fn round_id(&self) -> u64 {
        self.round.round_id
    }

    /// The global model's version.
    #[getter]
    fn model_version(&self) -> u64 {
        self.round.model_version
    }

    /// The model's name.
    #[getter]
    fn model(&self) -> String {
        self.round.model.clone()
    }

    /// The round's training settings, as `fit`'s `config` gets them.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let config = PyDict::new(py);
        config.set_item("round_id", self.round.round_id)?;
        config.set_item("model_version", self.round.model_version)?;
        config.set_item("model", &self.round.model)?;
        config.set_item("learning_rate", self.round.plan.learning_rate)?;
        config.set_item("batch_size", self.round.plan.batch_size)?;
        config.set_item("epochs", self.round.plan.epochs)?;
        config.set_item("deadline", self.round.deadline)?;
        Ok(config)
    }

    /// The verified global model as safetensors bytes (f32).
    fn model_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.round.global.to_safetensors())
    }

    fn __repr__(&self) -> String {
        format!(
            "Round(round_id={}, model_version={}, model={:?})",
            self.round.round_id, self.round.model_version, self.round.model
        )
    }
}

/// The device's steps one call at a time (see `qflare.Client`).
#[pyclass(name = "Client", module = "qflare", frozen)]
struct PyClient {
    inner: Arc<tokio::sync::Mutex<RoundClient>>,
    device_id: String,
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (identity_dir, *, enclave_measurements, allow_software_attestation = false, max_report_age_secs = 300))]
    fn new(
        identity_dir: PathBuf,
        enclave_measurements: Vec<String>,
        allow_software_attestation: bool,
        max_report_age_secs: u64,
    ) -> PyResult<Self> {
        init_logging();
        let identity = Identity::load(&identity_dir).map_err(to_py)?;
        let policy = policy(
            &enclave_measurements,
            allow_software_attestation,
            max_report_age_secs,
        )?;
        // The client's transport belongs to the runtime it is used on.
        let client = runtime()?
            .block_on(async { RoundClient::new(identity, policy) })
            .map_err(to_py)?;
        Ok(Self {
            device_id: client.device_id(),
            inner: Arc::new(tokio::sync::Mutex::new(client)),
        })
    }

    /// This device's id.
    #[getter]
    fn device_id(&self) -> String {
        self.device_id.clone()
    }

    /// Polls until a round selects this device; `None` once the server has
    /// finished training. Raises `TimeoutError` after `timeout_secs`.
    #[pyo3(signature = (timeout_secs = None))]
    fn wait_for_round(
        &self,
        py: Python<'_>,
        timeout_secs: Option<f64>,
    ) -> PyResult<Option<PyRound>> {
        let timeout = timeout_secs
            .map(Duration::try_from_secs_f64)
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("timeout_secs: {e}")))?;
        let inner = self.inner.clone();
        let answer = block_on_interruptible(py, async move {
            inner.lock().await.wait_for_round(timeout).await
        })?
        .map_err(to_py)?;
        match answer {
            Ok(round) => Ok(Some(PyRound {
                round: Arc::new(round),
            })),
            Err(NoRound::Finished) => Ok(None),
            Err(NoRound::TimedOut) => Err(pyo3::exceptions::PyTimeoutError::new_err(
                "no round selected this device in time",
            )),
        }
    }

    /// Seals `trained − global` (from `weights`, safetensors bytes) to the
    /// round's attested enclave and submits it; the receipt as a dict.
    fn submit<'py>(
        &self,
        py: Python<'py>,
        round: &PyRound,
        weights: Vec<u8>,
        examples: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let trained = TensorMap::from_safetensors(&weights, limits::TENSORS)
            .map_err(|e| ShapeMismatch::new_err(e.to_string()))?;
        let (inner, round) = (self.inner.clone(), round.round.clone());
        let receipt = block_on_interruptible(py, async move {
            inner.lock().await.submit(&round, &trained, examples).await
        })?
        .map_err(to_py)?;
        let out = PyDict::new(py);
        out.set_item("round_id", receipt.round_id)?;
        out.set_item("status", receipt.status)?;
        out.set_item("code", receipt.code)?;
        Ok(out)
    }

    /// Reports this device's evaluation of the round's global model.
    fn evaluate(
        &self,
        py: Python<'_>,
        round: &PyRound,
        examples: u64,
        metrics: BTreeMap<String, f64>,
    ) -> PyResult<()> {
        let (inner, round) = (self.inner.clone(), round.round.clone());
        block_on_interruptible(py, async move {
            inner.lock().await.evaluate(&round, examples, metrics).await
        })?
        .map_err(to_py)?;
        Ok(())
    }
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
