//! FedAvg (McMahan et al., 2017): Σ wᵢΔᵢ / Σ wᵢ.
//!
//! Two ways to the same bits: [`RunningSum`] folds updates as they arrive
//! (a streaming round; [`Tentative`] holds a fold until its verdict), and
//! [`weighted_mean`] sums buffered updates. Both accumulate `f32` products in
//! groups of [`GROUP`] and carry the group sums in `f64` (see the
//! [parent module](super)). [`linear_combination`] is the buffered loop with
//! arbitrary coefficients, which FLTrust and the round's clipping reuse.

use qflare_protocol::tensor::TensorMap;
use zeroize::Zeroizing;

use super::Layout;
use crate::error::{AggregationError, Result};
use crate::kernels::{self, axpy, flush};
use crate::validate::UpdateScan;
use crate::verdict::VerdictReason;

/// Updates per `f32` partial sum in FedAvg (see the module documentation).
pub const GROUP: usize = 32;

/// Coordinates per block in the batch FedAvg loop: the block's `f64` and
/// `f32` sums (24 KiB) stay in L1 while every update streams through.
const SUM_BLOCK: usize = 1024;

/// FedAvg's running weighted sum, folding updates as they arrive.
///
/// Memory is two arrays of the model's size (an `f32` group sum, and an
/// `f64` carry allocated at the first full group of [`GROUP`] updates)
/// whatever the number of updates. Both are zeroized on drop: with one
/// update folded, the sum *is* that device's update.
pub struct RunningSum {
    layout: Layout,
    narrow: Zeroizing<Vec<f32>>,
    wide: Option<Zeroizing<Vec<f64>>>,
    in_group: usize,
    count: usize,
    total_weight: f64,
}

impl std::fmt::Debug for RunningSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningSum")
            .field("parameters", &self.layout.total)
            .field("count", &self.count)
            .field("total_weight", &self.total_weight)
            .finish_non_exhaustive()
    }
}

impl RunningSum {
    /// An empty sum over `layout`.
    pub fn new(layout: Layout) -> Self {
        let d = layout.total;
        Self {
            layout,
            narrow: Zeroizing::new(vec![0.0; d]),
            wide: None,
            in_group: 0,
            count: 0,
            total_weight: 0.0,
        }
    }

    /// Updates committed so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Sum of the committed weights.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// Bytes the accumulator holds: 4 per parameter, 12 once a group of
    /// [`GROUP`] updates has been carried into the `f64` sum.
    pub fn accumulator_bytes(&self) -> u64 {
        let per_parameter = if self.wide.is_some() { 12 } else { 4 };
        per_parameter * self.layout.total as u64
    }

    /// Scans `delta` (finiteness, norm, dot products with up to two
    /// references of the same layout) and, in the same pass, folds
    /// `weight · delta` chunk by chunk while the chunk is still in L1.
    /// Returns a [`Tentative`] fold for the caller to commit or retract once
    /// the scan is judged. A NaN or infinity is `Err(NonFinite)` (with any
    /// folded chunks retracted); a wrong layout is `Err(WrongShape)`.
    ///
    /// Folding before judging saves a second pass over every accepted update
    /// (the fold is memory-bound, so that pass is most of its cost). It is
    /// only safe for updates of ordinary size: retracting by subtraction
    /// leaves the rounding of the partial sums, which is a few units in the
    /// last place when the update is no larger than what they already hold,
    /// but would wipe them out for a huge one. So folding stops, and what was
    /// folded is retracted, as soon as the update's running norm passes
    /// `speculate_norm`; such an update is folded in a second pass if it is
    /// committed. Pass the absolute norm bound, a small multiple of the
    /// largest norm accepted so far, or infinity while the sum is empty
    /// (retracting from zero is exact).
    pub fn fold_scanned<'a>(
        &'a mut self,
        delta: &'a TensorMap,
        weight: f64,
        a: Option<&TensorMap>,
        b: Option<&TensorMap>,
        speculate_norm: f64,
    ) -> std::result::Result<Tentative<'a>, VerdictReason> {
        if !self.layout.matches(delta) {
            return Err(VerdictReason::WrongShape);
        }
        let coefficient = weight as f32;
        let limit_sq = speculate_norm * speculate_norm;
        // Per value, the bound the norm bound implies (|v| ≤ ‖Δ‖), rounded
        // up to f32, finite, and small enough that coefficient · value
        // cannot overflow.
        let value_bound = {
            let b = speculate_norm.min(f64::from(f32::MAX / coefficient.max(1.0))) as f32;
            if b.next_up().is_finite() {
                b.next_up()
            } else {
                f32::MAX
            }
        };
        let mut scan = UpdateScan {
            norm_sq: 0.0,
            dot_a: 0.0,
            dot_b: 0.0,
        };
        let mut folding = true;
        for chunk in kernels::chunks_beside(delta, a, b) {
            let x = chunk.values;
            if folding {
                let start = chunk.offset;
                let seen = kernels::fold_chunk(
                    &mut self.narrow[start..start + x.len()],
                    x,
                    coefficient,
                    value_bound,
                );
                let da = chunk.a.map_or(0.0, |r| kernels::dot_f32(x, r));
                let db = chunk.b.map_or(0.0, |r| kernels::dot_f32(x, r));
                let fast = [seen.sumsq, da, db];
                if fast.iter().all(|v| v.is_finite())
                    && seen.max_abs <= value_bound
                    && scan.norm_sq + f64::from(seen.sumsq) <= limit_sq
                {
                    scan.add(fast.map(f64::from));
                    continue;
                }
                // Non-finite, too large, or past the bound: undo, and
                // scan the rest (this chunk included) without folding.
                self.unfold_prefix(delta, coefficient, value_bound, start + x.len());
                folding = false;
            }
            let sums = kernels::scan_chunk(x, chunk.a, chunk.b).ok_or(VerdictReason::NonFinite)?;
            scan.add(sums);
        }
        Ok(Tentative {
            sum: self,
            delta,
            weight,
            scan,
            folded: folding,
            settled: false,
        })
    }

    /// Folds `weight · delta` without judging it (the caller already did).
    pub fn fold(&mut self, delta: &TensorMap, weight: f64) -> Result<()> {
        if !self.layout.matches(delta) {
            return Err(AggregationError::LayoutMismatch);
        }
        let mut offset = 0;
        for (_, tensor) in delta.iter() {
            let x = tensor.data();
            axpy(&mut self.narrow[offset..offset + x.len()], weight as f32, x);
            offset += x.len();
        }
        self.commit(weight);
        Ok(())
    }

    /// Undoes the chunk folds of the first `len` flat positions.
    fn unfold_prefix(&mut self, delta: &TensorMap, coefficient: f32, bound: f32, len: usize) {
        let mut offset = 0;
        for (_, tensor) in delta.iter() {
            if offset >= len {
                break;
            }
            let x = tensor.data();
            let n = x.len().min(len - offset);
            kernels::unfold_chunk(
                &mut self.narrow[offset..offset + n],
                &x[..n],
                coefficient,
                bound,
            );
            offset += x.len();
        }
    }

    fn add_scaled(&mut self, delta: &TensorMap, coefficient: f32) {
        let mut offset = 0;
        for (_, tensor) in delta.iter() {
            let x = tensor.data();
            axpy(&mut self.narrow[offset..offset + x.len()], coefficient, x);
            offset += x.len();
        }
    }

    fn commit(&mut self, weight: f64) {
        self.count += 1;
        self.total_weight += weight;
        self.in_group += 1;
        if self.in_group == GROUP {
            let d = self.layout.total;
            let wide = self
                .wide
                .get_or_insert_with(|| Zeroizing::new(vec![0.0; d]));
            flush(wide, &mut self.narrow);
            self.in_group = 0;
        }
    }

    /// The weighted mean Σ wᵢΔᵢ / Σ wᵢ of the committed updates, or `None`
    /// when nothing was committed.
    pub fn mean(&self) -> Result<Option<TensorMap>> {
        if self.count == 0 || self.total_weight <= 0.0 {
            return Ok(None);
        }
        let total = self.total_weight;
        let mut offset = 0;
        self.layout
            .build(|_, out| {
                let range = offset..offset + out.len();
                let narrow = &self.narrow[range.clone()];
                match &self.wide {
                    Some(wide) => {
                        for ((o, &w), &n) in out.iter_mut().zip(&wide[range]).zip(narrow) {
                            *o = ((w + f64::from(n)) / total) as f32;
                        }
                    }
                    None => {
                        // `0.0 +` as the batch path does (it turns −0 into +0).
                        for (o, &n) in out.iter_mut().zip(narrow) {
                            *o = ((0.0 + f64::from(n)) / total) as f32;
                        }
                    }
                }
                offset += out.len();
            })
            .map(Some)
    }
}

/// A fold waiting for its verdict. Dropping it without a decision retracts
/// it, so a forgotten verdict never lets an update into the aggregate.
pub struct Tentative<'a> {
    sum: &'a mut RunningSum,
    delta: &'a TensorMap,
    weight: f64,
    scan: UpdateScan,
    /// Whether the update is in the sum already (see `fold_scanned`).
    folded: bool,
    settled: bool,
}

impl std::fmt::Debug for Tentative<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tentative")
            .field("weight", &self.weight)
            .field("scan", &self.scan)
            .field("folded", &self.folded)
            .finish_non_exhaustive()
    }
}

impl Tentative<'_> {
    /// The update's norm and dot products.
    pub fn scan(&self) -> UpdateScan {
        self.scan
    }

    /// True when the update was folded during the scan (it was within the
    /// speculation bound), so committing it costs no further pass.
    pub fn is_folded(&self) -> bool {
        self.folded
    }

    /// Keeps the update.
    pub fn commit(mut self) {
        self.settled = true;
        if !self.folded {
            self.sum.add_scaled(self.delta, self.weight as f32);
        }
        self.sum.commit(self.weight);
    }

    /// Keeps the update rescaled by `scale` (norm clipping).
    pub fn commit_scaled(mut self, scale: f64) {
        self.settled = true;
        if self.folded {
            self.sum.add_scaled(self.delta, -(self.weight as f32));
        }
        self.sum
            .add_scaled(self.delta, (self.weight * scale) as f32);
        self.sum.commit(self.weight);
    }

    /// Leaves the update out.
    pub fn retract(mut self) {
        self.settled = true;
        if self.folded {
            self.sum.add_scaled(self.delta, -(self.weight as f32));
        }
    }
}

impl Drop for Tentative<'_> {
    fn drop(&mut self) {
        if !self.settled && self.folded {
            self.sum.add_scaled(self.delta, -(self.weight as f32));
        }
    }
}

/// FedAvg over buffered updates: Σ wᵢΔᵢ / Σ wᵢ, with wᵢ the example counts.
/// Gives the same bits as folding the same updates in the same order into a
/// [`RunningSum`].
pub fn weighted_mean(
    updates: &[&TensorMap],
    weights: &[f64],
    layout: &Layout,
) -> Result<TensorMap> {
    let total: f64 = weights.iter().sum();
    linear_combination(updates, weights, total, layout)
}

/// Σ cᵢΔᵢ / divisor, computed as [`RunningSum`] does.
pub(crate) fn linear_combination(
    updates: &[&TensorMap],
    coefficients: &[f64],
    divisor: f64,
    layout: &Layout,
) -> Result<TensorMap> {
    if updates.len() != coefficients.len() {
        return Err(AggregationError::LayoutMismatch);
    }
    let slices = layout.slices(updates)?;
    let coefficients: Vec<f32> = coefficients.iter().map(|&c| c as f32).collect();
    let mut narrow = Zeroizing::new(vec![0f32; SUM_BLOCK]);
    let mut wide = Zeroizing::new(vec![0f64; SUM_BLOCK]);
    layout.build(|t, out| {
        for (b, out_block) in out.chunks_mut(SUM_BLOCK).enumerate() {
            let range = b * SUM_BLOCK..b * SUM_BLOCK + out_block.len();
            let narrow = &mut narrow[..out_block.len()];
            let wide = &mut wide[..out_block.len()];
            narrow.fill(0.0);
            wide.fill(0.0);
            for (i, (update, &c)) in slices.iter().zip(&coefficients).enumerate() {
                axpy(narrow, c, &update[t][range.clone()]);
                if (i + 1) % GROUP == 0 {
                    flush(wide, narrow);
                }
            }
            for ((o, &w), &n) in out_block.iter_mut().zip(wide.iter()).zip(narrow.iter()) {
                *o = ((w + f64::from(n)) / divisor) as f32;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::map;
    use super::*;

    #[test]
    fn running_sum_retracts_and_matches_batch() {
        let u = [map(&[1.0, 2.0, 3.0]), map(&[-1.0, 0.5, 8.0])];
        let layout = Layout::of(&u[0]);
        let mut sum = RunningSum::new(layout.clone());
        sum.fold_scanned(&u[0], 3.0, None, None, f64::INFINITY)
            .unwrap()
            .commit();
        let bad = map(&[5.0, 5.0, f32::NAN]);
        assert_eq!(
            sum.fold_scanned(&bad, 2.0, None, None, f64::INFINITY)
                .unwrap_err(),
            VerdictReason::NonFinite
        );
        let t = sum
            .fold_scanned(&u[1], 1.0, None, None, f64::INFINITY)
            .unwrap();
        assert_eq!(t.scan().norm_sq, 1.0 + 0.25 + 64.0);
        assert!(t.is_folded());
        t.retract();
        // A huge update is never folded before it is judged, so rejecting
        // it cannot cancel what the sum holds.
        let huge = map(&[1e30, -1e30, 1e30]);
        let t = sum.fold_scanned(&huge, 1.0, None, None, 10.0).unwrap();
        assert!(!t.is_folded());
        drop(t);
        sum.fold_scanned(&u[1], 1.0, None, None, 10.0)
            .unwrap()
            .commit();
        let streamed = sum.mean().unwrap().unwrap();
        let batch = weighted_mean(&[&u[0], &u[1]], &[3.0, 1.0], &layout).unwrap();
        assert_eq!(streamed, batch);
        assert_eq!(batch.to_flat(), vec![0.5, 1.625, 4.25]);
    }
}
