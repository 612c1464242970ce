//! Splitting a data set among clients.
//!
//! Each scheme takes the label vector and returns, per client, the indices
//! of its examples (sorted ascending; training shuffles anyway). Every
//! scheme is deterministic under its seed (ChaCha20), and clients never
//! share an index.
//!
//! - [`Partition::Iid`]: shuffle, then deal equal parts; the `n mod clients`
//!   left over go one each to the first clients, so every index is used.
//! - [`Partition::LabelShards`]: McMahan et al.'s pathological non-IID
//!   split. Sort by label, cut into shards of `shard_size` consecutive
//!   examples, and give each client `shards_per_client` shards chosen at
//!   random. MNIST's 60,000 examples make exactly 200 shards of 300, so 100
//!   clients with 2 shards each use all of them. As in the paper, a shard can
//!   straddle the boundary between two labels (class sizes are not multiples
//!   of 300), so most — not all — clients see exactly two labels. Indices in
//!   unused shards, or past the last whole shard, are left out.
//! - [`Partition::Dirichlet`]: for each label, draw client proportions from
//!   Dirichlet(α, …, α) and cut that label's shuffled examples accordingly
//!   (Hsu, Qi, Brown 2019). Small α concentrates each label on few clients;
//!   large α approaches IID. Every index is used; a client may get none.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use rand_distr::multi::{Dirichlet, MultiDistribution};
use serde::{Deserialize, Serialize};

use crate::error::{MlError, Result};

/// How to split examples among clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "snake_case", deny_unknown_fields)]
pub enum Partition {
    /// Uniformly at random, equal sizes.
    Iid,
    /// Label-sorted shards (pathological non-IID).
    LabelShards {
        /// Shards each client receives (2 in the paper).
        shards_per_client: usize,
        /// Examples per shard (300 in the paper).
        shard_size: usize,
    },
    /// Per-label Dirichlet proportions.
    Dirichlet {
        /// Concentration: positive; smaller is more skewed.
        alpha: f64,
    },
}

impl Partition {
    /// The paper's pathological non-IID split: 2 shards of 300 per client.
    pub const PAPER_SHARDS: Self = Self::LabelShards {
        shards_per_client: 2,
        shard_size: 300,
    };
}

/// Splits the examples with `labels` among `clients` clients.
pub fn partition(
    labels: &[u8],
    clients: usize,
    scheme: &Partition,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    match *scheme {
        Partition::Iid => iid(labels.len(), clients, seed),
        Partition::LabelShards {
            shards_per_client,
            shard_size,
        } => label_shards(labels, clients, shards_per_client, shard_size, seed),
        Partition::Dirichlet { alpha } => dirichlet(labels, clients, alpha, seed),
    }
}

fn check_clients(clients: usize) -> Result<()> {
    if clients == 0 {
        return Err(MlError::InvalidArgument(
            "partition needs at least one client".into(),
        ));
    }
    Ok(())
}

/// `0..n` shuffled and dealt into `clients` parts whose sizes differ by at most one.
pub fn iid(n: usize, clients: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    check_clients(clients)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    let (base, extra) = (n / clients, n % clients);
    let mut parts = Vec::with_capacity(clients);
    let mut start = 0;
    for c in 0..clients {
        let len = base + usize::from(c < extra);
        let mut part = order[start..start + len].to_vec();
        part.sort_unstable();
        parts.push(part);
        start += len;
    }
    Ok(parts)
}

/// McMahan et al.'s label shards (see the module documentation).
pub fn label_shards(
    labels: &[u8],
    clients: usize,
    shards_per_client: usize,
    shard_size: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    check_clients(clients)?;
    if shards_per_client == 0 || shard_size == 0 {
        return Err(MlError::InvalidArgument(
            "shards per client and shard size must be positive".into(),
        ));
    }
    let available = labels.len() / shard_size;
    let needed = clients
        .checked_mul(shards_per_client)
        .filter(|&n| n <= available);
    let Some(needed) = needed else {
        return Err(MlError::InvalidArgument(format!(
            "{clients} clients x {shards_per_client} shards of {shard_size} need more than the {} examples",
            labels.len()
        )));
    };
    let mut sorted: Vec<usize> = (0..labels.len()).collect();
    // Stable: equal labels keep index order, so the shards depend only on the data.
    sorted.sort_by_key(|&i| labels[i]);
    let mut shard_ids: Vec<usize> = (0..available).collect();
    shard_ids.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    let parts = shard_ids[..needed]
        .chunks(shards_per_client)
        .map(|shards| {
            let mut part: Vec<usize> = shards
                .iter()
                .flat_map(|&s| sorted[s * shard_size..(s + 1) * shard_size].iter().copied())
                .collect();
            part.sort_unstable();
            part
        })
        .collect();
    Ok(parts)
}

/// Per-label Dirichlet(α) proportions (see the module documentation).
pub fn dirichlet(labels: &[u8], clients: usize, alpha: f64, seed: u64) -> Result<Vec<Vec<usize>>> {
    check_clients(clients)?;
    if !(alpha.is_finite() && alpha.is_normal() && alpha > 0.0) {
        return Err(MlError::InvalidArgument(format!(
            "Dirichlet alpha must be positive and finite, got {alpha}"
        )));
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut parts = vec![Vec::new(); clients];
    let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); 256];
    for (i, &l) in labels.iter().enumerate() {
        by_label[usize::from(l)].push(i);
    }
    // rand_distr switches to a Beta-based sampler for small alpha, where
    // normalised Gamma draws underflow to zero.
    let distribution = if clients > 1 {
        Some(
            Dirichlet::new(&vec![alpha; clients])
                .map_err(|e| MlError::InvalidArgument(format!("Dirichlet alpha {alpha}: {e}")))?,
        )
    } else {
        None
    };
    for mut members in by_label.into_iter().filter(|m| !m.is_empty()) {
        members.shuffle(&mut rng);
        let Some(distribution) = &distribution else {
            parts[0].extend(members);
            continue;
        };
        let mut proportions = vec![0.0; clients];
        distribution.sample_to_slice(&mut rng, &mut proportions);
        let n = members.len();
        let mut cumulative = 0.0;
        let mut start = 0;
        for (c, p) in proportions.iter().enumerate() {
            cumulative += p;
            // Rounding the cumulative share, not each share, keeps the
            // cuts monotone and makes the last one land exactly on n.
            let end = if c + 1 == clients {
                n
            } else {
                ((cumulative * n as f64).round() as usize).clamp(start, n)
            };
            parts[c].extend_from_slice(&members[start..end]);
            start = end;
        }
    }
    for part in &mut parts {
        part.sort_unstable();
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// 10 labels, `per_label` examples each, interleaved.
    fn balanced(per_label: usize) -> Vec<u8> {
        (0..10 * per_label).map(|i| (i % 10) as u8).collect()
    }

    fn assert_disjoint(parts: &[Vec<usize>]) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        for part in parts {
            for &i in part {
                assert!(seen.insert(i), "index {i} assigned twice");
            }
        }
        seen
    }

    fn labels_of(part: &[usize], labels: &[u8]) -> BTreeSet<u8> {
        part.iter().map(|&i| labels[i]).collect()
    }

    #[test]
    fn iid_covers_everything_evenly() {
        let parts = iid(1003, 10, 5).unwrap();
        let seen = assert_disjoint(&parts);
        assert_eq!(seen, (0..1003).collect());
        assert!(parts.iter().all(|p| p.len() == 100 || p.len() == 101));
        assert_eq!(parts, iid(1003, 10, 5).unwrap());
        assert_ne!(parts, iid(1003, 10, 6).unwrap());
        assert!(iid(10, 0, 0).is_err());
    }

    #[test]
    fn shards_give_at_most_two_labels() {
        // 600 per label: shards of 300 never straddle two labels.
        let labels = balanced(600);
        let parts = label_shards(&labels, 10, 2, 300, 1).unwrap();
        assert_eq!(parts.len(), 10);
        let seen = assert_disjoint(&parts);
        assert_eq!(seen.len(), 6000);
        for part in &parts {
            assert_eq!(part.len(), 600);
            assert!(labels_of(part, &labels).len() <= 2);
        }
        assert_eq!(parts, label_shards(&labels, 10, 2, 300, 1).unwrap());
    }

    #[test]
    fn shards_cover_exactly_the_assigned_shards() {
        let labels = balanced(100);
        // 1000 examples, 16 shards of 60 available (40 left over), 12 used.
        let parts = label_shards(&labels, 4, 3, 60, 9).unwrap();
        let seen = assert_disjoint(&parts);
        assert_eq!(seen.len(), 4 * 3 * 60);
        assert!(parts.iter().all(|p| p.len() == 180));
        let err = label_shards(&labels, 10, 2, 60, 0).unwrap_err();
        assert!(err.to_string().contains("need more"), "{err}");
        assert!(label_shards(&labels, 2, 0, 60, 0).is_err());
        assert!(label_shards(&labels, 2, 1, 0, 0).is_err());
        assert!(label_shards(&labels, usize::MAX, 2, 1, 0).is_err());
    }

    fn mean_top_label_share(parts: &[Vec<usize>], labels: &[u8]) -> f64 {
        let mut total = 0.0;
        let mut counted = 0;
        for part in parts.iter().filter(|p| !p.is_empty()) {
            let mut counts = [0usize; 10];
            for &i in part {
                counts[usize::from(labels[i])] += 1;
            }
            let top = counts.iter().copied().max().unwrap_or(0);
            total += top as f64 / part.len() as f64;
            counted += 1;
        }
        total / counted as f64
    }

    #[test]
    fn dirichlet_covers_everything_and_skews_with_small_alpha() {
        let labels = balanced(500);
        let skewed = dirichlet(&labels, 20, 0.05, 3).unwrap();
        let even = dirichlet(&labels, 20, 1000.0, 3).unwrap();
        for parts in [&skewed, &even] {
            assert_eq!(parts.len(), 20);
            assert_eq!(assert_disjoint(parts), (0..5000).collect());
        }
        let (s, e) = (
            mean_top_label_share(&skewed, &labels),
            mean_top_label_share(&even, &labels),
        );
        assert!(s > 0.6, "alpha 0.05 should concentrate labels, got {s}");
        assert!(e < 0.2, "alpha 1000 should be near IID, got {e}");
        assert_eq!(skewed, dirichlet(&labels, 20, 0.05, 3).unwrap());
        assert_eq!(dirichlet(&labels, 1, 0.5, 0).unwrap()[0].len(), 5000);
        for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(dirichlet(&labels, 3, alpha, 0).is_err());
        }
    }

    #[test]
    fn scheme_serde() {
        let json = serde_json::to_string(&Partition::PAPER_SHARDS).unwrap();
        assert_eq!(
            json,
            r#"{"scheme":"label_shards","shards_per_client":2,"shard_size":300}"#
        );
        let back: Partition =
            serde_json::from_str(r#"{"scheme":"dirichlet","alpha":0.5}"#).unwrap();
        assert_eq!(back, Partition::Dirichlet { alpha: 0.5 });
        let parts = partition(&balanced(10), 4, &Partition::Iid, 0).unwrap();
        assert_eq!(parts.len(), 4);
    }
}
