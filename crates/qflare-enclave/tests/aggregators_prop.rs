//! Every aggregator against a plain reference implementation written here
//! in f64, over random small models and random update sets; and streaming
//! FedAvg against buffered FedAvg, bit for bit.
//!
//! Values are in [-1, 1]. Tolerances follow the error bounds of the `f32`
//! arithmetic: FedAvg sums at most 12 `f32` products here, so its error is
//! below 12·2⁻²⁴ ≈ 7.2e-7; the median and trimmed mean select exact values
//! and sum them in `f64`; FLTrust's output scales with ‖g₀‖, so its
//! tolerance is relative to ‖g₀‖.

// Tests may panic on impossible errors: that is how they fail.
#![allow(clippy::unwrap_used)]

mod common;

use proptest::prelude::*;
use qflare_enclave::aggregate::{self, Layout, RunningSum};
use qflare_enclave::config::{AggregationConfig, AggregatorKind, DefenseConfig, NormAction};
use qflare_enclave::error::AggregationError;
use qflare_enclave::round::RoundAggregator;
use qflare_enclave::validate::CandidateUpdate;
use qflare_protocol::tensor::{Tensor, TensorMap};

const TOL: f64 = 1e-6;

/// Tensor sizes, then `n` flat updates over them and their example counts.
#[derive(Debug, Clone)]
struct Case {
    sizes: Vec<usize>,
    updates: Vec<Vec<f32>>,
    counts: Vec<u64>,
}

impl Case {
    fn map(&self, flat: &[f32]) -> TensorMap {
        let mut map = TensorMap::new();
        let mut offset = 0;
        for (t, &size) in self.sizes.iter().enumerate() {
            map.insert(
                format!("t{t}"),
                Tensor::new(vec![size], flat[offset..offset + size].to_vec()).unwrap(),
            )
            .unwrap();
            offset += size;
        }
        map
    }

    fn maps(&self) -> Vec<TensorMap> {
        self.updates.iter().map(|u| self.map(u)).collect()
    }

    fn dim(&self) -> usize {
        self.sizes.iter().sum()
    }
}

fn case(n: impl Strategy<Value = usize>) -> impl Strategy<Value = Case> {
    (prop::collection::vec(1usize..6, 1..4), n).prop_flat_map(|(sizes, n)| {
        let d: usize = sizes.iter().sum();
        (
            Just(sizes),
            prop::collection::vec(prop::collection::vec(-1.0f32..1.0, d), n),
            prop::collection::vec(1u64..1000, n),
        )
            .prop_map(|(sizes, updates, counts)| Case {
                sizes,
                updates,
                counts,
            })
    })
}

fn assert_close(got: &TensorMap, want: &[f64], tol: f64) -> Result<(), TestCaseError> {
    let got = got.to_flat();
    prop_assert_eq!(got.len(), want.len());
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            (f64::from(g) - w).abs() <= tol,
            "coordinate {}: got {}, want {}, tolerance {}",
            j,
            g,
            w,
            tol
        );
    }
    Ok(())
}

fn naive_mean(updates: &[&Vec<f32>]) -> Vec<f64> {
    let owned: Vec<Vec<f32>> = updates.iter().map(|u| (*u).clone()).collect();
    common::naive_weighted_mean(&owned, &vec![1.0; owned.len()])
}

/// Per coordinate: sort, keep ranks k..n−k, average.
fn naive_trimmed(updates: &[Vec<f32>], k: usize) -> Vec<f64> {
    let n = updates.len();
    (0..updates[0].len())
        .map(|j| {
            let mut column: Vec<f64> = updates.iter().map(|u| f64::from(u[j])).collect();
            column.sort_by(f64::total_cmp);
            column[k..n - k].iter().sum::<f64>() / (n - 2 * k) as f64
        })
        .collect()
}

fn naive_median(updates: &[Vec<f32>]) -> Vec<f64> {
    let n = updates.len();
    (0..updates[0].len())
        .map(|j| {
            let mut column: Vec<f64> = updates.iter().map(|u| f64::from(u[j])).collect();
            column.sort_by(f64::total_cmp);
            if n % 2 == 1 {
                column[n / 2]
            } else {
                (column[n / 2 - 1] + column[n / 2]) / 2.0
            }
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn fedavg_matches_reference(c in case(1usize..13)) {
        let maps = c.maps();
        let refs: Vec<&TensorMap> = maps.iter().collect();
        let layout = Layout::of(&maps[0]);
        let weights: Vec<f64> = c.counts.iter().map(|&n| n as f64).collect();
        let want = common::naive_weighted_mean(&c.updates, &weights);
        let batch = aggregate::weighted_mean(&refs, &weights, &layout).unwrap();
        assert_close(&batch, &want, TOL)?;
        let mut sum = RunningSum::new(layout);
        for (map, &w) in maps.iter().zip(&weights) {
            sum.fold_scanned(map, w, None, None, f64::INFINITY).unwrap().commit();
        }
        prop_assert_eq!(sum.mean().unwrap().unwrap(), batch);
    }

    #[test]
    fn median_matches_reference(c in case(prop_oneof![1usize..13, 513usize..520])) {
        let maps = c.maps();
        let refs: Vec<&TensorMap> = maps.iter().collect();
        let got = aggregate::coordinate_median(&refs, &Layout::of(&maps[0])).unwrap();
        assert_close(&got, &naive_median(&c.updates), TOL)?;
    }

    #[test]
    fn trimmed_mean_matches_reference(
        c in case(prop_oneof![1usize..13, 513usize..520]),
        beta in 0.0f64..0.49,
    ) {
        let maps = c.maps();
        let refs: Vec<&TensorMap> = maps.iter().collect();
        let got = aggregate::trimmed_mean(&refs, beta, &Layout::of(&maps[0])).unwrap();
        let k = (beta * c.updates.len() as f64).floor() as usize;
        assert_close(&got, &naive_trimmed(&c.updates, k), TOL)?;
    }

    #[test]
    fn multi_krum_matches_reference(
        (f, c) in (0usize..3).prop_flat_map(|f| (Just(f), case(2 * f + 3..2 * f + 10))),
        select in prop::option::of(1usize..12),
    ) {
        let n = c.updates.len();
        let maps = c.maps();
        let refs: Vec<&TensorMap> = maps.iter().collect();
        // Reference: all pairwise distances in f64, sum of the n − f − 2
        // smallest per update, the m lowest scores, their plain mean.
        let mut scores = Vec::new();
        for i in 0..n {
            let mut d: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    c.updates[i]
                        .iter()
                        .zip(&c.updates[j])
                        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                        .sum()
                })
                .collect();
            d.sort_by(f64::total_cmp);
            scores.push(d[..n - f - 2].iter().sum::<f64>());
        }
        let m = select.unwrap_or(n - f).min(n - f);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        if m < n {
            // A near tie at the cut could go either way under rounding.
            let (last, next) = (scores[order[m - 1]], scores[order[m]]);
            prop_assume!(next - last > 1e-6 * next.abs().max(1e-12));
        }
        let mut selected = order[..m].to_vec();
        selected.sort_unstable();

        let got = aggregate::multi_krum(&refs, f, select, &Layout::of(&maps[0])).unwrap();
        prop_assert_eq!(&got.selection.selected, &selected);
        for (g, w) in got.selection.scores.iter().zip(&scores) {
            prop_assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-6), "score {} vs {}", g, w);
        }
        let chosen: Vec<&Vec<f32>> = selected.iter().map(|&i| &c.updates[i]).collect();
        assert_close(&got.aggregate, &naive_mean(&chosen), TOL)?;
    }

    #[test]
    fn fltrust_matches_reference(c in case(2usize..11)) {
        // The first update plays the trusted reference g₀.
        let g0 = &c.updates[0];
        let rest = &c.updates[1..];
        let g0_norm = dot(g0, g0).sqrt();
        prop_assume!(g0_norm > 1e-3);
        let mut weighted = vec![0.0; c.dim()];
        let mut total_trust = 0.0;
        let mut trust = Vec::new();
        for u in rest {
            let norm = dot(u, u).sqrt();
            let cos = dot(u, g0) / (norm * g0_norm);
            // Trust right at zero could round either way.
            prop_assume!(cos.abs() > 1e-6);
            let t = cos.max(0.0);
            trust.push(t);
            total_trust += t;
            for (w, &x) in weighted.iter_mut().zip(u) {
                *w += t * g0_norm / norm * f64::from(x);
            }
        }
        let maps: Vec<TensorMap> = rest.iter().map(|u| c.map(u)).collect();
        let refs: Vec<&TensorMap> = maps.iter().collect();
        let layout = Layout::of(&maps[0]);
        let got = aggregate::fltrust(&refs, &c.map(g0), &layout);
        if total_trust == 0.0 {
            let none_trusted = matches!(got, Err(AggregationError::NoAcceptedUpdates { .. }));
            prop_assert!(none_trusted);
        } else {
            let got = got.unwrap();
            for (g, w) in got.trust.iter().zip(&trust) {
                prop_assert!((g - w).abs() <= 1e-6);
            }
            let want: Vec<f64> = weighted.iter().map(|w| w / total_trust).collect();
            assert_close(&got.aggregate, &want, TOL * g0_norm)?;
        }
    }
}

fn submit_all(round: &mut RoundAggregator, c: &Case) {
    for (i, (u, &n)) in c.updates.iter().zip(&c.counts).enumerate() {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        round
            .submit(CandidateUpdate {
                device_id: qflare_protocol::identity::DeviceId::from_bytes(id),
                round_id: common::ROUND,
                base_model_version: common::VERSION,
                example_count: n,
                delta: c.map(u),
            })
            .unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Through the whole round: streaming FedAvg (folded on arrival) and
    /// buffered FedAvg (a defense that needs the round but rejects nobody)
    /// give the same bits, across several f32 groups of 32 updates.
    #[test]
    fn streaming_fedavg_equals_buffered(c in case(1usize..80)) {
        let global = c.map(&vec![0.5; c.dim()]);
        let streaming_config = AggregationConfig {
            defense: DefenseConfig::off(),
            ..common::reject_rules()
        };
        let mut buffered_config = streaming_config.clone();
        buffered_config.defense.norm_bound.action = NormAction::Reject;
        buffered_config.defense.norm_bound.median_multiple = Some(1e30);
        prop_assert_eq!(buffered_config.aggregator, AggregatorKind::FedAvg);

        let mut streaming = RoundAggregator::new(common::spec(streaming_config, global.clone())).unwrap();
        let mut buffered = RoundAggregator::new(common::spec(buffered_config, global)).unwrap();
        prop_assert!(streaming.is_streaming());
        prop_assert!(!buffered.is_streaming());
        submit_all(&mut streaming, &c);
        submit_all(&mut buffered, &c);
        let a = streaming.finalize().unwrap();
        let b = buffered.finalize().unwrap();
        prop_assert_eq!(&a.aggregated_update, &b.aggregated_update);
        prop_assert_eq!(&a.new_global, &b.new_global);
        prop_assert_eq!(a.stats.peak_buffered_bytes, 0);
        prop_assert_eq!(b.stats.peak_buffered_bytes, 4 * (c.dim() * c.updates.len()) as u64);
        let weights: Vec<f64> = a.verdicts.iter().map(|v| v.weight.unwrap()).collect();
        let weights_b: Vec<f64> = b.verdicts.iter().map(|v| v.weight.unwrap()).collect();
        prop_assert_eq!(weights, weights_b);
    }
}
