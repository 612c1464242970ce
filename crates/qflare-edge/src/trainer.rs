//! Local training as something the device loop is *given*: the
//! [`LocalTrainer`] trait, what it is asked ([`FitTask`]) and what it answers
//! ([`FitResult`], [`TrainError`]), and [`BurnTrainer`], the implementation
//! that trains the built-in architectures with `qflare-ml` on a local
//! [`Dataset`].
//!
//! It exists so the loop ([`crate::run`]) — sessions, attestation, model
//! verification, sealing, submission — does not care how an update is
//! produced: the loop verifies the global model, hands it to the trainer on a
//! blocking thread, checks the update has the model's layout, and seals it.
//! Another implementation (e.g. a callback into a Python framework) can
//! replace `BurnTrainer` without touching the networking or security code.

use std::collections::BTreeMap;

#[cfg(feature = "burn")]
use qflare_ml::{Architecture, Dataset, MlError, TrainConfig};
use qflare_protocol::federation::TrainingPlan;
use qflare_protocol::tensor::TensorMap;

/// The metric every trainer should report: the mean training loss over the
/// round (what [`RoundRecord::mean_loss`](crate::RoundRecord::mean_loss)
/// shows; NaN when a trainer does not report it).
pub const LOSS_METRIC: &str = "loss";

/// What the loop asks of local training.
///
/// `fit` runs on a blocking thread (tokio's `spawn_blocking`), so it may
/// take as long as training takes; a panic in it is propagated to the
/// caller of [`crate::run_device`], as a panic in the loop would be.
pub trait LocalTrainer: Send + Sync + 'static {
    /// Trains from `task.global` under `task.plan` and returns the **delta**
    /// (trained weights − global weights, tensor by tensor, with exactly the
    /// global model's tensor names and shapes: the loop refuses anything
    /// else), the number of local examples trained on and named metrics
    /// (at least [`LOSS_METRIC`]).
    ///
    /// `progress(done, total)` may be called as training advances (in any
    /// unit, e.g. batches); the loop turns it into
    /// [`crate::DeviceEvent::Training`] events, at most one per percent.
    fn fit(
        &self,
        task: &FitTask<'_>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<FitResult, TrainError>;

    /// Evaluates `task.global` on the device's own held-out data, before
    /// `fit` trains from it; the loop reports the result to the server after
    /// submitting the round's update (federated evaluation, for a model the
    /// server cannot run). `Ok(None)` (the default): this trainer does not
    /// evaluate. An error is logged and the round goes on without it.
    fn evaluate(&self, task: &FitTask<'_>) -> Result<Option<EvalResult>, TrainError> {
        let _ = task;
        Ok(None)
    }

    /// Checked once before the loop starts: `Err(reason)` when this trainer
    /// can never train (e.g. it has no local data); the run then ends at
    /// once with a configuration error saying `reason`.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// One round's training job, as the loop hands it to a [`LocalTrainer`].
/// Everything in it has been verified (the model's certificate, its
/// architecture and layout) or checked against the device's limits (the
/// plan's epochs) before the trainer sees it.
#[derive(Debug, Clone, Copy)]
pub struct FitTask<'a> {
    /// The round the update is for.
    pub round_id: u64,
    /// The global model's version (what the update is a delta from).
    pub model_version: u64,
    /// The model's architecture id as the round names it (e.g. `mnist-cnn`).
    pub architecture: &'a str,
    /// The verified global weights.
    pub global: &'a TensorMap,
    /// The round's learning rate, batch size and local epochs.
    pub plan: &'a TrainingPlan,
    /// The round's shuffle seed: derived from the device id, the round id
    /// and [`crate::DeviceConfig::train_seed`], so devices differ and reruns
    /// repeat.
    pub seed: u64,
}

/// What a [`LocalTrainer`] trained.
#[derive(Debug, Clone)]
pub struct FitResult {
    /// Trained − global, with the global model's layout.
    pub update: TensorMap,
    /// Local examples trained on (n_k, FedAvg's weight for this update).
    pub examples: u64,
    /// Named metrics of the round's training, e.g. [`LOSS_METRIC`].
    pub metrics: BTreeMap<String, f64>,
}

/// What a [`LocalTrainer`] measured evaluating the global model.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// Held-out examples evaluated on (the weight of these metrics).
    pub examples: u64,
    /// Named scalars, e.g. `loss` and `accuracy`; at most 32, finite.
    pub metrics: BTreeMap<String, f64>,
}

/// Why local training produced no update.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// This trainer cannot train the round (a model it does not know, a
    /// plan it cannot follow): the round is refused like a failed check
    /// (skipped, or the run ends under
    /// [`fail_on_refusal`](crate::DeviceConfig::fail_on_refusal)).
    #[error("round refused: {0}")]
    Refused(String),
    /// Training ran but its result must not be submitted (the loss
    /// diverged): also a refusal of the round.
    #[error("{0}")]
    Diverged(String),
    /// Training failed on this device (a backend error, an update of the
    /// wrong layout): the run ends with this error.
    #[error("{0}")]
    Failed(String),
}

/// The first difference between an update's tensors and the global model's,
/// named: a missing or extra tensor, or one of another shape. `None` when the
/// layouts agree. (Both maps are in name order.)
pub fn layout_mismatch(update: &TensorMap, global: &TensorMap) -> Option<String> {
    for (name, tensor) in global.iter() {
        match update.get(name) {
            None => return Some(format!("tensor {name} is missing")),
            Some(other) if other.shape() != tensor.shape() => {
                return Some(format!(
                    "tensor {name} has shape {:?}, the model's is {:?}",
                    other.shape(),
                    tensor.shape()
                ));
            }
            Some(_) => {}
        }
    }
    update
        .iter()
        .find(|(name, _)| global.get(name).is_none())
        .map(|(name, _)| format!("tensor {name} is not in the model"))
}

#[cfg(feature = "burn")]
/// Trains the built-in architectures ([`Architecture`]) with `qflare-ml`
/// (burn, on the CPU) on the device's local [`Dataset`].
#[derive(Debug)]
pub struct BurnTrainer {
    data: Dataset,
}

#[cfg(feature = "burn")]
impl BurnTrainer {
    /// A trainer over `data` (the device's private examples).
    pub fn new(data: Dataset) -> Self {
        Self { data }
    }

    /// The local data set.
    pub fn data(&self) -> &Dataset {
        &self.data
    }
}

#[cfg(feature = "burn")]
impl LocalTrainer for BurnTrainer {
    fn fit(
        &self,
        task: &FitTask<'_>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<FitResult, TrainError> {
        let architecture: Architecture = task
            .architecture
            .parse()
            .map_err(|e: MlError| TrainError::Refused(e.to_string()))?;
        architecture
            .validate(task.global)
            .map_err(|e| TrainError::Refused(format!("model {}: {e}", task.architecture)))?;
        let config = TrainConfig {
            learning_rate: task.plan.learning_rate,
            batch_size: task.plan.batch_size,
            epochs: task.plan.epochs,
            seed: task.seed,
        };
        // A plan TrainConfig cannot train with is the server's fault, not ours.
        config
            .validate()
            .map_err(|e| TrainError::Refused(e.to_string()))?;
        let outcome = qflare_ml::train(
            architecture,
            task.global,
            &self.data,
            &config,
            Some(progress),
        )
        .map_err(ml_error)?;
        let update = qflare_ml::delta(&outcome.weights, task.global).map_err(ml_error)?;
        Ok(FitResult {
            update,
            examples: u64::try_from(outcome.examples).unwrap_or(u64::MAX),
            metrics: BTreeMap::from([(LOSS_METRIC.to_owned(), outcome.mean_loss)]),
        })
    }

    fn check(&self) -> Result<(), String> {
        if self.data.is_empty() {
            return Err("the local data set is empty".into());
        }
        Ok(())
    }
}

#[cfg(feature = "burn")]
fn ml_error(err: MlError) -> TrainError {
    match err {
        MlError::Diverged { .. } => TrainError::Diverged(err.to_string()),
        other => TrainError::Failed(other.to_string()),
    }
}
