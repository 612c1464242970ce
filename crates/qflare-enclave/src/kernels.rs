//! Hot loops over `f32` slices, written so that LLVM vectorizes them for the
//! baseline x86-64 and aarch64 targets (no `unsafe`, no target features).
//!
//! Every reduction uses a fixed number of independent lanes and a fixed
//! combination order, so a result depends only on its inputs: the streaming
//! and the buffered FedAvg paths produce the same bits.

use qflare_protocol::tensor::TensorMap;

/// Elements per chunk in the fused scan-and-fold loop: 4 KiB of `f32`, so a
/// chunk read by the scan is still in L1 when the fold reads it again.
pub(crate) const CHUNK: usize = 1024;

const LANES: usize = 16;

/// One [`CHUNK`] of an update, beside the same elements of up to two
/// reference maps of the same layout.
pub(crate) struct ChunkView<'a> {
    /// Position of the chunk's first element in the flattened update.
    pub offset: usize,
    pub values: &'a [f32],
    pub a: Option<&'a [f32]>,
    pub b: Option<&'a [f32]>,
}

/// Walks `delta` in chunks, in tensor-name order, with the matching pieces
/// of `a` and `b` (the caller has checked that the layouts agree).
pub(crate) fn chunks_beside<'a>(
    delta: &'a TensorMap,
    a: Option<&'a TensorMap>,
    b: Option<&'a TensorMap>,
) -> impl Iterator<Item = ChunkView<'a>> + 'a {
    let mut a_tensors = a.map(TensorMap::iter);
    let mut b_tensors = b.map(TensorMap::iter);
    let mut next_offset = 0;
    delta.iter().flat_map(move |(_, tensor)| {
        let ta = a_tensors
            .as_mut()
            .and_then(Iterator::next)
            .map(|(_, t)| t.data());
        let tb = b_tensors
            .as_mut()
            .and_then(Iterator::next)
            .map(|(_, t)| t.data());
        let base = next_offset;
        next_offset += tensor.data().len();
        tensor
            .data()
            .chunks(CHUNK)
            .enumerate()
            .map(move |(k, values)| {
                let range = k * CHUNK..k * CHUNK + values.len();
                ChunkView {
                    offset: base + range.start,
                    values,
                    a: ta.map(|t| &t[range.clone()]),
                    b: tb.map(|t| &t[range]),
                }
            })
    })
}

/// Sum of squares with `f32` lanes. Overflows to infinity for values above
/// about 1.8e19; callers fall back to [`sumsq_f64`] when the result is not
/// finite, which also tells a genuine NaN or infinity from mere overflow.
#[inline]
pub(crate) fn sumsq_f32(x: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let blocks = x.chunks_exact(LANES);
    let tail = blocks.remainder();
    for block in blocks {
        for (lane, &v) in lanes.iter_mut().zip(block) {
            *lane += v * v;
        }
    }
    let mut sum = reduce_f32(&lanes);
    for &v in tail {
        sum += v * v;
    }
    sum
}

/// Dot product with `f32` lanes (see [`sumsq_f32`] for overflow).
#[inline]
pub(crate) fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let xs = x.chunks_exact(LANES);
    let ys = y.chunks_exact(LANES);
    let (x_tail, y_tail) = (xs.remainder(), ys.remainder());
    for (bx, by) in xs.zip(ys) {
        for ((lane, &a), &b) in lanes.iter_mut().zip(bx).zip(by) {
            *lane += a * b;
        }
    }
    let mut sum = reduce_f32(&lanes);
    for (&a, &b) in x_tail.iter().zip(y_tail) {
        sum += a * b;
    }
    sum
}

fn reduce_f32(lanes: &[f32; LANES]) -> f32 {
    // Pairwise, in a fixed order.
    let mut half = [0f32; LANES / 2];
    for (i, h) in half.iter_mut().enumerate() {
        *h = lanes[i] + lanes[i + LANES / 2];
    }
    let quarter = [
        half[0] + half[4],
        half[1] + half[5],
        half[2] + half[6],
        half[3] + half[7],
    ];
    (quarter[0] + quarter[2]) + (quarter[1] + quarter[3])
}

/// Sum of squares in `f64`: cannot overflow for finite `f32` input (the
/// largest square is about 1.2e77), so it is finite exactly when every
/// element is finite.
pub(crate) fn sumsq_f64(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let blocks = x.chunks_exact(8);
    let tail = blocks.remainder();
    for block in blocks {
        for (lane, &v) in lanes.iter_mut().zip(block) {
            let v = f64::from(v);
            *lane += v * v;
        }
    }
    let mut sum = lanes.iter().sum::<f64>();
    for &v in tail {
        sum += f64::from(v) * f64::from(v);
    }
    sum
}

/// Dot product in `f64`.
pub(crate) fn dot_f64(x: &[f32], y: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let xs = x.chunks_exact(8);
    let ys = y.chunks_exact(8);
    let (x_tail, y_tail) = (xs.remainder(), ys.remainder());
    for (bx, by) in xs.zip(ys) {
        for ((lane, &a), &b) in lanes.iter_mut().zip(bx).zip(by) {
            *lane += f64::from(a) * f64::from(b);
        }
    }
    let mut sum = lanes.iter().sum::<f64>();
    for (&a, &b) in x_tail.iter().zip(y_tail) {
        sum += f64::from(a) * f64::from(b);
    }
    sum
}

/// Squared Euclidean distance, differences in `f32`, squares summed in `f64`
/// (Multi-Krum ranks by these sums, so they must not lose the small ones).
pub(crate) fn dist_sq(x: &[f32], y: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let xs = x.chunks_exact(8);
    let ys = y.chunks_exact(8);
    let (x_tail, y_tail) = (xs.remainder(), ys.remainder());
    for (bx, by) in xs.zip(ys) {
        for ((lane, &a), &b) in lanes.iter_mut().zip(bx).zip(by) {
            let d = f64::from(a - b);
            *lane += d * d;
        }
    }
    let mut sum = lanes.iter().sum::<f64>();
    for (&a, &b) in x_tail.iter().zip(y_tail) {
        let d = f64::from(a - b);
        sum += d * d;
    }
    sum
}

/// What [`fold_chunk`] saw.
#[derive(Clone, Copy)]
pub(crate) struct FoldedChunk {
    /// Sum of squares with `f32` lanes, exactly as [`sumsq_f32`] computes it.
    pub(crate) sumsq: f32,
    /// Largest |x| (NaN ignored: it shows in `sumsq`).
    pub(crate) max_abs: f32,
}

/// `acc += c · keep(x)` with keep(v) = v when |v| ≤ `bound`, else 0, while
/// computing the chunk's sum of squares and largest magnitude: one pass
/// over `x` for the scan and the fold. A NaN, an infinity or a value above
/// `bound` contributes 0, so subtracting the same `keep(x)` later
/// ([`unfold_chunk`]) never has to cancel a huge or non-finite value.
#[inline]
pub(crate) fn fold_chunk(acc: &mut [f32], x: &[f32], c: f32, bound: f32) -> FoldedChunk {
    let mut squares = [0f32; LANES];
    let mut largest = [0f32; LANES];
    let blocks = x.chunks_exact(LANES);
    let tail = blocks.remainder();
    let mut accs = acc.chunks_exact_mut(LANES);
    for (block, out) in blocks.zip(&mut accs) {
        for i in 0..LANES {
            let v = block[i];
            let a = v.abs();
            squares[i] += v * v;
            largest[i] = if a > largest[i] { a } else { largest[i] };
            let kept = if a <= bound { v } else { 0.0 };
            out[i] += c * kept;
        }
    }
    let mut sumsq = reduce_f32(&squares);
    let mut max_abs = largest.iter().fold(0f32, |m, &a| if a > m { a } else { m });
    for (&v, out) in tail.iter().zip(accs.into_remainder()) {
        let a = v.abs();
        sumsq += v * v;
        max_abs = if a > max_abs { a } else { max_abs };
        *out += c * if a <= bound { v } else { 0.0 };
    }
    FoldedChunk { sumsq, max_abs }
}

/// Undoes [`fold_chunk`] with the same `c` and `bound`.
pub(crate) fn unfold_chunk(acc: &mut [f32], x: &[f32], c: f32, bound: f32) {
    for (s, &v) in acc.iter_mut().zip(x) {
        *s += -c * if v.abs() <= bound { v } else { 0.0 };
    }
}

/// `acc += a * x`, element-wise in `f32` (multiply, then add: never fused,
/// so every path that calls this rounds identically).
#[inline]
pub(crate) fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
    for (s, &v) in acc.iter_mut().zip(x) {
        *s += a * v;
    }
}

/// `wide += narrow; narrow = 0`.
pub(crate) fn flush(wide: &mut [f64], narrow: &mut [f32]) {
    for (w, n) in wide.iter_mut().zip(narrow.iter_mut()) {
        *w += f64::from(*n);
        *n = 0.0;
    }
}

/// Statistics of one chunk of an update: sum of squares and up to two dot
/// products. `None` when the chunk holds a NaN or an infinity.
///
/// The fast `f32` pass is tried first; only a chunk whose `f32` result is not
/// finite (a NaN, an infinity, or a legitimately huge value) is redone in
/// `f64`, which is exact enough to tell them apart.
#[inline]
pub(crate) fn scan_chunk(x: &[f32], a: Option<&[f32]>, b: Option<&[f32]>) -> Option<[f64; 3]> {
    let sq = sumsq_f32(x);
    let da = a.map_or(0.0, |a| dot_f32(x, a));
    let db = b.map_or(0.0, |b| dot_f32(x, b));
    if sq.is_finite() && da.is_finite() && db.is_finite() {
        return Some([f64::from(sq), f64::from(da), f64::from(db)]);
    }
    let sq = sumsq_f64(x);
    if !sq.is_finite() {
        return None;
    }
    Some([
        sq,
        a.map_or(0.0, |a| dot_f64(x, a)),
        b.map_or(0.0, |b| dot_f64(x, b)),
    ])
}

/// Maps an `f32` to an `i32` whose integer order is the IEEE total order
/// (the transform of `f32::total_cmp`), so selection compares integers.
/// It is its own inverse: see [`from_key`].
#[inline]
pub(crate) fn to_key(v: f32) -> i32 {
    let bits = v.to_bits() as i32;
    bits ^ ((((bits >> 31) as u32) >> 1) as i32)
}

/// Inverse of [`to_key`].
#[inline]
pub(crate) fn from_key(k: i32) -> f32 {
    f32::from_bits((k ^ ((((k >> 31) as u32) >> 1) as i32)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_preserve_order_and_invert() {
        let values = [f32::MIN, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, f32::MAX];
        for pair in values.windows(2) {
            assert!(to_key(pair[0]) < to_key(pair[1]), "{pair:?}");
        }
        for v in values {
            assert_eq!(from_key(to_key(v)).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn scan_tells_overflow_from_non_finite() {
        let big = [3e30f32; 40];
        let stats = scan_chunk(&big, None, None).unwrap();
        assert!((stats[0] - 40.0 * 9e60).abs() / (40.0 * 9e60) < 1e-6);
        let mut bad = [1.0f32; 40];
        bad[39] = f32::NAN;
        assert!(scan_chunk(&bad, None, None).is_none());
        bad[39] = f32::NEG_INFINITY;
        assert!(scan_chunk(&bad, None, None).is_none());
    }

    #[test]
    fn fold_chunk_scans_like_the_scan_and_keeps_only_bounded_values() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut acc = vec![1.0f32; 37];
        let seen = fold_chunk(&mut acc, &x, 2.0, 1.0);
        assert_eq!(seen.sumsq.to_bits(), sumsq_f32(&x).to_bits());
        assert!(seen.max_abs <= 1.0 && seen.max_abs > 0.99);
        for (a, v) in acc.iter().zip(&x) {
            assert_eq!(*a, 1.0 + 2.0 * v);
        }
        let bad = [1e30f32, f32::NAN, 0.5, f32::INFINITY];
        let mut acc = vec![1.0f32; 4];
        let seen = fold_chunk(&mut acc, &bad, 3.0, 10.0);
        assert!(seen.sumsq.is_nan());
        assert_eq!(acc, vec![1.0, 1.0, 2.5, 1.0]);
        unfold_chunk(&mut acc, &bad, 3.0, 10.0);
        assert_eq!(acc, vec![1.0; 4]);
    }

    #[test]
    fn reductions_match_plain_sums() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        let sq: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let dot: f64 = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        let dist: f64 = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
            .sum();
        assert!((f64::from(sumsq_f32(&x)) - sq).abs() < 1e-4);
        assert!((sumsq_f64(&x) - sq).abs() < 1e-9);
        assert!((f64::from(dot_f32(&x, &y)) - dot).abs() < 1e-4);
        assert!((dot_f64(&x, &y) - dot).abs() < 1e-9);
        assert!((dist_sq(&x, &y) - dist).abs() < 1e-5);
    }
}
