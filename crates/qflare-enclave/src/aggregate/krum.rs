//! Multi-Krum (Blanchard et al., 2017): score each update by its distances
//! to its nearest neighbours and average the lowest-scored.
//!
//! [`krum_select`] does the scoring and choice (the round also uses it on its
//! own); [`multi_krum`] adds the plain mean of the chosen updates through
//! `fedavg.rs`.

use qflare_protocol::tensor::TensorMap;

use super::{Layout, weighted_mean};
use crate::error::{AggregationError, Result};
use crate::kernels::dist_sq;

/// Bytes of all n updates' current block in the Multi-Krum distance loop.
const KRUM_BLOCK_BYTES: usize = 1 << 20;

/// Multi-Krum's scores and choice.
#[derive(Debug, Clone, PartialEq)]
pub struct KrumSelection {
    /// score(i): the sum of squared distances to its n − f − 2 nearest others.
    pub scores: Vec<f64>,
    /// Indices of the m selected updates, in arrival order.
    pub selected: Vec<usize>,
}

/// Multi-Krum's selection (Blanchard et al., 2017) with f = `byzantine` and
/// m = `select` (default and cap n − f). Needs n ≥ 2f + 3. Equal scores
/// break by arrival order.
pub fn krum_select(
    updates: &[&TensorMap],
    byzantine: usize,
    select: Option<usize>,
    layout: &Layout,
) -> Result<KrumSelection> {
    let n = updates.len();
    let required = 2 * byzantine + 3;
    if n < required {
        return Err(AggregationError::TooFewForKrum {
            available: n,
            byzantine,
            required,
        });
    }
    let slices = layout.slices(updates)?;
    let distances = pairwise_sq_distances(&slices, layout);
    let neighbours = n - byzantine - 2;
    let mut row = Vec::with_capacity(n - 1);
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            row.clear();
            row.extend((0..n).filter(|&j| j != i).map(|j| distances[i * n + j]));
            let (nearest, nth, _) = row.select_nth_unstable_by(neighbours - 1, f64::total_cmp);
            nearest.iter().sum::<f64>() + *nth
        })
        .collect();
    let m = select.unwrap_or(n - byzantine).clamp(1, n - byzantine);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut selected = order[..m].to_vec();
    selected.sort_unstable();
    Ok(KrumSelection { scores, selected })
}

/// All ‖Δᵢ − Δⱼ‖², row-major n × n.
pub(super) fn pairwise_sq_distances(slices: &[Vec<&[f32]>], layout: &Layout) -> Vec<f64> {
    let n = slices.len();
    let mut d = vec![0f64; n * n];
    let block = (KRUM_BLOCK_BYTES / 4 / n).clamp(256, 1 << 14);
    for (t, &len) in layout.lens.iter().enumerate() {
        for start in (0..len).step_by(block) {
            let end = (start + block).min(len);
            for i in 0..n {
                let xi = &slices[i][t][start..end];
                for j in i + 1..n {
                    d[i * n + j] += dist_sq(xi, &slices[j][t][start..end]);
                }
            }
        }
    }
    for i in 0..n {
        for j in 0..i {
            d[i * n + j] = d[j * n + i];
        }
    }
    d
}

/// Multi-Krum's result.
#[derive(Debug)]
pub struct KrumOutcome {
    /// The plain mean of the selected updates.
    pub aggregate: TensorMap,
    /// Scores and selection.
    pub selection: KrumSelection,
}

/// Multi-Krum: the plain mean of the m updates with the lowest Krum scores.
pub fn multi_krum(
    updates: &[&TensorMap],
    byzantine: usize,
    select: Option<usize>,
    layout: &Layout,
) -> Result<KrumOutcome> {
    let selection = krum_select(updates, byzantine, select, layout)?;
    let chosen: Vec<&TensorMap> = selection.selected.iter().map(|&i| updates[i]).collect();
    let ones = vec![1.0; chosen.len()];
    let aggregate = weighted_mean(&chosen, &ones, layout)?;
    Ok(KrumOutcome {
        aggregate,
        selection,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::map;
    use super::*;

    #[test]
    fn krum_drops_the_far_update() {
        let u = [
            map(&[1.0, 1.0, 1.0]),
            map(&[1.1, 0.9, 1.0]),
            map(&[0.9, 1.0, 1.1]),
            map(&[1.0, 1.1, 0.9]),
            map(&[-50.0, 40.0, 9.0]),
        ];
        let refs: Vec<&TensorMap> = u.iter().collect();
        let layout = Layout::of(&u[0]);
        let outcome = multi_krum(&refs, 1, Some(3), &layout).unwrap();
        assert!(!outcome.selection.selected.contains(&4));
        assert_eq!(outcome.selection.selected.len(), 3);
        assert!(matches!(
            krum_select(&refs[..4], 1, None, &layout),
            Err(AggregationError::TooFewForKrum { required: 5, .. })
        ));
    }
}
