//! [`PythonTrainer`]: the device loop's `LocalTrainer` as Python callables
//! over safetensors bytes, with the edge library's checks on what they return.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use qflare_edge::{
    EvalResult, FitResult, FitTask, LOSS_METRIC, LocalTrainer, TrainError, checked_delta,
};
use qflare_protocol::federation::TrainingPlan;
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
        let config = round_config(
            py,
            task.round_id,
            task.model_version,
            task.architecture,
            task.plan,
        )?;
        config.set_item("seed", task.seed)?;
        Ok((model, config))
    }
}

/// A round's `config` dict as Python code sees it, in `fit` and on
/// `qflare.Round`: the round, the model and the training plan.
pub(crate) fn round_config<'py>(
    py: Python<'py>,
    round_id: u64,
    model_version: u64,
    model: &str,
    plan: &TrainingPlan,
) -> PyResult<Bound<'py, PyDict>> {
    let config = PyDict::new(py);
    config.set_item("round_id", round_id)?;
    config.set_item("model_version", model_version)?;
    config.set_item("model", model)?;
    config.set_item("learning_rate", plan.learning_rate)?;
    config.set_item("batch_size", plan.batch_size)?;
    config.set_item("epochs", plan.epochs)?;
    Ok(config)
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
