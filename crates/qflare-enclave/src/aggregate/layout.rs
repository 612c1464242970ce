//! [`Layout`]: the names, shapes and sizes of a model's tensors.
//!
//! Every aggregator in the sibling files checks its inputs against a layout
//! ([`Layout::matches`], `slices`) and builds its output through one
//! (`build`), so an update of another shape can never be mixed in.

use qflare_protocol::tensor::{Tensor, TensorMap};

use crate::error::{AggregationError, Result};

/// The names, shapes and sizes of a model's tensors, in name order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    tensors: Vec<(String, Vec<usize>)>,
    pub(super) lens: Vec<usize>,
    pub(super) total: usize,
}

impl Layout {
    /// The layout of `map`.
    pub fn of(map: &TensorMap) -> Self {
        let tensors: Vec<(String, Vec<usize>)> = map
            .iter()
            .map(|(name, t)| (name.to_owned(), t.shape().to_vec()))
            .collect();
        let lens: Vec<usize> = map.iter().map(|(_, t)| t.data().len()).collect();
        let total = lens.iter().sum();
        Self {
            tensors,
            lens,
            total,
        }
    }

    /// True when `map` has exactly these names and shapes.
    pub fn matches(&self, map: &TensorMap) -> bool {
        map.len() == self.tensors.len()
            && map
                .iter()
                .zip(&self.tensors)
                .all(|((name, t), (n, shape))| name == n && t.shape() == shape.as_slice())
    }

    /// Total scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.total
    }

    /// Bytes of one update's values (`f32`).
    pub fn update_bytes(&self) -> u64 {
        4 * self.total as u64
    }

    /// Builds a map of this layout, `fill(tensor index, values)` writing each
    /// tensor's values (they start at zero).
    pub(super) fn build(&self, mut fill: impl FnMut(usize, &mut [f32])) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (t, ((name, shape), &len)) in self.tensors.iter().zip(&self.lens).enumerate() {
            let mut data = vec![0f32; len];
            fill(t, &mut data);
            let tensor =
                Tensor::new(shape.clone(), data).map_err(|_| AggregationError::LayoutMismatch)?;
            out.insert(name.clone(), tensor)
                .map_err(|_| AggregationError::LayoutMismatch)?;
        }
        Ok(out)
    }

    /// Each update's tensors as slices, `[update][tensor]`, after checking
    /// that every update has this layout.
    pub(super) fn slices<'a>(&self, updates: &[&'a TensorMap]) -> Result<Vec<Vec<&'a [f32]>>> {
        updates
            .iter()
            .map(|u| {
                if self.matches(u) {
                    Ok(u.iter().map(|(_, t)| t.data()).collect())
                } else {
                    Err(AggregationError::LayoutMismatch)
                }
            })
            .collect()
    }
}
