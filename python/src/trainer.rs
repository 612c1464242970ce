//! [`PythonTrainer`]: the device loop's `LocalTrainer` as Python callables
//! over safetensors bytes, with the edge library's checks on what they return.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use qflare_edge::{
    EvalResult, FitResult, FitTask, LOSS_METRIC, LocalTrainer, TrainError, checked_delta,
};
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::wire::limits;

use crate::errors::{ShapeMismatch, to_py};

/// Local training as Python callables over safetensors bytes.
pub(crate) struct PythonTrainer {
    /// `fit(model: bytes, config: dict) -> (weights: bytes, examples: int, metrics: dict)`.
    pub(crate) fit: Py<PyAny>,
    /// `evaluate(model: bytes, config: dict) -> (examples: int, metrics: dict) | None`.
    pub(crate) evaluate: Option<Py<PyAny>>,
    /// The first Python-side failure, re-raised when the run ends.
    pub(crate) failure: Arc<Mutex<Option<PyErr>>>,
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
