//! Named f32 tensors and their canonical safetensors encoding.
//!
//! Models and updates travel as [safetensors] files: an 8-byte little-endian
//! header length, a JSON header mapping each name to its dtype, shape and
//! byte range, then the raw little-endian data. PyTorch loads them with
//! `safetensors.torch.load_file`. Our encoder is canonical — tensors in
//! name order, contiguous, header padded with spaces to 8 bytes — so a
//! model's digest is a function of its contents alone.
//!
//! The decoder accepts any well-formed safetensors file of floating tensors
//! (not only our canonical form): F32, and F16 or BF16 widened to f32, since
//! aggregation runs in f32 whatever the devices train in. Integer and boolean
//! tensors (BatchNorm's `num_batches_tracked`, masks) are refused by name:
//! averaging a counter is meaningless, and carrying it silently would hide a
//! model that is not what the admin registered. Every offset and size is
//! checked with checked arithmetic against the limits before a value is read.
//!
//! One file of about 600 lines, a third of them tests, on purpose: the
//! encoder and the one checked parser (which `update_encoding` also uses)
//! must stay side by side, so a change to one is seen against the other.
//!
//! [safetensors]: https://github.com/huggingface/safetensors

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::crypto::sha256;
use crate::error::{ProtocolError, Result};

/// Longest tensor name.
pub const MAX_NAME_LEN: usize = 128;
/// Most dimensions per tensor.
pub const MAX_RANK: usize = 8;
/// Most tensors per map.
pub const MAX_TENSORS: usize = 4096;
/// Largest JSON header accepted.
pub const MAX_HEADER_LEN: usize = 1024 * 1024;

/// A dense f32 tensor in row-major order.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print weights: they are the data a curious host must not see.
        write!(f, "Tensor(shape {:?})", self.shape)
    }
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// A tensor of `shape` holding `data`; the element count must match.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        if shape.len() > MAX_RANK {
            return Err(ProtocolError::malformed("tensor", "rank over 8"));
        }
        match element_count(&shape) {
            Some(n) if n == data.len() => Ok(Self { shape, data }),
            _ => Err(ProtocolError::malformed(
                "tensor",
                "shape does not match element count",
            )),
        }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Result<Self> {
        let n = element_count(&shape)
            .ok_or_else(|| ProtocolError::malformed("tensor", "shape overflows"))?;
        Self::new(shape, vec![0.0; n])
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The elements, mutably.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes the tensor, returning its elements.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
}

/// Checks a tensor name: 1 to 128 characters of `[A-Za-z0-9._/-]`, so it
/// needs no JSON escaping and cannot collide with `__metadata__`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with("__")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::malformed(
            "tensor name",
            "use 1 to 128 characters of A-Z a-z 0-9 . _ / -",
        ))
    }
}

/// Named tensors, kept in name order.
#[derive(Clone, Default, PartialEq)]
pub struct TensorMap {
    tensors: BTreeMap<String, Tensor>,
}

impl std::fmt::Debug for TensorMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.tensors.iter()).finish()
    }
}

/// The element types a safetensors file may hold here: the floating ones
/// every model and update may use, and `I8`, which only the 8-bit update
/// encoding ([`crate::update_encoding`]) accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dtype {
    F32,
    F16,
    Bf16,
    I8,
}

impl Dtype {
    /// The floating types, with the message that refuses any other.
    fn float(name: &str, dtype: &str) -> Result<Self> {
        match dtype {
            "F32" => Ok(Self::F32),
            "F16" => Ok(Self::F16),
            "BF16" => Ok(Self::Bf16),
            other => Err(ProtocolError::malformed(
                "safetensors",
                format!(
                    "tensor {name} has dtype {other}: only floating tensors (F32, F16, BF16) \
                     are federated; leave integer buffers such as BatchNorm's \
                     num_batches_tracked out of the model file"
                ),
            )),
        }
    }

    /// The name safetensors gives the type.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::I8 => "I8",
        }
    }

    fn width(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::I8 => 1,
        }
    }

    /// Little-endian elements of this type as f32 (exact: every one of
    /// these types is a subset of f32).
    pub(crate) fn widen(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Self::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Self::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Self::Bf16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Self::I8 => bytes.iter().map(|b| f32::from(*b as i8)).collect(),
        }
    }
}

/// One tensor of a checked safetensors file, its data not yet converted.
pub(crate) struct RawTensor<'a> {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: Dtype,
    pub(crate) data: &'a [u8],
}

/// A safetensors file whose every offset and size has been checked.
pub(crate) struct RawSafetensors<'a> {
    /// In the order of their data.
    pub(crate) tensors: Vec<RawTensor<'a>>,
    /// The `__metadata__` map (absent: empty).
    pub(crate) metadata: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl TensorMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor; names must be valid and unique.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Result<()> {
        let name = name.into();
        validate_name(&name)?;
        if self.tensors.len() >= MAX_TENSORS {
            return Err(ProtocolError::malformed(
                "tensor map",
                "more than 4096 tensors",
            ));
        }
        if self.tensors.contains_key(&name) {
            return Err(ProtocolError::malformed(
                "tensor map",
                format!("duplicate tensor {name}"),
            ));
        }
        self.tensors.insert(name, tensor);
        Ok(())
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor called `name`, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.get_mut(name)
    }

    /// Tensors in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Tensors in name order, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.tensors.iter_mut().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The name of the first tensor (in name order) holding a NaN or an
    /// infinity, if any: what every check of a model or update names.
    pub fn first_non_finite(&self) -> Option<&str> {
        self.tensors
            .iter()
            .find(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
            .map(|(name, _)| name.as_str())
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }

    /// True when both maps have the same names with the same shapes.
    pub fn same_layout(&self, other: &Self) -> bool {
        self.tensors.len() == other.tensors.len()
            && self
                .tensors
                .iter()
                .zip(other.tensors.iter())
                .all(|((a, ta), (b, tb))| a == b && ta.shape == tb.shape)
    }

    /// All parameters concatenated in name order.
    pub fn to_flat(&self) -> Vec<f32> {
        let mut flat = Vec::with_capacity(self.num_parameters());
        for tensor in self.tensors.values() {
            flat.extend_from_slice(&tensor.data);
        }
        flat
    }

    /// A map with this map's layout holding `flat` (as produced by [`TensorMap::to_flat`]).
    pub fn with_flat(&self, flat: &[f32]) -> Result<Self> {
        if flat.len() != self.num_parameters() {
            return Err(ProtocolError::malformed(
                "flat parameters",
                "length does not match layout",
            ));
        }
        let mut offset = 0;
        let mut out = Self::new();
        for (name, tensor) in &self.tensors {
            let n = tensor.data.len();
            out.tensors.insert(
                name.clone(),
                Tensor {
                    shape: tensor.shape.clone(),
                    data: flat[offset..offset + n].to_vec(),
                },
            );
            offset += n;
        }
        Ok(out)
    }

    /// The canonical safetensors encoding.
    pub fn to_safetensors(&self) -> Vec<u8> {
        self.to_safetensors_as(Dtype::F32, &BTreeMap::new(), |_, tensor, out| {
            for value in &tensor.data {
                out.extend_from_slice(&value.to_le_bytes());
            }
        })
    }

    /// SHA-256 of the canonical encoding.
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.to_safetensors())
    }

    /// Decodes a safetensors file of F32, F16 or BF16 tensors (the halves
    /// widened to f32), refusing anything over `limit` bytes.
    pub fn from_safetensors(bytes: &[u8], limit: usize) -> Result<Self> {
        let raw = parse_safetensors(bytes, limit, Dtype::float)?;
        let mut map = Self::new();
        for tensor in raw.tensors {
            map.insert(
                tensor.name,
                Tensor::new(tensor.shape, tensor.dtype.widen(tensor.data))?,
            )?;
        }
        Ok(map)
    }

    /// The canonical encoding with every element stored as `dtype` (written
    /// by `element`, which appends one tensor's little-endian data), and
    /// `metadata` beside the usual `"format": "pt"`.
    pub(crate) fn to_safetensors_as(
        &self,
        dtype: Dtype,
        metadata: &BTreeMap<String, String>,
        mut element: impl FnMut(&str, &Tensor, &mut Vec<u8>),
    ) -> Vec<u8> {
        let mut all_metadata = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
        all_metadata.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        // A map of strings always serializes.
        let metadata_json = serde_json::to_string(&all_metadata).unwrap_or_default();
        let mut header = format!(r#"{{"__metadata__":{metadata_json}"#);
        let mut offset = 0usize;
        for (name, tensor) in &self.tensors {
            let end = offset + dtype.width() * tensor.data.len();
            let shape: Vec<String> = tensor.shape.iter().map(usize::to_string).collect();
            header.push_str(&format!(
                r#","{name}":{{"dtype":"{}","shape":[{}],"data_offsets":[{offset},{end}]}}"#,
                dtype.name(),
                shape.join(",")
            ));
            offset = end;
        }
        header.push('}');
        while (8 + header.len()) % 8 != 0 {
            header.push(' ');
        }
        let mut out = Vec::with_capacity(8 + header.len() + offset);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for (name, tensor) in &self.tensors {
            element(name, tensor, &mut out);
        }
        out
    }
}

/// Checks a safetensors file — its length, header, names, shapes and that
/// the tensors cover the data section exactly — and returns its tensors in
/// data order, each dtype admitted by `accept(name, dtype)`.
pub(crate) fn parse_safetensors(
    bytes: &[u8],
    limit: usize,
    accept: impl Fn(&str, &str) -> Result<Dtype>,
) -> Result<RawSafetensors<'_>> {
    const WHAT: &str = "safetensors";
    if bytes.len() > limit {
        return Err(ProtocolError::TooLarge {
            what: WHAT,
            limit,
            actual: bytes.len(),
        });
    }
    if bytes.len() < 8 {
        return Err(ProtocolError::malformed(
            WHAT,
            "shorter than its length prefix",
        ));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN as u64 || header_len > (bytes.len() - 8) as u64 {
        return Err(ProtocolError::malformed(WHAT, "header length out of range"));
    }
    let header_end = 8 + header_len as usize;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|e| ProtocolError::malformed(WHAT, format!("header: {e}")))?;
    let data = &bytes[header_end..];

    let mut metadata = BTreeMap::new();
    let mut entries = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            // The format says strings; other values are ignored, as they
            // always were, rather than refusing a file over its comments.
            if let serde_json::Value::Object(entries) = value {
                metadata.extend(entries.into_iter().filter_map(|(key, value)| match value {
                    serde_json::Value::String(text) => Some((key, text)),
                    _ => None,
                }));
            }
            continue;
        }
        validate_name(&name)?;
        let entry: HeaderEntry = serde_json::from_value(value)
            .map_err(|e| ProtocolError::malformed(WHAT, format!("tensor {name}: {e}")))?;
        let dtype = accept(&name, &entry.dtype)?;
        if entry.shape.len() > MAX_RANK {
            return Err(ProtocolError::malformed(
                WHAT,
                format!("tensor {name}: rank over 8"),
            ));
        }
        let [begin, end] = entry.data_offsets;
        let bytes_needed = element_count(&entry.shape)
            .and_then(|n| n.checked_mul(dtype.width()))
            .ok_or_else(|| {
                ProtocolError::malformed(WHAT, format!("tensor {name}: shape overflows"))
            })?;
        if end < begin || end - begin != bytes_needed {
            return Err(ProtocolError::malformed(
                WHAT,
                format!("tensor {name}: offsets disagree with shape"),
            ));
        }
        entries.push((begin, end, name, entry.shape, dtype));
    }
    if entries.len() > MAX_TENSORS {
        return Err(ProtocolError::malformed(WHAT, "more than 4096 tensors"));
    }
    // The data section must be covered exactly, without gaps or overlaps.
    entries.sort_by_key(|(begin, end, ..)| (*begin, *end));
    let mut expected = 0usize;
    for (begin, end, name, ..) in &entries {
        if *begin != expected {
            return Err(ProtocolError::malformed(
                WHAT,
                format!("tensor {name}: gap or overlap in data"),
            ));
        }
        expected = *end;
    }
    if expected != data.len() {
        return Err(ProtocolError::malformed(
            WHAT,
            "data section length disagrees with header",
        ));
    }
    let tensors = entries
        .into_iter()
        .map(|(begin, end, name, shape, dtype)| RawTensor {
            name,
            shape,
            dtype,
            data: &data[begin..end],
        })
        .collect();
    Ok(RawSafetensors { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TensorMap {
        let mut map = TensorMap::new();
        map.insert(
            "fc1.weight",
            Tensor::new(
                vec![2, 3],
                vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 6.0],
            )
            .unwrap(),
        )
        .unwrap();
        map.insert("fc1.bias", Tensor::new(vec![2], vec![0.25, -0.5]).unwrap())
            .unwrap();
        map.insert("scalar", Tensor::new(vec![], vec![9.0]).unwrap())
            .unwrap();
        map
    }

    #[test]
    fn canonical_round_trip() {
        let map = sample();
        let bytes = map.to_safetensors();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0);
        let back = TensorMap::from_safetensors(&bytes, 1 << 20).unwrap();
        assert_eq!(back, map);
        assert_eq!(back.to_safetensors(), bytes, "encoding is canonical");
        assert_eq!(map.num_parameters(), 9);
        assert_eq!(map.first_non_finite(), None);
        let mut poisoned = map.clone();
        poisoned.get_mut("scalar").unwrap().data_mut()[0] = f32::INFINITY;
        assert_eq!(poisoned.first_non_finite(), Some("scalar"));
        assert_eq!(map.with_flat(&map.to_flat()).unwrap(), map);
        assert!(map.same_layout(&back));
    }

    #[test]
    fn rejects_bad_inputs() {
        let bytes = sample().to_safetensors();
        assert!(matches!(
            TensorMap::from_safetensors(&bytes, 16),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(TensorMap::from_safetensors(&bytes[..bytes.len() - 1], 1 << 20).is_err());
        assert!(TensorMap::from_safetensors(&bytes[..5], 1 << 20).is_err());
        let mut huge_header = bytes.clone();
        huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(TensorMap::from_safetensors(&huge_header, 1 << 20).is_err());
        let text = String::from_utf8_lossy(&bytes).replace("F32", "F64");
        assert!(TensorMap::from_safetensors(text.as_bytes(), 1 << 20).is_err());
        assert!(Tensor::new(vec![2, 2], vec![0.0; 3]).is_err());
        assert!(Tensor::zeros(vec![usize::MAX, 2]).is_err());
        let mut map = TensorMap::new();
        assert!(
            map.insert("__metadata__", Tensor::zeros(vec![1]).unwrap())
                .is_err()
        );
        assert!(
            map.insert("with\"quote", Tensor::zeros(vec![1]).unwrap())
                .is_err()
        );
    }

    /// A safetensors file written by the reference implementation, with
    /// one tensor of each `dtype` holding `values` (given as f32).
    fn reference_file(dtype: safetensors::Dtype, values: &[f32]) -> Vec<u8> {
        let bytes: Vec<u8> = match dtype {
            safetensors::Dtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            safetensors::Dtype::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            safetensors::Dtype::I64 => values
                .iter()
                .flat_map(|v| (*v as i64).to_le_bytes())
                .collect(),
            _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let view = safetensors::tensor::TensorView::new(dtype, vec![values.len()], &bytes).unwrap();
        safetensors::serialize([("layer.weight", view)], None).unwrap()
    }

    #[test]
    fn half_precision_is_widened_exactly() {
        // Values every half format holds exactly, so widening must be exact.
        let values = [1.0, -2.5, 0.0, 48.0, 0.125];
        for dtype in [safetensors::Dtype::F16, safetensors::Dtype::BF16] {
            let map = TensorMap::from_safetensors(&reference_file(dtype, &values), 1 << 20)
                .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
            assert_eq!(map.get("layer.weight").unwrap().data(), values, "{dtype:?}");
        }
    }

    #[test]
    fn integer_tensors_are_refused_by_name() {
        let err =
            TensorMap::from_safetensors(&reference_file(safetensors::Dtype::I64, &[3.0]), 1 << 20)
                .unwrap_err()
                .to_string();
        assert!(err.contains("layer.weight") && err.contains("I64"), "{err}");
    }

    #[test]
    fn debug_hides_weights() {
        let shown = format!("{:?}", sample());
        assert!(!shown.contains("3.5"));
        assert!(shown.contains("fc1.weight"));
    }
}
