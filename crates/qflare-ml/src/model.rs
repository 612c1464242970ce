//! The two models of McMahan et al. (2017) and their exchange format.
//!
//! Over 600 lines because its tests live here (about 160 of them): the code
//! itself is under 600, the two architectures and the PyTorch-compatible
//! tensor naming they share, which read best side by side.
//!
//! A model is a burn [`Module`] while it computes and a [`TensorMap`] at
//! every boundary: the server, the enclave and model files only ever see the
//! map. The map uses PyTorch's names and layouts, so that
//! `TensorMap::to_safetensors()` of a model is a file that loads into these
//! PyTorch modules with `model.load_state_dict(safetensors.torch.load_file(p))`:
//!
//! ```python
//! class Mnist2nn(nn.Module):            # "mnist-2nn", 199,210 parameters
//!     def __init__(self):
//!         super().__init__()
//!         self.fc1 = nn.Linear(784, 200)
//!         self.fc2 = nn.Linear(200, 200)
//!         self.fc3 = nn.Linear(200, 10)
//!     def forward(self, x):             # x: [N, 784] or [N, 1, 28, 28] in [0, 1]
//!         x = x.flatten(1)
//!         return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))
//!
//! class MnistCnn(nn.Module):            # "mnist-cnn", 1,663,370 parameters
//!     def __init__(self):
//!         super().__init__()
//!         self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
//!         self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
//!         self.fc1 = nn.Linear(64 * 7 * 7, 512)
//!         self.fc2 = nn.Linear(512, 10)
//!     def forward(self, x):
//!         x = x.view(-1, 1, 28, 28)
//!         x = F.max_pool2d(F.relu(self.conv1(x)), 2)
//!         x = F.max_pool2d(F.relu(self.conv2(x)), 2)
//!         return self.fc2(F.relu(self.fc1(x.flatten(1))))
//! ```
//!
//! Names are the burn field paths (`fc1.weight`, `conv2.bias`), which we
//! chose to equal PyTorch's attribute names. Shapes are PyTorch's: burn
//! stores a linear layer's weight as `[in, out]`, so the conversion
//! transposes it to `[out, in]` and back; convolution weights are
//! `[out, in, kh, kw]` in both. The conversion walks the module with burn's
//! [`ModuleVisitor`] and [`ModuleMapper`], so a layer added to a model gets a
//! name without further code, and loading refuses a map with a missing,
//! extra or misshapen tensor.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use qflare_protocol::tensor::{Tensor as NamedTensor, TensorMap};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::error::{MlError, Result};

/// Height and width of the images both models take.
pub const IMAGE_SIDE: usize = 28;
/// Pixels per image.
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;
/// Number of classes both models predict.
pub const NUM_CLASSES: usize = 10;
/// Largest model file [`load_model`] reads (the CNN is 6.7 MB).
pub const MAX_MODEL_FILE_BYTES: usize = 64 * 1024 * 1024;

/// A model architecture, named by a stable id that travels in model
/// certificates and configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Architecture {
    /// `mnist-2nn`: 784-200-200-10 with ReLU, 199,210 parameters.
    #[serde(rename = "mnist-2nn")]
    Mnist2nn,
    /// `mnist-cnn`: two 5x5 convolutions (32, 64 channels, "same" padding),
    /// each followed by ReLU and 2x2 max-pooling, then 512 ReLU and 10;
    /// 1,663,370 parameters.
    #[serde(rename = "mnist-cnn")]
    MnistCnn,
}

/// One parameter tensor of an architecture, in PyTorch convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Name in the tensor map (`fc1.weight`).
    pub name: &'static str,
    /// Shape in PyTorch convention (`[out, in]` for linear weights).
    pub shape: &'static [usize],
    /// Inputs feeding each output unit; sets the initialisation bound.
    pub fan_in: usize,
}

const fn spec(name: &'static str, shape: &'static [usize], fan_in: usize) -> ParamSpec {
    ParamSpec {
        name,
        shape,
        fan_in,
    }
}

const MNIST_2NN_LAYOUT: &[ParamSpec] = &[
    spec("fc1.weight", &[200, 784], 784),
    spec("fc1.bias", &[200], 784),
    spec("fc2.weight", &[200, 200], 200),
    spec("fc2.bias", &[200], 200),
    spec("fc3.weight", &[10, 200], 200),
    spec("fc3.bias", &[10], 200),
];

const MNIST_CNN_LAYOUT: &[ParamSpec] = &[
    spec("conv1.weight", &[32, 1, 5, 5], 25),
    spec("conv1.bias", &[32], 25),
    spec("conv2.weight", &[64, 32, 5, 5], 32 * 25),
    spec("conv2.bias", &[64], 32 * 25),
    spec("fc1.weight", &[512, 3136], 3136),
    spec("fc1.bias", &[512], 3136),
    spec("fc2.weight", &[10, 512], 512),
    spec("fc2.bias", &[10], 512),
];

impl Architecture {
    /// Every architecture, in a stable order.
    pub const ALL: [Self; 2] = [Self::Mnist2nn, Self::MnistCnn];

    /// The stable id: `mnist-2nn` or `mnist-cnn`.
    pub fn id(self) -> &'static str {
        match self {
            Self::Mnist2nn => "mnist-2nn",
            Self::MnistCnn => "mnist-cnn",
        }
    }

    /// The parameter tensors, in declaration order (the order initial
    /// weights are drawn in).
    pub fn layout(self) -> &'static [ParamSpec] {
        match self {
            Self::Mnist2nn => MNIST_2NN_LAYOUT,
            Self::MnistCnn => MNIST_CNN_LAYOUT,
        }
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(self) -> usize {
        self.layout()
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }

    /// Checks that `map` holds exactly this architecture's tensors, with
    /// their shapes, and only finite values.
    pub fn validate(self, map: &TensorMap) -> Result<()> {
        let layout_error = |reason: String| MlError::Layout {
            architecture: self.id(),
            reason,
        };
        for spec in self.layout() {
            let tensor = map
                .get(spec.name)
                .ok_or_else(|| layout_error(format!("tensor {} is missing", spec.name)))?;
            if tensor.shape() != spec.shape {
                return Err(layout_error(format!(
                    "tensor {} has shape {:?}, expected {:?}",
                    spec.name,
                    tensor.shape(),
                    spec.shape
                )));
            }
            // A NaN or infinity would silently poison every later round.
            if !tensor.data().iter().all(|v| v.is_finite()) {
                return Err(layout_error(format!(
                    "tensor {} holds a non-finite value",
                    spec.name
                )));
            }
        }
        if map.len() != self.layout().len() {
            let extra: Vec<&str> = map
                .iter()
                .map(|(name, _)| name)
                .filter(|name| !self.layout().iter().any(|s| s.name == *name))
                .collect();
            return Err(layout_error(format!(
                "unexpected tensors {}",
                extra.join(", ")
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl FromStr for Architecture {
    type Err = MlError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.id() == s)
            .ok_or_else(|| MlError::UnknownArchitecture(s.to_owned()))
    }
}

/// The MNIST 2NN: 784-200-200-10 with ReLU.
#[derive(Module, Debug)]
pub struct Mnist2nn {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl Mnist2nn {
    /// The layers, with burn's lazy initialisers that [`Model::from_tensors`]
    /// replaces before they ever run.
    pub(crate) fn new(device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(IMAGE_PIXELS, 200).init(device),
            fc2: LinearConfig::new(200, 200).init(device),
            fc3: LinearConfig::new(200, NUM_CLASSES).init(device),
        }
    }

    /// Logits `[batch, 10]` for flattened images `[batch, 784]`.
    pub fn forward(&self, images: Tensor<2>) -> Tensor<2> {
        let x = relu(self.fc1.forward(images));
        let x = relu(self.fc2.forward(x));
        self.fc3.forward(x)
    }
}

/// The MNIST CNN of McMahan et al. (2017).
#[derive(Module, Debug)]
pub struct MnistCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
}

impl MnistCnn {
    /// The layers, with burn's lazy initialisers that [`Model::from_tensors`]
    /// replaces before they ever run.
    pub(crate) fn new(device: &Device) -> Self {
        let conv = |channels: [usize; 2]| {
            Conv2dConfig::new(channels, [5, 5])
                .with_padding(PaddingConfig2d::Same)
                .init(device)
        };
        Self {
            conv1: conv([1, 32]),
            conv2: conv([32, 64]),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(64 * 7 * 7, 512).init(device),
            fc2: LinearConfig::new(512, NUM_CLASSES).init(device),
        }
    }

    /// Logits `[batch, 10]` for flattened images `[batch, 784]`.
    pub fn forward(&self, images: Tensor<2>) -> Tensor<2> {
        let [batch, _] = images.dims();
        let x = images.reshape([batch, 1, IMAGE_SIDE, IMAGE_SIDE]);
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        // Row-major [N, C, H, W] flattened as torch.flatten(x, 1) does.
        let x = x.reshape([batch, 64 * 7 * 7]);
        let x = relu(self.fc1.forward(x));
        self.fc2.forward(x)
    }
}

/// A model of either architecture, living on a burn device.
///
/// It derives [`Module`] so that the optimiser steps it as one module; its
/// exchange format is [`Model::to_tensors`] (names without the variant).
// One model exists per training run; 450 bytes of padding on the 2NN do not
// matter, and burn's derive does not see through a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Model {
    /// The 2NN.
    Mnist2nn(Mnist2nn),
    /// The CNN.
    MnistCnn(MnistCnn),
}

impl Model {
    /// Builds `arch` on `device` holding the weights in `map`, after checking
    /// that the map fits the architecture.
    pub fn from_tensors(arch: Architecture, map: &TensorMap, device: &Device) -> Result<Self> {
        arch.validate(map)?;
        Ok(match arch {
            Architecture::Mnist2nn => {
                Self::Mnist2nn(load_module_tensors(Mnist2nn::new(device), map, device)?)
            }
            Architecture::MnistCnn => {
                Self::MnistCnn(load_module_tensors(MnistCnn::new(device), map, device)?)
            }
        })
    }

    /// The weights, by PyTorch name and shape.
    pub fn to_tensors(&self) -> Result<TensorMap> {
        match self {
            Self::Mnist2nn(m) => module_to_tensors(m),
            Self::MnistCnn(m) => module_to_tensors(m),
        }
    }

    /// The architecture.
    pub fn architecture(&self) -> Architecture {
        match self {
            Self::Mnist2nn(_) => Architecture::Mnist2nn,
            Self::MnistCnn(_) => Architecture::MnistCnn,
        }
    }

    /// Logits `[batch, 10]` for flattened images `[batch, 784]`.
    ///
    /// Like every burn layer, panics on an input of another width;
    /// [`train()`](crate::train()) and [`evaluate`](crate::evaluate) check
    /// the data before they get here.
    pub fn forward(&self, images: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Mnist2nn(m) => m.forward(images),
            Self::MnistCnn(m) => m.forward(images),
        }
    }
}

/// Where a module traversal is: the field names entered so far, each with
/// the type of the struct that owns it.
#[derive(Default)]
struct PathStack(Vec<(String, String)>);

impl PathStack {
    fn enter(&mut self, name: &str, container_type: &str) {
        self.0.push((name.to_owned(), container_type.to_owned()));
    }

    fn exit(&mut self) {
        self.0.pop();
    }

    fn name(&self) -> String {
        let parts: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
        parts.join(".")
    }

    /// burn stores linear weights as `[in, out]`, PyTorch as `[out, in]`.
    fn is_linear_weight(&self) -> bool {
        matches!(self.0.last(), Some((n, t)) if n == "weight" && t == "Struct:Linear")
    }
}

/// Swaps the two axes of a row-major `[rows, cols]` matrix.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

struct Exporter {
    path: PathStack,
    out: TensorMap,
    error: Option<MlError>,
}

impl ModuleVisitor for Exporter {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.error.is_some() {
            return;
        }
        let tensor = param.val();
        let dims = tensor.dims();
        let result = tensor
            .try_into_vec_as::<f32>()
            .map_err(|e| MlError::Backend(format!("reading {}: {e:?}", self.path.name())))
            .and_then(|data| {
                let (shape, data) = if D == 2 && self.path.is_linear_weight() {
                    (vec![dims[1], dims[0]], transpose(&data, dims[0], dims[1]))
                } else {
                    (dims.to_vec(), data)
                };
                let tensor = NamedTensor::new(shape, data)?;
                self.out.insert(self.path.name(), tensor)?;
                Ok(())
            });
        if let Err(e) = result {
            self.error = Some(e);
        }
    }
}

struct Importer<'a> {
    path: PathStack,
    source: &'a TensorMap,
    device: Device,
    loaded: usize,
    error: Option<MlError>,
}

impl Importer<'_> {
    fn tensor_for<const D: usize>(&self, burn_shape: &[usize]) -> Result<Tensor<D>> {
        let name = self.path.name();
        let stored = self
            .source
            .get(&name)
            .ok_or_else(|| MlError::LayoutMismatch(format!("tensor {name} is missing")))?;
        let linear = D == 2 && self.path.is_linear_weight();
        let expected: Vec<usize> = if linear {
            burn_shape.iter().rev().copied().collect()
        } else {
            burn_shape.to_vec()
        };
        if stored.shape() != expected.as_slice() {
            return Err(MlError::LayoutMismatch(format!(
                "tensor {name} has shape {:?}, expected {expected:?}",
                stored.shape()
            )));
        }
        let data = if linear {
            transpose(stored.data(), expected[0], expected[1])
        } else {
            stored.data().to_vec()
        };
        Ok(Tensor::from_data(
            TensorData::new(data, burn_shape.to_vec()),
            &self.device,
        ))
    }
}

impl ModuleMapper for Importer<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        // `lazy_shape` reads the shape without running burn's initialiser,
        // whose random draw we are about to replace anyway.
        let shape = param.lazy_shape();
        match self.tensor_for::<D>(shape.as_slice()) {
            Ok(tensor) => {
                self.loaded += 1;
                let id = param.id;
                // Keeps the parameter's id, device and gradient setting.
                param.transform_for_load(tensor, id)
            }
            Err(e) => {
                self.error = Some(e);
                param
            }
        }
    }
}

/// The float parameters of a burn struct module as a [`TensorMap`], named
/// by field path, linear weights transposed to PyTorch's `[out, in]`.
///
/// Crate-private because burn's derive adds the variant name to the path of
/// an enum's fields: called on [`Model`] itself, names would gain a
/// `Mnist2nn.` prefix. [`Model::to_tensors`] calls it on the inner struct.
pub(crate) fn module_to_tensors<M: Module>(module: &M) -> Result<TensorMap> {
    let mut exporter = Exporter {
        path: PathStack::default(),
        out: TensorMap::new(),
        error: None,
    };
    module.visit(&mut exporter);
    match exporter.error {
        Some(e) => Err(e),
        None => Ok(exporter.out),
    }
}

/// Replaces every float parameter of a burn struct module with the tensor
/// of the same name in `map` (PyTorch convention, as [`module_to_tensors`]
/// writes), on `device`. Fails if a tensor is missing or misshapen, or if
/// `map` holds tensors the module does not have.
pub(crate) fn load_module_tensors<M: Module>(
    module: M,
    map: &TensorMap,
    device: &Device,
) -> Result<M> {
    let mut importer = Importer {
        path: PathStack::default(),
        source: map,
        device: device.clone(),
        loaded: 0,
        error: None,
    };
    let module = module.map(&mut importer);
    if let Some(e) = importer.error {
        return Err(e);
    }
    if importer.loaded != map.len() {
        return Err(MlError::LayoutMismatch(format!(
            "the map holds {} tensors, the module {}",
            map.len(),
            importer.loaded
        )));
    }
    Ok(module)
}

/// Initial weights for `arch`, deterministic under `seed`.
///
/// Each tensor is drawn, in [`Architecture::layout`] order, from ChaCha20
/// seeded with `seed`, uniform in `±1/sqrt(fan_in)` — PyTorch's default for
/// `nn.Linear` and `nn.Conv2d` weights and biases. We draw them ourselves
/// rather than through burn because burn's generator is process-global,
/// which would make concurrent devices' models depend on timing.
pub fn initial_model(arch: Architecture, seed: u64) -> Result<TensorMap> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut map = TensorMap::new();
    for spec in arch.layout() {
        let bound = 1.0 / (spec.fan_in as f32).sqrt();
        let count = spec.shape.iter().product();
        let data = (0..count)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        map.insert(spec.name, NamedTensor::new(spec.shape.to_vec(), data)?)?;
    }
    Ok(map)
}

/// Writes `model` to `path` as a safetensors file, atomically (a reader
/// never sees half a file).
pub fn save_model(path: &Path, model: &TensorMap) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, model.to_safetensors()).map_err(|e| MlError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| MlError::io(path, e))?;
    Ok(())
}

/// Reads a safetensors model file (at most [`MAX_MODEL_FILE_BYTES`]) and,
/// given an architecture, checks that the model fits it.
pub fn load_model(path: &Path, arch: Option<Architecture>) -> Result<TensorMap> {
    let len = std::fs::metadata(path)
        .map_err(|e| MlError::io(path, e))?
        .len();
    if len > MAX_MODEL_FILE_BYTES as u64 {
        return Err(MlError::InvalidArgument(format!(
            "{} is {len} bytes, over the {MAX_MODEL_FILE_BYTES}-byte limit for model files",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| MlError::io(path, e))?;
    let map = TensorMap::from_safetensors(&bytes, MAX_MODEL_FILE_BYTES)?;
    if let Some(arch) = arch {
        arch.validate(&map)?;
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_paper() {
        assert_eq!(Architecture::Mnist2nn.num_parameters(), 199_210);
        assert_eq!(Architecture::MnistCnn.num_parameters(), 1_663_370);
        let device = Device::flex();
        assert_eq!(Mnist2nn::new(&device).num_params(), 199_210);
        assert_eq!(MnistCnn::new(&device).num_params(), 1_663_370);
        for arch in Architecture::ALL {
            let map = initial_model(arch, 1).unwrap();
            assert_eq!(map.num_parameters(), arch.num_parameters());
        }
    }

    #[test]
    fn ids_round_trip() {
        for arch in Architecture::ALL {
            assert_eq!(arch.to_string().parse::<Architecture>().unwrap(), arch);
            let json = serde_json::to_string(&arch).unwrap();
            assert_eq!(
                json,
                format!("\"{}\"", arch.id()),
                "serde uses the Display id"
            );
            assert_eq!(serde_json::from_str::<Architecture>(&json).unwrap(), arch);
        }
        assert!(matches!(
            "mnist-mlp".parse::<Architecture>(),
            Err(MlError::UnknownArchitecture(_))
        ));
    }

    #[test]
    fn initial_model_is_deterministic_and_bounded() {
        for arch in Architecture::ALL {
            let a = initial_model(arch, 7).unwrap();
            assert_eq!(a, initial_model(arch, 7).unwrap());
            assert_ne!(a, initial_model(arch, 8).unwrap());
            arch.validate(&a).unwrap();
            for spec in arch.layout() {
                let bound = 1.0 / (spec.fan_in as f32).sqrt();
                let t = a.get(spec.name).unwrap();
                assert!(t.data().iter().all(|v| v.abs() <= bound));
            }
        }
    }

    #[test]
    fn tensor_map_round_trip_through_burn() {
        let device = Device::flex();
        for arch in Architecture::ALL {
            let map = initial_model(arch, 3).unwrap();
            let model = Model::from_tensors(arch, &map, &device).unwrap();
            assert_eq!(model.architecture(), arch);
            let back = model.to_tensors().unwrap();
            assert_eq!(back, map, "{arch}: names, shapes and values survive");
            let names: Vec<&str> = back.iter().map(|(n, _)| n).collect();
            let mut expected: Vec<&str> = arch.layout().iter().map(|s| s.name).collect();
            expected.sort_unstable();
            assert_eq!(names, expected);
        }
    }

    #[test]
    fn linear_weights_are_pytorch_oriented() {
        // y = x W^T + b in PyTorch: with W[o][i] = 1 only for (o=3, i=5),
        // output 3 must equal input 5.
        let device = Device::flex();
        let mut map = initial_model(Architecture::Mnist2nn, 0).unwrap();
        for (_, t) in map.iter_mut() {
            t.data_mut().fill(0.0);
        }
        let set = |map: &mut TensorMap, name: &str, o: usize, i: usize| {
            let t = map.get_mut(name).unwrap();
            let cols = t.shape()[1];
            t.data_mut()[o * cols + i] = 1.0;
        };
        set(&mut map, "fc1.weight", 3, 5);
        set(&mut map, "fc2.weight", 3, 3);
        set(&mut map, "fc3.weight", 7, 3);
        let model = Model::from_tensors(Architecture::Mnist2nn, &map, &device).unwrap();
        let mut x = vec![0.0f32; IMAGE_PIXELS];
        x[5] = 0.75;
        let input = Tensor::<2>::from_data(TensorData::new(x, [1, IMAGE_PIXELS]), &device);
        let out = model.forward(input).try_into_vec_as::<f32>().unwrap();
        assert_eq!(out.len(), NUM_CLASSES);
        assert!((out[7] - 0.75).abs() < 1e-6, "{out:?}");
        assert!(out.iter().enumerate().all(|(k, v)| k == 7 || *v == 0.0));
    }

    #[test]
    fn rejects_maps_that_do_not_fit() {
        let device = Device::flex();
        let arch = Architecture::Mnist2nn;
        let good = initial_model(arch, 0).unwrap();

        let cnn = initial_model(Architecture::MnistCnn, 0).unwrap();
        let err = Model::from_tensors(arch, &cnn, &device).unwrap_err();
        assert!(
            err.to_string().contains("fc1.weight has shape [512, 3136]"),
            "{err}"
        );
        let mut partial = TensorMap::new();
        for (name, t) in good.iter().filter(|(n, _)| *n != "fc2.bias") {
            partial.insert(name, t.clone()).unwrap();
        }
        let err = Model::from_tensors(arch, &partial, &device).unwrap_err();
        assert!(err.to_string().contains("fc2.bias is missing"), "{err}");
        let err = load_module_tensors(Mnist2nn::new(&device), &partial, &device).unwrap_err();
        assert!(err.to_string().contains("fc2.bias is missing"), "{err}");

        let mut extra = good.clone();
        extra
            .insert("fc4.weight", NamedTensor::zeros(vec![1]).unwrap())
            .unwrap();
        let err = arch.validate(&extra).unwrap_err();
        assert!(err.to_string().contains("fc4.weight"), "{err}");

        let mut reshaped = TensorMap::new();
        for (name, t) in good.iter() {
            let t = if name == "fc2.weight" {
                NamedTensor::new(vec![100, 400], t.data().to_vec()).unwrap()
            } else {
                t.clone()
            };
            reshaped.insert(name, t).unwrap();
        }
        let err = Model::from_tensors(arch, &reshaped, &device).unwrap_err();
        assert!(err.to_string().contains("fc2.weight"), "{err}");
        // The generic loader checks shapes itself, without the layout table.
        let err = load_module_tensors(Mnist2nn::new(&device), &reshaped, &device).unwrap_err();
        assert!(matches!(err, MlError::LayoutMismatch(_)), "{err}");
        let err = load_module_tensors(Mnist2nn::new(&device), &extra, &device).unwrap_err();
        assert!(matches!(err, MlError::LayoutMismatch(_)), "{err}");

        let mut poisoned = good;
        poisoned.get_mut("fc3.bias").unwrap().data_mut()[0] = f32::NAN;
        let err = arch.validate(&poisoned).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }

    #[test]
    fn model_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("global.safetensors");
        let map = initial_model(Architecture::MnistCnn, 11).unwrap();
        save_model(&path, &map).unwrap();
        let back = load_model(&path, Some(Architecture::MnistCnn)).unwrap();
        assert_eq!(back, map);
        assert_eq!(std::fs::read(&path).unwrap(), map.to_safetensors());
        assert!(load_model(&path, Some(Architecture::Mnist2nn)).is_err());
        std::fs::write(&path, b"not a model").unwrap();
        assert!(matches!(load_model(&path, None), Err(MlError::Protocol(_))));
        assert!(matches!(
            load_model(&dir.path().join("absent"), None),
            Err(MlError::MissingFile { .. })
        ));
    }
}
