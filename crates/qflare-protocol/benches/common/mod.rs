//! Timing shared by the protocol benches: two operations timed in
//! alternating batches in one run, so that a shared, noisy machine slows
//! both sides alike and their ratio is what to read.

use std::time::{Duration, Instant};

/// Median per-call times of `a` and `b` over `rounds` alternating batches
/// of `batch` calls each, after one warm-up batch of each.
pub fn interleaved(
    mut a: impl FnMut(),
    mut b: impl FnMut(),
    batch: u32,
    rounds: usize,
) -> (Duration, Duration) {
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..batch {
            f();
        }
        start.elapsed() / batch
    };
    // Warm caches and lazy initialisation on both sides first.
    time(&mut a);
    time(&mut b);
    let mut ta = Vec::with_capacity(rounds);
    let mut tb = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        ta.push(time(&mut a));
        tb.push(time(&mut b));
    }
    ta.sort();
    tb.sort();
    (ta[rounds / 2], tb[rounds / 2])
}
