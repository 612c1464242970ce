//! The load: one worker type per measured operation, the timed loop that
//! runs them, and the untimed creation of enrollment tokens.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use qflare_edge::transport::Transport;
use qflare_edge::{EnrollOptions, Identity};
use qflare_protocol::KemSuite;
use qflare_protocol::api::routes;
use qflare_protocol::identity::{EnrollmentToken, ServerFingerprint};
use qflare_server::api::{CreateTokenRequest, CreatedToken};
use serde::Serialize;
use tokio::task::JoinSet;

use super::Operation;
use crate::admin::AdminClient;

/// The most tokens created for one run, to bound the untimed set-up.
pub(super) const MAX_TOKENS: usize = 250_000;

/// Tokens created beyond the estimated need, so a faster round than the
/// warm-up predicted does not run dry.
pub(super) const TOKEN_HEADROOM: f64 = 1.5;

/// Concurrent admin requests while creating tokens.
pub(super) const TOKEN_CREATORS: usize = 16;

/// Enrollments per second assumed to size the warm-up's token pool, before
/// anything has been measured. If the guess is low the warm-up just ends
/// early, which is harmless: it only estimates the rate for the rounds.
pub(super) const WARMUP_ENROLL_GUESS: f64 = 200.0;

pub(super) type Step<'a> = Pin<Box<dyn Future<Output = anyhow::Result<bool>> + Send + 'a>>;

/// One concurrent client. `step` performs one operation: `Ok(true)` when it
/// completed, `Ok(false)` when there is no more work (tokens ran out).
pub(super) trait Worker: Send + 'static {
    fn step(&mut self) -> Step<'_>;
}

pub(super) struct HealthzWorker {
    pub(super) transport: Transport,
    pub(super) url: String,
}

impl Worker for HealthzWorker {
    fn step(&mut self) -> Step<'_> {
        Box::pin(async move {
            let response = self.transport.http.get(&self.url).send().await?;
            let status = response.status();
            // Reading the body to its end is what returns the connection to the pool.
            response.bytes().await?;
            anyhow::ensure!(status.is_success(), "GET /healthz answered {status}");
            Ok(true)
        })
    }
}

pub(super) struct HandshakeWorker {
    pub(super) identity: Identity,
    pub(super) transport: Transport,
}

impl Worker for HandshakeWorker {
    fn step(&mut self) -> Step<'_> {
        Box::pin(async move {
            qflare_edge::open_session(&self.identity, &self.transport).await?;
            Ok(true)
        })
    }
}

/// Tokens created before the clock starts, handed out one per enrollment.
#[derive(Debug, Default)]
pub(super) struct TokenPool(Mutex<Vec<String>>);

impl TokenPool {
    pub(super) fn take(&self) -> Option<String> {
        self.0.lock().ok()?.pop()
    }

    pub(super) fn len(&self) -> usize {
        self.0.lock().map_or(0, |tokens| tokens.len())
    }

    pub(super) fn add(&self, tokens: Vec<String>) {
        if let Ok(mut pool) = self.0.lock() {
            pool.extend(tokens);
        }
    }
}

pub(super) struct EnrollWorker {
    pub(super) tokens: Arc<TokenPool>,
    pub(super) server_url: String,
    pub(super) fingerprint: ServerFingerprint,
    pub(super) kem: Option<KemSuite>,
    /// This worker's directory; every enrollment writes a fresh identity below it.
    pub(super) dir: PathBuf,
    pub(super) name: String,
    pub(super) enrolled: u64,
}

impl Worker for EnrollWorker {
    fn step(&mut self) -> Step<'_> {
        Box::pin(async move {
            let Some(token) = self.tokens.take() else {
                return Ok(false);
            };
            let n = self.enrolled;
            self.enrolled += 1;
            qflare_edge::enroll(
                EnrollOptions {
                    server_url: self.server_url.clone(),
                    token: EnrollmentToken::parse(&token)?,
                    fingerprint: self.fingerprint,
                    device_name: format!("{}-{n}", self.name),
                    kem_suite: self.kem,
                    signature_suite: None,
                    alternate_urls: Vec::new(),
                },
                &self.dir.join(n.to_string()),
            )
            .await?;
            Ok(true)
        })
    }
}

/// What one phase measured.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Phase {
    pub(super) operation: Operation,
    /// 1-based; 0 for the warm-up.
    pub(super) round: usize,
    /// Operations completed.
    pub(super) count: u64,
    /// Operations that failed.
    pub(super) errors: u64,
    /// From the start until the last worker finished its last operation.
    pub(super) wall_secs: f64,
    /// `count / wall_secs`.
    pub(super) rate_per_sec: f64,
    /// Process CPU time (client and server together) per completed operation.
    pub(super) cpu_ms_per_op: Option<f64>,
    /// True when the token pool ran dry before the time was up.
    pub(super) tokens_ran_out: bool,
    /// The first failure, if any.
    pub(super) first_error: Option<String>,
}

#[derive(Default)]
pub(super) struct Tally {
    pub(super) count: u64,
    pub(super) errors: u64,
    pub(super) exhausted: bool,
    pub(super) first_error: Option<String>,
}

/// Process CPU time (user + system, all threads) from `/proc/self/stat`.
pub(super) fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; the fields after its
    // closing parenthesis start with field 3, so utime (14) and stime (15)
    // are at indices 11 and 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // In USER_HZ ticks, which Linux fixes at 100 per second for user space.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Runs `workers` concurrently until `duration` has passed (each finishes the
/// operation it is in) and hands them back for the next round.
pub(super) async fn measure<W: Worker>(
    operation: Operation,
    round: usize,
    workers: Vec<W>,
    duration: Duration,
) -> anyhow::Result<(Phase, Vec<W>)> {
    let cpu_before = process_cpu();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for mut worker in workers {
        tasks.spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < deadline {
                match worker.step().await {
                    Ok(true) => tally.count += 1,
                    Ok(false) => {
                        tally.exhausted = true;
                        break;
                    }
                    Err(err) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert_with(|| format!("{err:#}"));
                    }
                }
            }
            (worker, tally)
        });
    }
    let mut workers = Vec::with_capacity(tasks.len());
    let mut total = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let (worker, tally) = joined.context("a benchmark worker panicked")?;
        workers.push(worker);
        total.count += tally.count;
        total.errors += tally.errors;
        total.exhausted |= tally.exhausted;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let wall = start.elapsed();
    let cpu = process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let wall_secs = wall.as_secs_f64();
    let phase = Phase {
        operation,
        round,
        count: total.count,
        errors: total.errors,
        wall_secs,
        rate_per_sec: if wall_secs > 0.0 {
            total.count as f64 / wall_secs
        } else {
            0.0
        },
        cpu_ms_per_op: cpu
            .filter(|_| total.count > 0)
            .map(|cpu| cpu.as_secs_f64() * 1000.0 / total.count as f64),
        tokens_ran_out: total.exhausted,
        first_error: total.first_error,
    };
    let label = if round == 0 {
        "warm-up".to_owned()
    } else {
        format!("round {round}")
    };
    eprintln!(
        "  {label:<8} {:<12} {:>8} ok {:>4} errors in {:>6.2} s = {:>9.1}/s{}",
        operation.name(),
        phase.count,
        phase.errors,
        phase.wall_secs,
        phase.rate_per_sec,
        if phase.tokens_ran_out {
            " (tokens ran out)"
        } else {
            ""
        }
    );
    Ok((phase, workers))
}

// ---------------------------------------------------------------------------
// Set-up steps (never timed)
// ---------------------------------------------------------------------------

pub(super) async fn create_tokens(
    admin: &Arc<AdminClient>,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut tasks = JoinSet::new();
    for creator in 0..TOKEN_CREATORS.min(n.max(1)) {
        let admin = admin.clone();
        let share = n / TOKEN_CREATORS + usize::from(creator < n % TOKEN_CREATORS);
        tasks.spawn(async move {
            let mut tokens = Vec::with_capacity(share);
            for _ in 0..share {
                let created: CreatedToken = admin
                    .post(
                        routes::ADMIN_TOKENS,
                        &CreateTokenRequest {
                            label: "bench".into(),
                            ttl_secs: None,
                        },
                    )
                    .await?;
                tokens.push(created.token);
            }
            Ok::<_, anyhow::Error>(tokens)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        all.extend(joined.context("a token creator panicked")??);
    }
    Ok(all)
}

/// Tops the pool up to `target` tokens, reporting the (untimed) cost.
pub(super) async fn fill_pool(
    admin: &Arc<AdminClient>,
    pool: &TokenPool,
    target: usize,
) -> anyhow::Result<()> {
    let missing = target.min(MAX_TOKENS).saturating_sub(pool.len());
    if missing == 0 {
        return Ok(());
    }
    let start = Instant::now();
    pool.add(create_tokens(admin, missing).await?);
    eprintln!(
        "  created {missing} tokens through POST /v1/admin/tokens in {:.1} s (not timed)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Tokens one enrollment round needs at `rate` per second, with headroom.
pub(super) fn tokens_for(rate: f64, seconds: u64, devices: usize) -> usize {
    (rate * seconds as f64 * TOKEN_HEADROOM).ceil() as usize + devices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_readable_on_linux() {
        // Burn a little CPU so the counter has moved off zero.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(process_cpu().is_some());
    }

    #[test]
    fn tokens_cover_the_estimate_with_headroom() {
        assert_eq!(tokens_for(100.0, 10, 64), 1500 + 64);
        assert_eq!(tokens_for(0.0, 10, 64), 64);
    }
}
