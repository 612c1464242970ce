//! The bounded pool of compute threads all tensor work runs in.
//!
//! burn's `flex` backend executes each operation eagerly on the calling
//! thread and parallelises the large ones (matrix products through `gemm`,
//! convolutions, element-wise kernels) with rayon, asking
//! `rayon::current_num_threads()` how wide to go. Left alone, that is rayon's
//! global pool: one thread per core (or `RAYON_NUM_THREADS`) for the whole
//! process, fixed at first use.
//!
//! We instead run every training step and evaluation batch through
//! [`ThreadPool::install`] on a pool of our own. Inside `install` the work
//! runs on a pool thread, so every kernel's parallelism is bounded by this
//! pool's size, and because the pool is shared by the process, N simulated
//! devices training at once share [`compute_threads`] threads instead of
//! each spawning one thread per core and thrashing. We install per step
//! rather than around a whole training run: a worker that waits inside a
//! parallel kernel runs other queued jobs meanwhile, and a whole training
//! run taken up that way would stall the device it interrupted until it
//! finished; a step is short. It also keeps the caller's progress callback
//! on the caller's thread.
//!
//! The size defaults to the machine's available parallelism and is set with
//! [`set_compute_threads`] (binaries map their config value to it). Changing
//! it builds a new pool for subsequent work; work already running finishes
//! on the old one. Results do not depend on which threads run the work, but
//! can depend on the pool size (matrix products split their work by it), so
//! bit-for-bit reproducibility needs the same size.

use std::sync::{Arc, Mutex, MutexGuard};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{MlError, Result};

struct PoolState {
    threads: usize,
    pool: Option<Arc<ThreadPool>>,
}

static STATE: Mutex<PoolState> = Mutex::new(PoolState {
    threads: 0,
    pool: None,
});

fn state() -> MutexGuard<'static, PoolState> {
    // The state is two plain fields; a panic elsewhere cannot leave them torn.
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Stack of each pool thread. A worker waiting for its share of a parallel
/// kernel may pick up another device's queued step and run it nested on its
/// stack, so with many devices the nesting can go as deep as the number of
/// devices; rayon's 2 MiB default would then overflow. The space is only
/// reserved, and touched pages are all that is ever committed.
const STACK_BYTES: usize = 64 << 20;

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Sets how many threads all of this process's tensor work may use together.
///
/// `0` restores the default (the machine's available parallelism). A
/// simulation of many devices on a small machine should set this to the
/// cores it may use, for example `1` per core reserved for training.
pub fn set_compute_threads(threads: usize) -> Result<()> {
    let mut state = state();
    let threads = if threads == 0 {
        default_threads()
    } else {
        threads
    };
    if state.threads != threads || state.pool.is_none() {
        state.pool = Some(Arc::new(build(threads)?));
        state.threads = threads;
        tracing::debug!(threads, "compute thread pool resized");
    }
    Ok(())
}

/// How many threads tensor work may use (the pool's size).
pub fn compute_threads() -> usize {
    let state = state();
    if state.threads == 0 {
        default_threads()
    } else {
        state.threads
    }
}

fn build(threads: usize) -> Result<ThreadPool> {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("qflare-compute-{i}"))
        .stack_size(STACK_BYTES)
        .build()
        .map_err(|e| MlError::ThreadPool(e.to_string()))
}

/// The shared pool, built on first use.
pub(crate) fn pool() -> Result<Arc<ThreadPool>> {
    let mut state = state();
    if let Some(pool) = &state.pool {
        return Ok(Arc::clone(pool));
    }
    let threads = if state.threads == 0 {
        default_threads()
    } else {
        state.threads
    };
    let pool = Arc::new(build(threads)?);
    state.threads = threads;
    state.pool = Some(Arc::clone(&pool));
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_uses_the_configured_width() {
        // The process-wide pool is shared with tests that train; leave its width alone.
        let width = pool().unwrap().install(rayon::current_num_threads);
        assert_eq!(width, compute_threads());
        set_compute_threads(0).unwrap();
        assert_eq!(compute_threads(), default_threads());
        let three = build(3).unwrap();
        assert_eq!(three.install(rayon::current_num_threads), 3);
    }
}
