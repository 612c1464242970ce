//! Local training, evaluation and the update arithmetic of FedAvg.
//!
//! Over 600 lines only with its tests (the code is about 310 lines); they pin
//! the arithmetic against hand-computed values and stay beside it.
//!
//! [`train()`] is one client's ClientUpdate from McMahan et al. (2017): start
//! from the global weights, run `epochs` passes of mini-batch SGD (no
//! momentum, no weight decay) with cross-entropy loss over the local data,
//! shuffled each epoch, and return the new weights. The update a device
//! sends is [`delta`]`(trained, global)`; the server's new model is the
//! example-weighted mean of the updates, applied with [`apply_delta`].
//!
//! Determinism: the shuffle comes from ChaCha20 seeded with
//! [`TrainConfig::seed`], the model from the given weights, and burn's flex
//! kernels are deterministic for a given thread-pool size, so the same
//! inputs give bit-identical weights.

use std::time::Instant;

use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use qflare_protocol::tensor::TensorMap;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::compute;
use crate::data::Dataset;
use crate::error::{MlError, Result};
use crate::model::{Architecture, IMAGE_PIXELS, IMAGE_SIDE, Model, NUM_CLASSES};

/// Examples per forward pass in [`evaluate`]: large enough to amortise
/// per-call overhead, small enough to keep the CNN's activations in a few MB.
const EVAL_BATCH: usize = 500;

/// Local training hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// SGD step size.
    pub learning_rate: f64,
    /// Examples per step (B in the paper; the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Passes over the local data (E in the paper).
    pub epochs: usize,
    /// Seeds the per-epoch shuffle.
    pub seed: u64,
}

impl Default for TrainConfig {
    /// B = 10, E = 1 and a learning rate that trains both models well on
    /// MNIST in one epoch (the paper tunes it per run).
    fn default() -> Self {
        Self {
            learning_rate: 0.05,
            batch_size: 10,
            epochs: 1,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// Checks that the values can train.
    pub fn validate(&self) -> Result<()> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(MlError::InvalidArgument(format!(
                "learning rate must be positive and finite, got {}",
                self.learning_rate
            )));
        }
        if self.batch_size == 0 {
            return Err(MlError::InvalidArgument(
                "batch size must be positive".into(),
            ));
        }
        if self.epochs == 0 {
            return Err(MlError::InvalidArgument("epochs must be positive".into()));
        }
        Ok(())
    }
}

/// What local training produced.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    /// The trained weights.
    pub weights: TensorMap,
    /// Local examples trained on (n_k, FedAvg's weight for this update);
    /// each was seen `epochs` times.
    pub examples: usize,
    /// Mean cross-entropy over every example of every epoch, as measured
    /// during training (before each step's update).
    pub mean_loss: f64,
}

/// Loss and accuracy on a data set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean cross-entropy (natural log).
    pub loss: f64,
    /// Fraction of examples whose highest logit is the label, in `[0, 1]`.
    pub accuracy: f64,
    /// Examples evaluated (to weight metrics from several clients).
    pub examples: usize,
}

fn check_images(data: &Dataset) -> Result<()> {
    if data.image_shape() != (IMAGE_SIDE, IMAGE_SIDE) {
        let (rows, cols) = data.image_shape();
        return Err(MlError::InvalidArgument(format!(
            "the models take {IMAGE_SIDE}x{IMAGE_SIDE} images, the data are {rows}x{cols}"
        )));
    }
    if data.is_empty() {
        return Err(MlError::InvalidArgument("the data set is empty".into()));
    }
    Ok(())
}

/// The images and labels at `indices` as tensors on `device`.
fn batch(data: &Dataset, indices: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let mut pixels = Vec::with_capacity(indices.len() * IMAGE_PIXELS);
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        // Indices come from 0..data.len(), so every image exists.
        if let Some(image) = data.image(i) {
            pixels.extend_from_slice(image);
            labels.push(i64::from(data.labels()[i]));
        }
    }
    let n = labels.len();
    (
        Tensor::from_data(TensorData::new(pixels, [n, IMAGE_PIXELS]), device),
        Tensor::from_data(TensorData::new(labels, [n]), device),
    )
}

/// One SGD step; returns the updated model and the batch's mean loss.
fn step(
    model: Model,
    optimizer: &mut ModuleOptimizer,
    loss_fn: &CrossEntropyLoss,
    learning_rate: f64,
    images: Tensor<2>,
    labels: Tensor<1, Int>,
) -> Result<(Model, f64)> {
    let loss = loss_fn.forward(model.forward(images), labels);
    let value = loss
        .clone()
        .try_into_scalar::<f32>()
        .map_err(|e| MlError::Backend(format!("reading the loss: {e:?}")))?;
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = optimizer.step(learning_rate, model, grads);
    Ok((model, f64::from(value)))
}

/// Trains `global` on `data` (see the module documentation).
///
/// `progress`, if given, is called on the calling thread after every step
/// with the examples processed so far and the total (`epochs * len`).
pub fn train(
    arch: Architecture,
    global: &TensorMap,
    data: &Dataset,
    config: &TrainConfig,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<TrainOutcome> {
    config.validate()?;
    check_images(data)?;
    let pool = compute::pool()?;
    let started = Instant::now();
    let device = Device::flex().autodiff();
    let mut model = pool.install(|| Model::from_tensors(arch, global, &device))?;
    let mut optimizer = SgdConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut rng = ChaCha20Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let total = config.epochs * data.len();
    let mut done = 0usize;
    let mut loss_sum = 0.0f64;

    for epoch in 0..config.epochs {
        order.shuffle(&mut rng);
        for (b, indices) in order.chunks(config.batch_size).enumerate() {
            let (images, labels) = batch(data, indices, &device);
            let (next, loss) = pool.install(|| {
                step(
                    model,
                    &mut optimizer,
                    &loss_fn,
                    config.learning_rate,
                    images,
                    labels,
                )
            })?;
            model = next;
            if !loss.is_finite() {
                return Err(MlError::Diverged {
                    epoch,
                    batch: b,
                    loss,
                });
            }
            loss_sum += loss * indices.len() as f64;
            done += indices.len();
            if let Some(progress) = progress {
                progress(done, total);
            }
        }
    }

    let weights = pool.install(|| model.to_tensors())?;
    let mean_loss = loss_sum / total as f64;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        architecture = %arch,
        examples = data.len(),
        epochs = config.epochs,
        batch_size = config.batch_size,
        mean_loss,
        seconds,
        samples_per_second = total as f64 / seconds.max(1e-9),
        "local training done"
    );
    Ok(TrainOutcome {
        weights,
        examples: data.len(),
        mean_loss,
    })
}

/// Mean cross-entropy and accuracy of `model` on `data`, in batches.
pub fn evaluate(arch: Architecture, model: &TensorMap, data: &Dataset) -> Result<Metrics> {
    check_images(data)?;
    let pool = compute::pool()?;
    // No autodiff: evaluation needs no graph.
    let device = Device::flex();
    let model = pool.install(|| Model::from_tensors(arch, model, &device))?;
    let order: Vec<usize> = (0..data.len()).collect();
    let mut loss_sum = 0.0f64;
    let mut correct = 0usize;
    for indices in order.chunks(EVAL_BATCH) {
        let (images, _) = batch(data, indices, &device);
        let logits = pool
            .install(|| model.forward(images).try_into_vec_as::<f32>())
            .map_err(|e| MlError::Backend(format!("reading logits: {e:?}")))?;
        for (row, &i) in logits.chunks_exact(NUM_CLASSES).zip(indices) {
            let label = usize::from(data.labels()[i]);
            let (loss, predicted) = cross_entropy_and_argmax(row, label);
            loss_sum += loss;
            correct += usize::from(predicted == label);
        }
    }
    let n = data.len();
    Ok(Metrics {
        loss: loss_sum / n as f64,
        accuracy: correct as f64 / n as f64,
        examples: n,
    })
}

/// `-log softmax(row)[label]` computed stably in f64, and the first index of
/// the largest logit (PyTorch's `argmax` tie rule).
fn cross_entropy_and_argmax(row: &[f32], label: usize) -> (f64, usize) {
    let mut best = 0;
    for (k, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = k;
        }
    }
    let max = f64::from(row[best]);
    let log_sum: f64 = row
        .iter()
        .map(|&v| (f64::from(v) - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    (log_sum - f64::from(row[label]), best)
}

fn zip_with(a: &TensorMap, b: &TensorMap, op: impl Fn(f32, f32) -> f32) -> Result<TensorMap> {
    if !a.same_layout(b) {
        let names = |m: &TensorMap| {
            m.iter()
                .map(|(n, t)| format!("{n}{:?}", t.shape()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(MlError::LayoutMismatch(format!(
            "[{}] vs [{}]",
            names(a),
            names(b)
        )));
    }
    let flat: Vec<f32> = a
        .to_flat()
        .into_iter()
        .zip(b.to_flat())
        .map(|(x, y)| op(x, y))
        .collect();
    Ok(a.with_flat(&flat)?)
}

/// The update `trained - global`, tensor by tensor.
pub fn delta(trained: &TensorMap, global: &TensorMap) -> Result<TensorMap> {
    zip_with(trained, global, |t, g| t - g)
}

/// `global + delta`, tensor by tensor.
pub fn apply_delta(global: &TensorMap, delta: &TensorMap) -> Result<TensorMap> {
    zip_with(global, delta, |g, d| g + d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::initial_model;

    /// Deterministic pseudo-images: class k lights up row band k.
    fn synthetic(n: usize) -> Dataset {
        let mut images = vec![0.0f32; n * IMAGE_PIXELS];
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let label = (i * 7 % NUM_CLASSES) as u8;
            let row0 = usize::from(label) * 2 + 4;
            for r in row0..row0 + 2 {
                for c in 4..24 {
                    images[i * IMAGE_PIXELS + r * IMAGE_SIDE + c] = 1.0;
                }
            }
            labels.push(label);
        }
        Dataset::new(images, labels, IMAGE_SIDE, IMAGE_SIDE).unwrap()
    }

    #[test]
    fn config_validation() {
        assert!(TrainConfig::default().validate().is_ok());
        for bad in [
            TrainConfig {
                learning_rate: 0.0,
                ..TrainConfig::default()
            },
            TrainConfig {
                learning_rate: f64::NAN,
                ..TrainConfig::default()
            },
            TrainConfig {
                batch_size: 0,
                ..TrainConfig::default()
            },
            TrainConfig {
                epochs: 0,
                ..TrainConfig::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(MlError::InvalidArgument(_))));
        }
        let json = r#"{"learning_rate":0.1,"batch_size":10,"epochs":5,"seed":1}"#;
        let config: TrainConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.epochs, 5);
        assert!(serde_json::from_str::<TrainConfig>(r#"{"learning_rate":0.1}"#).is_err());
    }

    #[test]
    fn delta_round_trip() {
        let global = initial_model(Architecture::Mnist2nn, 1).unwrap();
        let trained = initial_model(Architecture::Mnist2nn, 2).unwrap();
        let update = delta(&trained, &global).unwrap();
        let rebuilt = apply_delta(&global, &update).unwrap();
        for ((_, a), (_, b)) in rebuilt.iter().zip(trained.iter()) {
            for (x, y) in a.data().iter().zip(b.data()) {
                assert!((x - y).abs() <= 1e-6);
            }
        }
        let cnn = initial_model(Architecture::MnistCnn, 1).unwrap();
        assert!(matches!(
            delta(&cnn, &global),
            Err(MlError::LayoutMismatch(_))
        ));
    }

    #[test]
    fn cross_entropy_matches_the_definition() {
        let (loss, best) = cross_entropy_and_argmax(&[0.0, 0.0], 1);
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-12);
        assert_eq!(best, 0, "ties go to the first index");
        let (loss, best) = cross_entropy_and_argmax(&[1000.0, 0.0, -5.0], 0);
        assert!(loss.abs() < 1e-12 && best == 0);
    }

    #[test]
    fn training_is_deterministic_and_learns() {
        let data = synthetic(200);
        let arch = Architecture::Mnist2nn;
        let global = initial_model(arch, 4).unwrap();
        let config = TrainConfig {
            learning_rate: 0.1,
            batch_size: 10,
            epochs: 2,
            seed: 9,
        };
        let calls = std::cell::Cell::new(0usize);
        let last = std::cell::Cell::new((0, 0));
        let progress = |done: usize, total: usize| {
            calls.set(calls.get() + 1);
            last.set((done, total));
        };
        let a = train(arch, &global, &data, &config, Some(&progress)).unwrap();
        assert_eq!(calls.get(), 40);
        assert_eq!(last.get(), (400, 400));
        let b = train(arch, &global, &data, &config, None).unwrap();
        assert_eq!(a.weights, b.weights, "same seed, bit-identical weights");
        assert_eq!(a.examples, 200);
        let c = train(
            arch,
            &global,
            &data,
            &TrainConfig {
                seed: 10,
                ..config.clone()
            },
            None,
        )
        .unwrap();
        assert_ne!(a.weights, c.weights, "the seed drives the shuffle");

        let before = evaluate(arch, &global, &data).unwrap();
        let after = evaluate(arch, &a.weights, &data).unwrap();
        assert_eq!(after.examples, 200);
        assert!(after.loss < before.loss);
        assert!(after.accuracy > 0.9, "{after:?}");
    }

    /// One SGD step of the 2NN computed by hand in f64 (PyTorch convention:
    /// y = W x + b), to check burn's loss, gradients and update end to end.
    fn reference_step(model: &TensorMap, data: &Dataset, lr: f64) -> TensorMap {
        let get = |name: &str| -> Vec<f64> {
            model
                .get(name)
                .unwrap()
                .data()
                .iter()
                .map(|&v| f64::from(v))
                .collect()
        };
        let layers = [("fc1", 784, 200), ("fc2", 200, 200), ("fc3", 200, 10)];
        let weights: Vec<(Vec<f64>, Vec<f64>)> = layers
            .iter()
            .map(|(l, _, _)| (get(&format!("{l}.weight")), get(&format!("{l}.bias"))))
            .collect();
        let mut grads: Vec<(Vec<f64>, Vec<f64>)> = layers
            .iter()
            .map(|&(_, i, o)| (vec![0.0; i * o], vec![0.0; o]))
            .collect();
        let n = data.len() as f64;
        for k in 0..data.len() {
            // Forward, keeping each layer's input.
            let mut inputs: Vec<Vec<f64>> = Vec::new();
            let mut x: Vec<f64> = data
                .image(k)
                .unwrap()
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            for (li, &(_, fan_in, fan_out)) in layers.iter().enumerate() {
                let (w, b) = &weights[li];
                let mut y: Vec<f64> = (0..fan_out)
                    .map(|o| b[o] + (0..fan_in).map(|i| w[o * fan_in + i] * x[i]).sum::<f64>())
                    .collect();
                if li < 2 {
                    y.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                inputs.push(std::mem::replace(&mut x, y));
            }
            // dLoss/dlogits = softmax - onehot, divided by the batch size (mean).
            let max = x.iter().copied().fold(f64::MIN, f64::max);
            let sum: f64 = x.iter().map(|v| (v - max).exp()).sum();
            let label = usize::from(data.labels()[k]);
            let mut dy: Vec<f64> = x
                .iter()
                .enumerate()
                .map(|(o, v)| ((v - max).exp() / sum - f64::from(u8::from(o == label))) / n)
                .collect();
            for li in (0..3).rev() {
                let (_, fan_in, fan_out) = layers[li];
                let input = &inputs[li];
                let (w, _) = &weights[li];
                let (grad_w, grad_b) = &mut grads[li];
                for (o, &d) in dy.iter().enumerate() {
                    grad_b[o] += d;
                    let row = &mut grad_w[o * fan_in..(o + 1) * fan_in];
                    for (g, &x) in row.iter_mut().zip(input) {
                        *g += d * x;
                    }
                }
                if li > 0 {
                    // Back through the previous layer's ReLU (its output is `input`).
                    dy = (0..fan_in)
                        .map(|i| {
                            let g: f64 = (0..fan_out).map(|o| w[o * fan_in + i] * dy[o]).sum();
                            if input[i] > 0.0 { g } else { 0.0 }
                        })
                        .collect();
                }
            }
        }
        let mut out = model.clone();
        for (li, (l, _, _)) in layers.iter().enumerate() {
            for (suffix, grad) in [("weight", &grads[li].0), ("bias", &grads[li].1)] {
                let t = out.get_mut(&format!("{l}.{suffix}")).unwrap();
                for (v, g) in t.data_mut().iter_mut().zip(grad.iter()) {
                    *v = (f64::from(*v) - lr * g) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn one_step_matches_a_hand_computed_sgd_step() {
        let arch = Architecture::Mnist2nn;
        let global = initial_model(arch, 12).unwrap();
        let data = synthetic(6);
        let config = TrainConfig {
            learning_rate: 0.5,
            batch_size: 6,
            epochs: 1,
            seed: 0,
        };
        let ours = train(arch, &global, &data, &config, None).unwrap().weights;
        let expected = reference_step(&global, &data, config.learning_rate);
        let mut worst = 0.0f32;
        for ((name, a), (_, b)) in ours.iter().zip(expected.iter()) {
            for (x, y) in a.data().iter().zip(b.data()) {
                worst = worst.max((x - y).abs());
            }
            assert_ne!(a.data(), global.get(name).unwrap().data(), "{name} moved");
        }
        assert!(
            worst < 1e-5,
            "largest difference from the reference: {worst}"
        );
    }

    #[test]
    fn concurrent_devices_share_the_pool_and_match_sequential_runs() {
        let data = synthetic(60);
        let global = initial_model(Architecture::Mnist2nn, 5).unwrap();
        let config = |seed| TrainConfig {
            learning_rate: 0.1,
            batch_size: 10,
            epochs: 1,
            seed,
        };
        let sequential: Vec<TensorMap> = (0..6)
            .map(|s| {
                train(Architecture::Mnist2nn, &global, &data, &config(s), None)
                    .unwrap()
                    .weights
            })
            .collect();
        let concurrent: Vec<TensorMap> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..6)
                .map(|s| {
                    let (data, global) = (&data, &global);
                    scope.spawn(move || {
                        train(Architecture::Mnist2nn, global, data, &config(s), None)
                            .unwrap()
                            .weights
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(sequential, concurrent);
    }

    #[test]
    fn rejects_bad_inputs() {
        let arch = Architecture::Mnist2nn;
        let global = initial_model(arch, 0).unwrap();
        let config = TrainConfig::default();
        let small = Dataset::new(vec![0.5; 4], vec![1], 2, 2).unwrap();
        assert!(train(arch, &global, &small, &config, None).is_err());
        let empty = synthetic(10).subset(&[]).unwrap();
        assert!(train(arch, &global, &empty, &config, None).is_err());
        assert!(evaluate(arch, &global, &empty).is_err());
        let cnn = initial_model(Architecture::MnistCnn, 0).unwrap();
        assert!(matches!(
            train(arch, &cnn, &synthetic(10), &config, None),
            Err(MlError::Layout { .. })
        ));
        let diverging = TrainConfig {
            learning_rate: 1e30,
            ..config
        };
        assert!(matches!(
            train(arch, &global, &synthetic(50), &diverging, None),
            Err(MlError::Diverged { .. })
        ));
    }
}
