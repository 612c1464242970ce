//! `qflare.Client` and `qflare.Round`: the edge library's `RoundClient`, one
//! step per call, for training loops written in Python.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use qflare_edge::{NoRound, RoundClient, TrainingRound};
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::wire::limits;

use crate::errors::{ShapeMismatch, to_py};
use crate::policy;
use crate::runtime::{block_on_interruptible, init_logging, runtime};
use crate::trainer::round_config;

/// A round that selected this device, with its verified global model.
#[pyclass(name = "Round", module = "qflare", frozen)]
pub(crate) struct PyRound {
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
        let round = &self.round;
        let config = round_config(
            py,
            round.round_id,
            round.model_version,
            &round.model,
            &round.plan,
        )?;
        config.set_item("deadline", round.deadline)?;
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
pub(crate) struct PyClient {
    inner: Arc<tokio::sync::Mutex<RoundClient>>,
    device_id: String,
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (identity_dir, *, enclave_measurements, allow_software_attestation = false, max_report_age_secs = 300, allow_unsandboxed_enclave = false, hardware_policy = None))]
    fn new(
        py: Python<'_>,
        identity_dir: PathBuf,
        enclave_measurements: Vec<String>,
        allow_software_attestation: bool,
        max_report_age_secs: u64,
        allow_unsandboxed_enclave: bool,
        hardware_policy: Option<String>,
    ) -> PyResult<Self> {
        init_logging();
        // Settles a key rotation whose answer was lost (see load_identity).
        let identity = block_on_interruptible(py, async move {
            qflare_edge::load_identity(&identity_dir).await
        })?
        .map_err(to_py)?;
        let policy = policy(
            &enclave_measurements,
            allow_software_attestation,
            hardware_policy.as_deref(),
            max_report_age_secs,
            allow_unsandboxed_enclave,
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
            Err(NoRound::TimedOut) => Err(PyTimeoutError::new_err(
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
