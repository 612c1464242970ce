//! Tests of [`MemoryRateLimiter`](super::MemoryRateLimiter), kept in their own
//! file because they outweigh the backend itself. Time is always passed in
//! through `check_at`, so none of them sleeps.

use std::sync::Arc;

use super::super::connect;
use super::*;

const MIN: Duration = Duration::from_secs(60);

fn at_secs(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

#[test]
fn burst_passes_then_limited_then_recovers() {
    let limiter = MemoryRateLimiter::new();
    let limit = RateLimit {
        per_minute: 60,
        burst: 5,
    };
    let t0 = at_secs(1_000);
    for i in 0..5 {
        assert_eq!(
            limiter.check_at("enroll", "203.0.113.9", &limit, t0),
            Decision::Allowed,
            "request {i}"
        );
    }
    let Decision::Limited { retry_after } = limiter.check_at("enroll", "203.0.113.9", &limit, t0)
    else {
        panic!("request past the burst was allowed");
    };
    // Five requests at once put the TAT 5 T ahead; the sixth may come once
    // one T of it has drained: retry_after == T.
    assert_eq!(retry_after, Duration::from_secs(1));
    // Limited requests are not counted: asking again does not move it.
    assert_eq!(
        limiter.check_at("enroll", "203.0.113.9", &limit, t0),
        Decision::Limited { retry_after }
    );
    // Just short of it: still limited, with the remainder to wait.
    assert_eq!(
        limiter.check_at(
            "enroll",
            "203.0.113.9",
            &limit,
            t0 + retry_after - Duration::from_micros(1)
        ),
        Decision::Limited {
            retry_after: Duration::from_micros(1)
        }
    );
    let t1 = t0 + retry_after;
    assert_eq!(
        limiter.check_at("enroll", "203.0.113.9", &limit, t1),
        Decision::Allowed
    );
    assert!(matches!(
        limiter.check_at("enroll", "203.0.113.9", &limit, t1),
        Decision::Limited { .. }
    ));
    // After a full quiet period the whole burst is back.
    let t2 = t1 + Duration::from_secs(5);
    for _ in 0..5 {
        assert_eq!(
            limiter.check_at("enroll", "203.0.113.9", &limit, t2),
            Decision::Allowed
        );
    }
    assert!(matches!(
        limiter.check_at("enroll", "203.0.113.9", &limit, t2),
        Decision::Limited { .. }
    ));
}

#[test]
fn sustained_rate_at_exactly_per_minute_passes_indefinitely() {
    let limiter = MemoryRateLimiter::new();
    // 7 per minute does not divide a minute into whole microseconds, which
    // is where rounding the wrong way would show.
    for (per_minute, burst) in [(7_u32, 1_u32), (60, 1), (600, 3), (1_000_000, 1)] {
        let limit = RateLimit { per_minute, burst };
        let key = format!("{per_minute}/{burst}");
        for i in 0..20_000_u64 {
            // The i-th request exactly on schedule, truncated to µs.
            let now = Duration::from_micros(i * 60_000_000 / u64::from(per_minute));
            assert_eq!(
                limiter.check_at("device", &key, &limit, now),
                Decision::Allowed,
                "{key}: request {i} at {now:?}"
            );
        }
    }
}

#[test]
fn faster_than_the_rate_is_held_to_the_rate() {
    let limiter = MemoryRateLimiter::new();
    let limit = RateLimit {
        per_minute: 60,
        burst: 10,
    };
    // Ten requests a second for a minute: the burst plus one per second pass.
    let allowed = (0..600_u64)
        .filter(|i| {
            limiter.check_at("public", "k", &limit, Duration::from_millis(i * 100))
                == Decision::Allowed
        })
        .count();
    assert_eq!(allowed, 10 + 59);
}

#[test]
fn classes_and_keys_have_separate_budgets() {
    let limiter = MemoryRateLimiter::new();
    let limit = RateLimit {
        per_minute: 1,
        burst: 1,
    };
    let now = at_secs(5);
    assert_eq!(
        limiter.check_at("enroll", "a", &limit, now),
        Decision::Allowed
    );
    assert!(matches!(
        limiter.check_at("enroll", "a", &limit, now),
        Decision::Limited { .. }
    ));
    assert_eq!(
        limiter.check_at("enroll", "b", &limit, now),
        Decision::Allowed
    );
    assert_eq!(
        limiter.check_at("sessions", "a", &limit, now),
        Decision::Allowed
    );
    // Splitting the same bytes differently is a different pair.
    assert_eq!(
        limiter.check_at("enrol", "la", &limit, now),
        Decision::Allowed
    );
    assert!(matches!(
        limiter.check_at("sessions", "a", &limit, now),
        Decision::Limited { .. }
    ));
    assert_eq!(limiter.tracked_keys(), 4);
}

#[test]
fn retry_after_is_never_zero_and_is_exact() {
    let limiter = MemoryRateLimiter::new();
    let limit = RateLimit {
        per_minute: 7,
        burst: 3,
    };
    let mut now = Duration::ZERO;
    let mut limited_seen = 0;
    for step in 0..5_000_u64 {
        match limiter.check_at("admin", "k", &limit, now) {
            Decision::Allowed => {}
            Decision::Limited { retry_after } => {
                limited_seen += 1;
                assert!(retry_after > Duration::ZERO);
                // Waiting exactly that long is enough.
                assert_eq!(
                    limiter.check_at("admin", "k", &limit, now + retry_after),
                    Decision::Allowed
                );
                now += retry_after;
            }
        }
        // Irregular gaps, shorter than T on average.
        now += Duration::from_micros((step * 7_919) % 5_000_000);
    }
    assert!(limited_seen > 100, "only {limited_seen} limited");
}

#[test]
fn spraying_distinct_keys_keeps_the_table_bounded() {
    let limiter = MemoryRateLimiter::new();
    let limit = RateLimit {
        per_minute: 60,
        burst: 2,
    };
    let mut peak = 0;
    // 100,000 distinct keys, one per millisecond: about 1,000 are live at
    // any moment (each TAT lies 1 s ahead), and only pruning stops the
    // other 99,000 from piling up.
    for i in 0..100_000_u64 {
        let key = format!("198.51.{}.{}", i / 256, i % 256);
        let now = Duration::from_millis(i);
        assert_eq!(
            limiter.check_at("public", &key, &limit, now),
            Decision::Allowed,
            "key {i}"
        );
        peak = peak.max(limiter.tracked_keys());
    }
    assert!(peak <= 2 * SHARDS * MIN_PRUNE_LEN, "table grew to {peak}");
    // Once everything has expired, the next prune empties the shard it runs on.
    let later = Duration::from_secs(200);
    for i in 0..10_000_u64 {
        limiter.check_at("public", &format!("late-{i}"), &limit, later);
    }
    assert!(limiter.tracked_keys() <= 10_000 + SHARDS * MIN_PRUNE_LEN);
}

#[test]
fn a_full_table_refuses_new_keys_but_serves_tracked_ones() {
    let max_keys = 1_024;
    let limiter = MemoryRateLimiter::with_max_keys(max_keys);
    // Burst 2, so a tracked key still has budget left after the spray.
    let limit = RateLimit {
        per_minute: 60,
        burst: 2,
    };
    let now = at_secs(10);
    // Keys sprayed within one instant all stay live, so pruning cannot help.
    let mut first_refused = None;
    let mut allowed = 0;
    for i in 0..100_000_u64 {
        match limiter.check_at("public", &format!("spray-{i}"), &limit, now) {
            Decision::Allowed => allowed += 1,
            Decision::Limited { retry_after } => {
                // Until the earliest live entry expires: one T.
                assert_eq!(retry_after, Duration::from_secs(1));
                first_refused.get_or_insert(i);
            }
        }
    }
    assert_eq!(allowed, max_keys);
    assert_eq!(limiter.tracked_keys(), max_keys);
    assert!(first_refused.unwrap() < max_keys as u64 * 2);
    // While the table is full, a key admitted before it filled (the very
    // first always is) keeps its normal budget, and a new one waits.
    assert_eq!(
        limiter.check_at("public", "spray-0", &limit, now),
        Decision::Allowed
    );
    assert!(matches!(
        limiter.check_at("public", "spray-0", &limit, now),
        Decision::Limited { .. }
    ));
    assert!(matches!(
        limiter.check_at("enroll", "newcomer", &limit, now),
        Decision::Limited { .. }
    ));
    // Once the sprayed entries expire, new keys get in again.
    let later = now + Duration::from_secs(3);
    assert_eq!(
        limiter.check_at("enroll", "newcomer", &limit, later),
        Decision::Allowed
    );
    assert!(limiter.tracked_keys() <= max_keys);
}

#[test]
fn zero_limits_admit_nothing_and_check_reports_them() {
    let limiter = MemoryRateLimiter::new();
    for limit in [
        RateLimit {
            per_minute: 0,
            burst: 5,
        },
        RateLimit {
            per_minute: 5,
            burst: 0,
        },
        RateLimit {
            per_minute: 0,
            burst: 0,
        },
    ] {
        assert_eq!(
            limiter.check_at("enroll", "k", &limit, at_secs(1)),
            Decision::Limited { retry_after: MIN }
        );
        assert!(matches!(
            limit.validate(),
            Err(RateLimitError::InvalidLimit { .. })
        ));
    }
    assert_eq!(limiter.tracked_keys(), 0);
}

#[tokio::test]
async fn trait_check_uses_the_monotonic_clock_and_validates_input() {
    let limiter: Arc<dyn RateLimiter> = connect(None).await.unwrap();
    assert_eq!(limiter.backend(), "memory");
    let limit = RateLimit {
        per_minute: 1,
        burst: 2,
    };
    assert_eq!(
        limiter.check("enroll", "k", &limit).await.unwrap(),
        Decision::Allowed
    );
    assert_eq!(
        limiter.check("enroll", "k", &limit).await.unwrap(),
        Decision::Allowed
    );
    let Decision::Limited { retry_after } = limiter.check("enroll", "k", &limit).await.unwrap()
    else {
        panic!("third request within a minute was allowed");
    };
    // Nearly a full T (60 s) away; the real time that passed is tiny.
    assert!(
        retry_after > Duration::from_secs(50) && retry_after <= MIN,
        "{retry_after:?}"
    );

    let err = limiter
        .check(
            "enroll",
            "k",
            &RateLimit {
                per_minute: 0,
                burst: 1,
            },
        )
        .await;
    assert!(matches!(
        err,
        Err(RateLimitError::InvalidLimit {
            per_minute: 0,
            burst: 1
        })
    ));
    for class in ["", "en:roll"] {
        assert!(matches!(
            limiter.check(class, "k", &limit).await,
            Err(RateLimitError::InvalidClass(_))
        ));
    }
}

#[test]
fn concurrent_checks_never_exceed_the_burst() {
    let limiter = MemoryRateLimiter::new();
    let limit = RateLimit {
        per_minute: 1,
        burst: 100,
    };
    let now = at_secs(42);
    let allowed: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    (0..500)
                        .filter(|_| {
                            limiter.check_at("device", "shared", &limit, now) == Decision::Allowed
                        })
                        .count()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap())
            .sum()
    });
    assert_eq!(allowed, 100);
}

#[test]
fn extreme_times_and_limits_do_not_panic() {
    let limiter = MemoryRateLimiter::new();
    let limits = [
        RateLimit {
            per_minute: u32::MAX,
            burst: u32::MAX,
        },
        RateLimit {
            per_minute: 1,
            burst: u32::MAX,
        },
        RateLimit {
            per_minute: 1,
            burst: 1,
        },
    ];
    for limit in limits {
        for now in [
            Duration::ZERO,
            Duration::from_secs(u64::MAX / 2),
            Duration::MAX,
        ] {
            let _ = limiter.check_at("public", "edge", &limit, now);
        }
    }
    // A burst far beyond what the tolerance cap covers still works.
    let huge = RateLimit {
        per_minute: 1,
        burst: u32::MAX,
    };
    for _ in 0..1_000 {
        assert_eq!(
            limiter.check_at("public", "huge", &huge, at_secs(1)),
            Decision::Allowed
        );
    }
}
