//! How an update's numbers travel from device to enclave, chosen by the
//! server per federation (`federation.update_encoding`), named in every
//! round's answer, and enforced by the enclave, which decodes inside:
//!
//! * `f32`: the canonical safetensors file (any floating dtype is read, as
//!   models are); exact.
//! * `f16`: every element rounded to the nearest IEEE half; half the bytes.
//!   An element over the half range (±65,504) is refused at the device
//!   rather than sent as infinity.
//! * `int8`: per tensor, `scale = max|x| / 127` and `q = ⌊x / scale + u⌋`
//!   with `u` uniform in [0, 1) (stochastic rounding), so `q · scale` is an
//!   unbiased estimate of `x` within one step of it; a quarter of the bytes.
//!   The scales travel in the file's `__metadata__` under
//!   `qflare.int8.scale.<tensor>`.
//!
//! Both lossy encodings stay safetensors files, so the enclave's one checked
//! parser reads them all; the host sees only sealed bytes either way. The
//! defense and FedAvg then run on the decoded f32 values, so a device cannot
//! use the encoding to dodge a norm bound: the bound applies to what it
//! decodes to.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rand_core::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{ProtocolError, Result};
use crate::tensor::{Dtype, Tensor, TensorMap, parse_safetensors};

/// The metadata key holding a tensor's int8 scale, followed by its name.
pub const INT8_SCALE_PREFIX: &str = "qflare.int8.scale.";
/// The metadata key naming the encoding (informative; the enclave enforces
/// the federation's choice, not what a file claims).
pub const ENCODING_KEY: &str = "qflare.encoding";

/// An update encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum UpdateEncoding {
    /// 32-bit floats: exact.
    #[default]
    F32,
    /// IEEE half precision, rounded to nearest.
    F16,
    /// 8-bit integers with a per-tensor scale, stochastically rounded.
    Int8,
}

impl UpdateEncoding {
    /// Every encoding.
    pub const ALL: [Self; 3] = [Self::F32, Self::F16, Self::Int8];

    /// Its name in configuration and on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8 => "int8",
        }
    }

    /// True for the default (so messages may leave it out).
    pub fn is_f32(&self) -> bool {
        *self == Self::F32
    }
}

impl fmt::Display for UpdateEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UpdateEncoding {
    type Err = ProtocolError;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|encoding| encoding.as_str() == name)
            .ok_or_else(|| ProtocolError::malformed("update encoding", "expected f32, f16 or int8"))
    }
}

/// Encodes `update` for the enclave. `rng` drives int8's stochastic
/// rounding (the other encodings are deterministic). The lossy encodings
/// refuse non-finite values (int8 would turn them into zeros, hiding a
/// broken update from the enclave's check) and values f16 cannot hold;
/// `f32` carries every value as it is, for the enclave to judge.
pub fn encode<R: Rng + ?Sized>(
    update: &TensorMap,
    encoding: UpdateEncoding,
    rng: &mut R,
) -> Result<Vec<u8>> {
    if encoding != UpdateEncoding::F32
        && let Some(name) = update.first_non_finite()
    {
        return Err(ProtocolError::malformed(
            "update",
            format!("tensor {name} holds a value that is not finite"),
        ));
    }
    let tag = BTreeMap::from([(ENCODING_KEY.to_owned(), encoding.as_str().to_owned())]);
    match encoding {
        UpdateEncoding::F32 => Ok(update.to_safetensors()),
        UpdateEncoding::F16 => {
            let too_large = update.iter().find(|(_, tensor)| {
                tensor
                    .data()
                    .iter()
                    .any(|v| v.abs() > f32::from(half::f16::MAX))
            });
            if let Some((name, _)) = too_large {
                return Err(ProtocolError::malformed(
                    "update",
                    format!("tensor {name} holds a value beyond the f16 range"),
                ));
            }
            Ok(
                update.to_safetensors_as(Dtype::F16, &tag, |_, tensor, out| {
                    for value in tensor.data() {
                        out.extend_from_slice(&half::f16::from_f32(*value).to_le_bytes());
                    }
                }),
            )
        }
        UpdateEncoding::Int8 => {
            let scales: BTreeMap<String, f32> = update
                .iter()
                .map(|(name, tensor)| (name.to_owned(), int8_scale(tensor.data())))
                .collect();
            let mut metadata = tag;
            metadata.extend(
                scales
                    .iter()
                    .map(|(name, scale)| (format!("{INT8_SCALE_PREFIX}{name}"), scale.to_string())),
            );
            Ok(
                update.to_safetensors_as(Dtype::I8, &metadata, |name, tensor, out| {
                    let scale = scales.get(name).copied().unwrap_or(0.0);
                    out.extend(
                        tensor
                            .data()
                            .iter()
                            .map(|value| quantize(*value, scale, rng) as u8),
                    );
                }),
            )
        }
    }
}

/// Decodes an update that must be in `encoding`, refusing anything over
/// `limit` bytes, any tensor of another dtype, and (int8) any tensor
/// without a finite, non-negative scale.
pub fn decode(bytes: &[u8], encoding: UpdateEncoding, limit: usize) -> Result<TensorMap> {
    let expected = match encoding {
        // Exact updates are read as models are: any floating dtype.
        UpdateEncoding::F32 => return TensorMap::from_safetensors(bytes, limit),
        UpdateEncoding::F16 => Dtype::F16,
        UpdateEncoding::Int8 => Dtype::I8,
    };
    let raw = parse_safetensors(bytes, limit, |name, dtype| {
        if dtype == expected.name() {
            Ok(expected)
        } else {
            Err(ProtocolError::malformed(
                "update",
                format!("the update encoding is {encoding} but tensor {name} has dtype {dtype}"),
            ))
        }
    })?;
    let mut map = TensorMap::new();
    for tensor in raw.tensors {
        let mut values = tensor.dtype.widen(tensor.data);
        if encoding == UpdateEncoding::Int8 {
            let scale = raw
                .metadata
                .get(&format!("{INT8_SCALE_PREFIX}{}", tensor.name))
                .and_then(|text| text.parse::<f32>().ok())
                .filter(|scale| scale.is_finite() && *scale >= 0.0)
                .ok_or_else(|| {
                    ProtocolError::malformed(
                        "update",
                        format!("tensor {} has no valid int8 scale", tensor.name),
                    )
                })?;
            for value in &mut values {
                *value *= scale;
            }
        }
        map.insert(tensor.name, Tensor::new(tensor.shape, values)?)?;
    }
    Ok(map)
}

/// The step of a tensor's int8 grid: its largest magnitude maps to ±127.
fn int8_scale(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |max, v| max.max(v.abs())) / 127.0
}

/// `⌊value / scale + u⌋` in [-127, 127]: rounds up with probability equal
/// to the fractional part, so the expectation is `value / scale`.
fn quantize<R: Rng + ?Sized>(value: f32, scale: f32, rng: &mut R) -> i8 {
    if scale == 0.0 {
        return 0;
    }
    // 24 random bits: every f32 in [0, 1) that a uniform draw needs.
    let uniform = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
    (value / scale + uniform).floor().clamp(-127.0, 127.0) as i8
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn update(values: Vec<f32>) -> TensorMap {
        let mut map = TensorMap::new();
        let n = values.len();
        map.insert("layer.weight", Tensor::new(vec![n], values).unwrap())
            .unwrap();
        map.insert("layer.bias", Tensor::new(vec![2], vec![0.0, 0.0]).unwrap())
            .unwrap();
        map
    }

    fn rng() -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(5)
    }

    #[test]
    fn f32_is_the_canonical_file_and_exact() {
        let map = update(vec![1e-3, -2.5, 7.0]);
        let bytes = encode(&map, UpdateEncoding::F32, &mut rng()).unwrap();
        assert_eq!(bytes, map.to_safetensors());
        assert_eq!(decode(&bytes, UpdateEncoding::F32, 1 << 20).unwrap(), map);
    }

    #[test]
    fn f16_halves_the_data_and_rounds_to_nearest() {
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 1.37e-4).collect();
        let map = update(values.clone());
        let exact = map.to_safetensors();
        let bytes = encode(&map, UpdateEncoding::F16, &mut rng()).unwrap();
        assert!(bytes.len() < exact.len() / 2 + 512);
        let back = decode(&bytes, UpdateEncoding::F16, 1 << 20).unwrap();
        for (v, d) in values.iter().zip(back.get("layer.weight").unwrap().data()) {
            assert_eq!(*d, half::f16::from_f32(*v).to_f32());
            assert!((v - d).abs() <= v.abs() * 2f32.powi(-11) + 2f32.powi(-25));
        }
        let beyond = update(vec![70_000.0]);
        assert!(encode(&beyond, UpdateEncoding::F16, &mut rng()).is_err());
    }

    #[test]
    fn int8_is_within_one_step_and_unbiased() {
        let values: Vec<f32> = (0..4096)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 2e-5)
            .collect();
        let map = update(values.clone());
        let scale = int8_scale(&values);
        let mut sum = vec![0.0f64; values.len()];
        let draws = 200;
        let mut generator = rng();
        for _ in 0..draws {
            let bytes = encode(&map, UpdateEncoding::Int8, &mut generator).unwrap();
            assert!(bytes.len() < map.to_safetensors().len() / 4 + 1024);
            let back = decode(&bytes, UpdateEncoding::Int8, 1 << 20).unwrap();
            for ((v, d), s) in values
                .iter()
                .zip(back.get("layer.weight").unwrap().data())
                .zip(&mut sum)
            {
                assert!((v - d).abs() <= scale * 1.0001, "{v} decoded as {d}");
                *s += f64::from(*d);
            }
            assert_eq!(back.get("layer.bias").unwrap().data(), &[0.0, 0.0]);
        }
        // The mean of many draws approaches the value: the error of the
        // mean shrinks as 1/sqrt(draws), far below one step.
        let worst = values
            .iter()
            .zip(&sum)
            .map(|(v, s)| (f64::from(*v) - s / f64::from(draws)).abs())
            .fold(0.0f64, f64::max);
        assert!(
            worst < f64::from(scale) * 0.3,
            "bias {worst} vs step {scale}"
        );
    }

    #[test]
    fn the_enclave_refuses_another_encoding_or_a_missing_scale() {
        let map = update(vec![0.5, -0.25]);
        let exact = encode(&map, UpdateEncoding::F32, &mut rng()).unwrap();
        let halves = encode(&map, UpdateEncoding::F16, &mut rng()).unwrap();
        let bytes = encode(&map, UpdateEncoding::Int8, &mut rng()).unwrap();
        assert!(decode(&exact, UpdateEncoding::Int8, 1 << 20).is_err());
        assert!(decode(&exact, UpdateEncoding::F16, 1 << 20).is_err());
        assert!(decode(&bytes, UpdateEncoding::F16, 1 << 20).is_err());
        // Models refuse integer tensors, so an int8 update is not an f32 one.
        assert!(decode(&bytes, UpdateEncoding::F32, 1 << 20).is_err());
        assert!(decode(&halves, UpdateEncoding::F32, 1 << 20).is_ok());
        // The same file without its scales.
        let mut without = map.clone();
        without.get_mut("layer.weight").unwrap().data_mut()[0] = 0.5;
        let unscaled = without.to_safetensors_as(Dtype::I8, &BTreeMap::new(), |_, t, out| {
            out.extend(std::iter::repeat_n(1u8, t.data().len()));
        });
        assert!(decode(&unscaled, UpdateEncoding::Int8, 1 << 20).is_err());
        let nan_scale = BTreeMap::from([
            (format!("{INT8_SCALE_PREFIX}layer.weight"), "NaN".to_owned()),
            (format!("{INT8_SCALE_PREFIX}layer.bias"), "1".to_owned()),
        ]);
        let poisoned = without.to_safetensors_as(Dtype::I8, &nan_scale, |_, t, out| {
            out.extend(std::iter::repeat_n(1u8, t.data().len()));
        });
        assert!(decode(&poisoned, UpdateEncoding::Int8, 1 << 20).is_err());
    }

    #[test]
    fn non_finite_updates_are_refused_by_the_lossy_encodings_only() {
        let map = update(vec![f32::NAN, 1.0]);
        assert!(encode(&map, UpdateEncoding::F16, &mut rng()).is_err());
        assert!(encode(&map, UpdateEncoding::Int8, &mut rng()).is_err());
        // Exact updates carry what they hold; the enclave refuses it.
        let exact = encode(&map, UpdateEncoding::F32, &mut rng()).unwrap();
        let back = decode(&exact, UpdateEncoding::F32, 1 << 20).unwrap();
        assert_eq!(back.first_non_finite(), Some("layer.weight"));
    }

    #[test]
    fn names_round_trip() {
        for encoding in UpdateEncoding::ALL {
            assert_eq!(
                encoding.as_str().parse::<UpdateEncoding>().unwrap(),
                encoding
            );
            let json = serde_json::to_string(&encoding).unwrap();
            assert_eq!(json, format!("\"{encoding}\""));
        }
        assert!("fp16".parse::<UpdateEncoding>().is_err());
    }
}
