//! Fuzz target: the safetensors decoder (`TensorMap::from_safetensors`), the
//! parser every model and update goes through (and, over it, the f16 and
//! int8 update encodings' decoders): its 8-byte length prefix,
//! the JSON header (dtype, shape, data_offsets, `__metadata__`), the F32,
//! F16 and BF16 widening, and every refusal (size limit, header length,
//! integer dtypes, names, rank, offsets, gaps and overlaps).
//!
//! Besides "never panics", it checks: an input over the limit is refused
//! before it is parsed; whatever decodes holds exactly the tensors its
//! header names, each widened from its bytes by a second, independent
//! implementation here; and the canonical encoding decodes to the same
//! values bit for bit and re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qflare_protocol::ProtocolError;
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::update_encoding::{self, UpdateEncoding};
use qflare_protocol::wire::limits;

/// IEEE binary16 to f32, written out rather than taken from `half` (which
/// the decoder uses).
fn f16_to_f32(h: u16) -> f32 {
    let negative = h & 0x8000 != 0;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    let magnitude = match exponent {
        // Subnormal: mantissa · 2^-24, exact in f32.
        0 => mantissa as f32 * f32::powi(2.0, -24),
        31 if mantissa == 0 => f32::INFINITY,
        31 => f32::NAN,
        _ => f32::from_bits(((exponent + 127 - 15) << 23) | (mantissa << 13)),
    };
    if negative { -magnitude } else { magnitude }
}

fn widen(dtype: &str, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        "F32" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "F16" => bytes
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        // bfloat16 is the top half of an f32.
        "BF16" => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        other => panic!("the decoder accepted dtype {other}"),
    }
}

/// Same values, NaN matching NaN (its payload may change when widened).
fn same_values(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

fn bits(map: &TensorMap) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    map.iter()
        .map(|(name, t)| {
            let values = t.data().iter().map(|v| v.to_bits()).collect();
            (name.to_owned(), t.shape().to_vec(), values)
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    // The update encodings' decoders share the parser; each must refuse or
    // decode without panicking, and the exact one is the model decoder.
    for encoding in UpdateEncoding::ALL {
        let decoded = update_encoding::decode(data, encoding, limits::TENSORS);
        if encoding == UpdateEncoding::F32 {
            // Compared as bytes: a NaN is not equal to itself.
            assert_eq!(
                decoded.ok().map(|map| map.to_safetensors()),
                TensorMap::from_safetensors(data, limits::TENSORS)
                    .ok()
                    .map(|map| map.to_safetensors())
            );
        }
    }
    if !data.is_empty() {
        assert!(matches!(
            TensorMap::from_safetensors(data, data.len() - 1),
            Err(ProtocolError::TooLarge { .. })
        ));
    }
    let Ok(map) = TensorMap::from_safetensors(data, limits::TENSORS) else {
        return;
    };

    // The header as a second reader sees it.
    let header_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) as usize;
    let body = &data[8 + header_len..];
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&data[8..8 + header_len]).expect("the decoder parsed it");
    let mut named = 0;
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        named += 1;
        let tensor = map
            .get(name)
            .expect("every tensor of the header is decoded");
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .expect("shape is a list")
            .iter()
            .map(|d| d.as_u64().expect("dimensions are integers") as usize)
            .collect();
        assert_eq!(tensor.shape(), shape.as_slice(), "{name}");
        let offsets = &entry["data_offsets"];
        let (begin, end) = (
            offsets[0].as_u64().expect("offset") as usize,
            offsets[1].as_u64().expect("offset") as usize,
        );
        let dtype = entry["dtype"].as_str().expect("dtype is a string");
        assert!(
            same_values(tensor.data(), &widen(dtype, &body[begin..end])),
            "{name} ({dtype}) decoded to other values"
        );
    }
    assert_eq!(named, map.len());

    // The canonical encoding round-trips exactly.
    let canonical = map.to_safetensors();
    let again = TensorMap::from_safetensors(&canonical, usize::MAX).expect("own encoding decodes");
    assert_eq!(bits(&again), bits(&map));
    assert_eq!(again.to_safetensors(), canonical, "encoding is canonical");
});
