//! The device's local data: an MNIST-format training split, optionally cut
//! down to one IID shard and a number of examples.
//!
//! A shard is written `K/N` and counts from 1: `3/10` is the third of ten
//! shards. The split is `qflare_ml::partition::iid` over the whole training
//! split under a seed ([`DEFAULT_PARTITION_SEED`] unless told otherwise), so
//! devices that load the same files with the same seed and the same `N` get
//! disjoint shards of near-equal size without coordinating.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use qflare_ml::{Dataset, Split};

use crate::error::EdgeError;

/// The seed of the IID split, shared by every device that does not choose
/// another (devices must agree on it for their shards to be disjoint).
pub const DEFAULT_PARTITION_SEED: u64 = 0x5146_4c41_5245; // "QFLARE"

/// Shard `index` (from 0) of `count` equal IID shards; written `K/N` with
/// `K = index + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, from 0.
    pub index: usize,
    /// How many shards.
    pub count: usize,
}

impl FromStr for Shard {
    type Err = EdgeError;

    fn from_str(text: &str) -> Result<Self, EdgeError> {
        let bad = |reason: &str| {
            EdgeError::Config(format!(
                "partition {text:?}: {reason} (write K/N with 1 <= K <= N, e.g. 3/10)"
            ))
        };
        let (k, n) = text.split_once('/').ok_or_else(|| bad("no '/'"))?;
        let k: usize = k.trim().parse().map_err(|_| bad("K is not a number"))?;
        let n: usize = n.trim().parse().map_err(|_| bad("N is not a number"))?;
        if n == 0 {
            return Err(bad("N must be at least 1"));
        }
        if k == 0 || k > n {
            return Err(bad("K counts from 1 to N"));
        }
        Ok(Self {
            index: k - 1,
            count: n,
        })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index + 1, self.count)
    }
}

impl Shard {
    /// This shard of `data`, under the IID split with `seed`.
    pub fn select(&self, data: &Dataset, seed: u64) -> Result<Dataset, EdgeError> {
        let parts = qflare_ml::partition::iid(data.len(), self.count, seed)?;
        let indices = parts.get(self.index).ok_or_else(|| {
            EdgeError::Config(format!("shard {self} does not exist in the split"))
        })?;
        Ok(data.subset(indices)?)
    }
}

/// Reads the training split from the IDX files in `dir` (the standard
/// names, as [`Dataset::load`] expects), keeps `shard` of it if given, then
/// the first `examples` examples if given.
pub fn load_local_data(
    dir: &Path,
    shard: Option<Shard>,
    examples: Option<usize>,
    seed: u64,
) -> Result<Dataset, EdgeError> {
    let all = Dataset::load(dir, Split::Train)?;
    select_local_data(&all, shard, examples, seed)
}

/// The selection [`load_local_data`] makes, on data already in memory.
pub fn select_local_data(
    all: &Dataset,
    shard: Option<Shard>,
    examples: Option<usize>,
    seed: u64,
) -> Result<Dataset, EdgeError> {
    let data = match shard {
        Some(shard) => shard.select(all, seed)?,
        None => all.clone(),
    };
    let data = match examples {
        Some(0) => return Err(EdgeError::Config("--examples must be at least 1".into())),
        Some(n) => data.head(n),
        None => data,
    };
    if data.is_empty() {
        return Err(EdgeError::Config("the local data set is empty".into()));
    }
    Ok(data)
}
