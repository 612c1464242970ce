//! `qflare bench`: measurements of a real server over real HTTPS.
//!
//! `bench sessions` answers one question: what does the post-quantum
//! application layer cost next to plain HTTPS on the same TLS setup? It starts
//! the same [`qflare_server::Server`] that `qflare server` runs (TLS 1.3 with
//! X25519MLKEM768, SQLite in a temporary directory) on `127.0.0.1:0`, and
//! drives it with the real edge library, with `N` concurrent workers:
//!
//! * **healthz**: `GET /healthz` on a pinned [`Transport`] per worker, the
//!   connection kept alive by reqwest's pool as in normal use;
//! * **sessions**: `qflare_edge::open_session` for one of `N` devices enrolled
//!   beforehand, i.e. `POST /v1/sessions` and its confirmation, on that
//!   device's own kept-alive transport;
//! * **enrollments**: `qflare_edge::enroll` with a token created through the
//!   admin API before the clock starts: discovery (`/v1/server-info` on a new
//!   connection and the fingerprint check), key generation, `POST /v1/enroll`
//!   on a second, pinned connection, and writing the identity file.
//!
//! Each operation is measured for a fixed time after a warm-up, in rounds of
//! healthz, sessions, enrollments, so that a load spike from another process
//! lands in one round rather than on one side of a ratio; the report gives
//! the median of the rounds. The server runs on a runtime of its own, so the
//! clients' CPU work and the edge library's blocking file writes do not stall
//! its event loop; client and server still share the machine's cores, so
//! every rate includes the client's work too.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use qflare_edge::transport::Transport;
use qflare_edge::{EnrollOptions, Identity};
use qflare_protocol::api::routes;
use qflare_protocol::crypto::sha256;
use qflare_protocol::identity::{EnrollmentToken, ServerFingerprint};
use qflare_protocol::{KemSuite, SignatureSuite};
use qflare_server::api::{CreateTokenRequest, CreatedToken};
use qflare_server::ratelimit::RateLimit;
use qflare_server::{Config, Server, ServerOptions, SharedState};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::admin::AdminClient;

/// The limit every rate-limit class gets during a benchmark: far above what
/// loopback can reach, so the limiter's check still runs on every request
/// but never refuses one.
const UNLIMITED: RateLimit = RateLimit {
    per_minute: 100_000_000,
    burst: 1_000_000,
};

/// The most tokens created for one run, to bound the untimed set-up.
const MAX_TOKENS: usize = 250_000;

/// Tokens created beyond the estimated need, so a faster round than the
/// warm-up predicted does not run dry.
const TOKEN_HEADROOM: f64 = 1.5;

/// Concurrent admin requests while creating tokens.
const TOKEN_CREATORS: usize = 16;

/// Enrollments per second assumed to size the warm-up's token pool, before
/// anything has been measured. If the guess is low the warm-up just ends
/// early, which is harmless: it only estimates the rate for the rounds.
const WARMUP_ENROLL_GUESS: f64 = 200.0;

/// Options of `qflare bench sessions`.
#[derive(Debug, Clone)]
pub struct SessionsOptions {
    /// Concurrent workers in every phase (devices for sessions).
    pub devices: usize,
    /// Measured seconds per operation and round.
    pub seconds: u64,
    /// Warm-up seconds per operation.
    pub warmup: u64,
    /// Rounds of healthz, sessions, enrollments.
    pub rounds: usize,
    /// The devices' KEM suite; the server's default when `None`.
    pub kem: Option<KemSuite>,
    /// Where to write the results as JSON.
    pub json: Option<PathBuf>,
}

/// The three measured operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Operation {
    Healthz,
    Sessions,
    Enrollments,
}

impl Operation {
    const ALL: [Self; 3] = [Self::Healthz, Self::Sessions, Self::Enrollments];

    fn name(self) -> &'static str {
        match self {
            Self::Healthz => "healthz",
            Self::Sessions => "sessions",
            Self::Enrollments => "enrollments",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Healthz => "`GET /healthz`, kept-alive connection",
            Self::Sessions => "`POST /v1/sessions` + `/confirm` (full PQ handshake)",
            Self::Enrollments => "discovery + key generation + `POST /v1/enroll`",
        }
    }
}

// ---------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------

/// The in-process server, on a runtime of its own.
struct BenchServer {
    url: String,
    fingerprint: ServerFingerprint,
    certificate_sha256: [u8; 32],
    state: SharedState,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<Result<(), qflare_server::ServerError>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl BenchServer {
    async fn start(config: Config) -> anyhow::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("qflare-bench-server")
            .enable_all()
            .build()
            .context("starting the server's runtime")?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        // The listener must be bound on the runtime that will poll it.
        let serving = runtime.spawn(async move {
            let started = async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let server = Server::new(config, ServerOptions::default()).await?;
                Ok::<_, qflare_server::ServerError>((listener, addr, server))
            }
            .await;
            let (listener, addr, server) = match started {
                Ok(started) => started,
                Err(err) => {
                    // The error goes to the caller, which reports it.
                    let _ = ready_tx.send(Err(err));
                    return Ok(());
                }
            };
            let _ = ready_tx.send(Ok((addr, server.fingerprint(), server.state().clone())));
            server
                .serve(listener, None, async move {
                    let _ = stopped.await;
                })
                .await
        });
        let (addr, fingerprint, state) = match ready_rx.await {
            Ok(Ok(ready)) => ready,
            Ok(Err(err)) => {
                runtime.shutdown_background();
                return Err(err).context("starting the server");
            }
            Err(_) => {
                runtime.shutdown_background();
                bail!("the server task ended before it was ready");
            }
        };
        let certificate = state
            .identity
            .certificate_chain
            .first()
            .context("the server has no certificate")?;
        Ok(Self {
            url: format!("https://{addr}"),
            fingerprint,
            certificate_sha256: sha256(certificate.as_ref()),
            state,
            stop: Some(stop),
            serving: Some(serving),
            runtime: Some(runtime),
        })
    }

    fn transport(&self) -> anyhow::Result<Transport> {
        Ok(Transport::pinned(
            &self.url,
            self.certificate_sha256,
            qflare_edge::client::DEFAULT_TIMEOUT,
        )?)
    }

    /// Graceful shutdown, as `qflare server` does on SIGTERM.
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            serving
                .await
                .context("the server task panicked")?
                .context("the server stopped with an error")?;
        }
        Ok(())
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Dropping a runtime blocks, which is not allowed inside another
        // runtime; its tasks have finished or are abandoned here anyway.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// TLS handshakes the server completed with one key-exchange group.
#[derive(Debug, Serialize)]
struct GroupCount {
    group: String,
    handshakes: u64,
}

/// Counters read from the server's own Prometheus registry.
#[derive(Debug, Default, Serialize)]
struct ServerCounters {
    /// TLS handshakes by negotiated key-exchange group.
    tls_handshakes: Vec<GroupCount>,
    /// Requests the rate limiter refused (must stay 0).
    rate_limited: u64,
}

fn read_counters(state: &SharedState) -> ServerCounters {
    let text = state.metrics.render();
    let mut counters = ServerCounters::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let value = value as u64;
        if let Some(group) = name
            .strip_prefix("qflare_tls_handshakes_total{group=\"")
            .and_then(|rest| rest.strip_suffix("\"}"))
        {
            counters.tls_handshakes.push(GroupCount {
                group: group.to_owned(),
                handshakes: value,
            });
        } else if name.starts_with("qflare_rate_limited_total{") {
            counters.rate_limited += value;
        }
    }
    counters
}

// ---------------------------------------------------------------------------
// Workers and the measuring loop
// ---------------------------------------------------------------------------

type Step<'a> = Pin<Box<dyn Future<Output = anyhow::Result<bool>> + Send + 'a>>;

/// One concurrent client. `step` performs one operation: `Ok(true)` when it
/// completed, `Ok(false)` when there is no more work (tokens ran out).
trait Worker: Send + 'static {
    fn step(&mut self) -> Step<'_>;
}

struct HealthzWorker {
    transport: Transport,
    url: String,
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

struct HandshakeWorker {
    identity: Identity,
    transport: Transport,
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
struct TokenPool(Mutex<Vec<String>>);

impl TokenPool {
    fn take(&self) -> Option<String> {
        self.0.lock().ok()?.pop()
    }

    fn len(&self) -> usize {
        self.0.lock().map_or(0, |tokens| tokens.len())
    }

    fn add(&self, tokens: Vec<String>) {
        if let Ok(mut pool) = self.0.lock() {
            pool.extend(tokens);
        }
    }
}

struct EnrollWorker {
    tokens: Arc<TokenPool>,
    server_url: String,
    fingerprint: ServerFingerprint,
    kem: Option<KemSuite>,
    /// This worker's directory; every enrollment writes a fresh identity below it.
    dir: PathBuf,
    name: String,
    enrolled: u64,
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
struct Phase {
    operation: Operation,
    /// 1-based; 0 for the warm-up.
    round: usize,
    /// Operations completed.
    count: u64,
    /// Operations that failed.
    errors: u64,
    /// From the start until the last worker finished its last operation.
    wall_secs: f64,
    /// `count / wall_secs`.
    rate_per_sec: f64,
    /// Process CPU time (client and server together) per completed operation.
    cpu_ms_per_op: Option<f64>,
    /// True when the token pool ran dry before the time was up.
    tokens_ran_out: bool,
    /// The first failure, if any.
    first_error: Option<String>,
}

#[derive(Default)]
struct Tally {
    count: u64,
    errors: u64,
    exhausted: bool,
    first_error: Option<String>,
}

/// Process CPU time (user + system, all threads) from `/proc/self/stat`.
fn process_cpu() -> Option<Duration> {
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
async fn measure<W: Worker>(
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

async fn create_tokens(admin: &Arc<AdminClient>, n: usize) -> anyhow::Result<Vec<String>> {
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
async fn fill_pool(
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
fn tokens_for(rate: f64, seconds: u64, devices: usize) -> usize {
    (rate * seconds as f64 * TOKEN_HEADROOM).ceil() as usize + devices
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// One operation over all measured rounds.
#[derive(Debug, Serialize)]
struct Summary {
    operation: Operation,
    rounds: usize,
    /// Operations completed, all rounds.
    count: u64,
    /// Operations failed, all rounds.
    errors: u64,
    /// Measured wall time, all rounds.
    wall_secs: f64,
    /// Median over the rounds of each round's rate.
    median_rate_per_sec: f64,
    min_rate_per_sec: f64,
    max_rate_per_sec: f64,
    /// Process CPU (client + server) per operation, all rounds.
    cpu_ms_per_op: Option<f64>,
    /// Median over the rounds of (this rate / that round's healthz rate).
    ratio_to_healthz: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Ratios {
    /// Median over rounds of sessions/s ÷ healthz/s.
    sessions_per_healthz: Option<f64>,
    /// Median over rounds of enrollments/s ÷ healthz/s.
    enrollments_per_healthz: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Settings {
    concurrency: usize,
    seconds_per_phase: u64,
    warmup_secs: u64,
    rounds: usize,
    kem_suite: KemSuite,
    signature_suite: SignatureSuite,
    server_signature_suite: SignatureSuite,
    store: &'static str,
    rate_limit_per_minute: u32,
    rate_limit_burst: u32,
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    qflare_version: &'static str,
    /// Unix seconds when the run started.
    started_at: u64,
    cpus: usize,
    settings: Settings,
    server: ServerCounters,
    operations: Vec<Summary>,
    ratios: Ratios,
    rounds: Vec<Phase>,
    warmup: Vec<Phase>,
}

fn summarize(rounds: &[Phase], operation: Operation) -> Summary {
    let phases: Vec<&Phase> = rounds.iter().filter(|p| p.operation == operation).collect();
    let mut rates: Vec<f64> = phases.iter().map(|p| p.rate_per_sec).collect();
    rates.sort_by(f64::total_cmp);
    let count = phases.iter().map(|p| p.count).sum::<u64>();
    let cpu_ms: Option<f64> = phases
        .iter()
        .map(|p| p.cpu_ms_per_op.map(|ms| ms * p.count as f64))
        .sum();
    let mut ratios: Vec<f64> = phases
        .iter()
        .filter_map(|p| {
            let healthz = rounds
                .iter()
                .find(|h| h.operation == Operation::Healthz && h.round == p.round)?;
            (healthz.rate_per_sec > 0.0).then(|| p.rate_per_sec / healthz.rate_per_sec)
        })
        .collect();
    Summary {
        operation,
        rounds: phases.len(),
        count,
        errors: phases.iter().map(|p| p.errors).sum(),
        wall_secs: phases.iter().map(|p| p.wall_secs).sum(),
        median_rate_per_sec: median(&mut rates).unwrap_or(0.0),
        min_rate_per_sec: rates.first().copied().unwrap_or(0.0),
        max_rate_per_sec: rates.last().copied().unwrap_or(0.0),
        cpu_ms_per_op: cpu_ms.filter(|_| count > 0).map(|ms| ms / count as f64),
        ratio_to_healthz: median(&mut ratios),
    }
}

fn rate(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |r| format!("{r:.4}"))
}

fn markdown(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = &report.settings;
    let groups = if report.server.tls_handshakes.is_empty() {
        "none recorded".to_owned()
    } else {
        report
            .server
            .tls_handshakes
            .iter()
            .map(|g| format!("{} ×{}", g.group, g.handshakes))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "## qflare bench sessions\n\n\
         * {} concurrent clients per operation; {} round(s) of healthz → sessions → enrollments, \
         {} s each after a {} s warm-up; rates are the median of the rounds, ratios the median of \
         the per-round ratios.\n\
         * Server in-process on 127.0.0.1 (its own runtime), TLS 1.3; key exchange negotiated: {groups}. \
         Store: {}.\n\
         * Rate limits raised for the benchmark: every class {} per minute, burst {}, so the limiter \
         still checks every request but never refuses one ({} refused); this measures crypto and I/O, \
         not the limiter.\n\
         * Devices: {} + {}; server signs with {}. Client and server share {} CPU(s), so each rate \
         includes the client's work; CPU ms/op is the whole process (client + server) per operation.\n",
        s.concurrency,
        s.rounds,
        s.seconds_per_phase,
        s.warmup_secs,
        s.store,
        s.rate_limit_per_minute,
        s.rate_limit_burst,
        report.server.rate_limited,
        s.kem_suite,
        s.signature_suite,
        s.server_signature_suite,
        report.cpus,
    );
    let _ = writeln!(
        out,
        "| operation | one operation is | count | errors | wall (s) | rate (/s, median) | range (/s) | CPU ms/op | ÷ healthz |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for op in &report.operations {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} | {} | {}–{} | {} | {} |",
            op.operation.name(),
            op.operation.what(),
            op.count,
            op.errors,
            op.wall_secs,
            rate(op.median_rate_per_sec),
            rate(op.min_rate_per_sec),
            rate(op.max_rate_per_sec),
            op.cpu_ms_per_op
                .map_or_else(|| "-".into(), |ms| format!("{ms:.2}")),
            ratio(op.ratio_to_healthz),
        );
    }
    let inverse = |r: Option<f64>| {
        r.filter(|r| *r > 0.0)
            .map_or_else(|| "-".into(), |r| format!("{:.0}", 1.0 / r))
    };
    let _ = writeln!(
        out,
        "\nsessions/healthz = {} (one handshake costs about {} health checks); \
         enrollments/healthz = {} (one enrollment costs about {}).\n",
        ratio(report.ratios.sessions_per_healthz),
        inverse(report.ratios.sessions_per_healthz),
        ratio(report.ratios.enrollments_per_healthz),
        inverse(report.ratios.enrollments_per_healthz),
    );
    let _ = writeln!(
        out,
        "| round | healthz/s | sessions/s | enrollments/s | sessions÷healthz | enrollments÷healthz |"
    );
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|");
    for round in 1..=s.rounds {
        let find = |operation: Operation| {
            report
                .rounds
                .iter()
                .find(|p| p.round == round && p.operation == operation)
                .map(|p| p.rate_per_sec)
        };
        let (h, se, en) = (
            find(Operation::Healthz),
            find(Operation::Sessions),
            find(Operation::Enrollments),
        );
        let cell = |v: Option<f64>| v.map_or_else(|| "-".into(), rate);
        let per = |v: Option<f64>| ratio(v.zip(h).filter(|(_, h)| *h > 0.0).map(|(v, h)| v / h));
        let _ = writeln!(
            out,
            "| {round} | {} | {} | {} | {} | {} |",
            cell(h),
            cell(se),
            cell(en),
            per(se),
            per(en),
        );
    }
    out
}

// ---------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------

fn bench_config(state_dir: &Path) -> Config {
    // The built-in defaults, not the operator's file: runs stay comparable
    // across machines, and a production config may point at PostgreSQL.
    let mut config = Config::default();
    config.server.state_dir = state_dir.to_path_buf();
    config.server.metrics_listen = None;
    // Neither enrollment nor the handshake involves the round controller or
    // its enclave process; starting them would only add noise.
    config.federation.enabled = false;
    config.rate_limits.enroll = UNLIMITED;
    config.rate_limits.sessions = UNLIMITED;
    config.rate_limits.device = UNLIMITED;
    config.rate_limits.admin = UNLIMITED;
    config.rate_limits.public = UNLIMITED;
    config
}

/// `qflare bench sessions`.
pub async fn sessions(options: SessionsOptions) -> anyhow::Result<()> {
    if options.devices == 0 || options.seconds == 0 || options.rounds == 0 {
        bail!("--devices, --seconds and --rounds must be at least 1");
    }
    let started_at = qflare_edge::client::unix_now();
    let workdir = tempfile::Builder::new()
        .prefix("qflare-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let state_dir = workdir.path().join("server");
    let config = bench_config(&state_dir);
    let kem = options.kem.unwrap_or(config.crypto.default_kem_suite);
    if !config.crypto.kem_suites.contains(&kem) {
        bail!("the server does not offer {kem}");
    }
    let server_signature_suite = config.crypto.server_signature_suite;
    let store = "SQLite in a temporary directory";
    let server = BenchServer::start(config).await?;
    let duration = Duration::from_secs(options.seconds);
    let warmup = Duration::from_secs(options.warmup);
    let n = options.devices;
    eprintln!(
        "bench sessions: server on {} ({store}), {n} workers, {} round(s) × {} s after {} s warm-up",
        server.url, options.rounds, options.seconds, options.warmup
    );

    let admin = Arc::new(AdminClient::connect(&server.url, None, &state_dir, None).await?);
    let pool = Arc::new(TokenPool::default());

    // Set-up, untimed: the session devices, and every worker's transport.
    eprintln!("set-up (not timed): enrolling {n} devices for the session phase");
    fill_pool(&admin, &pool, n).await?;
    let mut enrolling = JoinSet::new();
    for i in 0..n {
        let token = pool.take().context("token pool empty during set-up")?;
        let options = EnrollOptions {
            server_url: server.url.clone(),
            token: EnrollmentToken::parse(&token)?,
            fingerprint: server.fingerprint,
            device_name: format!("bench-session-{i}"),
            kem_suite: Some(kem),
            signature_suite: None,
        };
        let dir = workdir.path().join("devices").join(i.to_string());
        enrolling.spawn(async move { qflare_edge::enroll(options, &dir).await });
    }
    let mut handshakers = Vec::with_capacity(n);
    while let Some(joined) = enrolling.join_next().await {
        let identity = joined.context("an enrollment task panicked")??;
        let transport = qflare_edge::transport_for(&identity)?;
        handshakers.push(HandshakeWorker {
            identity,
            transport,
        });
    }
    let healthz_url = format!("{}/healthz", server.url);
    let mut checkers = (0..n)
        .map(|_| {
            Ok(HealthzWorker {
                transport: server.transport()?,
                url: healthz_url.clone(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut enrollers: Vec<EnrollWorker> = (0..n)
        .map(|i| EnrollWorker {
            tokens: pool.clone(),
            server_url: server.url.clone(),
            fingerprint: server.fingerprint,
            kem: Some(kem),
            dir: workdir.path().join("enrolled").join(i.to_string()),
            name: format!("bench-{i}"),
            enrolled: 0,
        })
        .collect();

    // Warm-up: opens every kept-alive connection and warms caches; it also
    // estimates the enrollment rate so enough tokens exist for the rounds.
    eprintln!("warm-up");
    let mut warmups = Vec::new();
    let (phase, workers) = measure(Operation::Healthz, 0, checkers, warmup).await?;
    checkers = workers;
    warmups.push(phase);
    let (phase, workers) = measure(Operation::Sessions, 0, handshakers, warmup).await?;
    handshakers = workers;
    warmups.push(phase);
    fill_pool(
        &admin,
        &pool,
        tokens_for(WARMUP_ENROLL_GUESS, options.warmup, n),
    )
    .await?;
    let (phase, workers) = measure(Operation::Enrollments, 0, enrollers, warmup).await?;
    enrollers = workers;
    let mut enroll_rate = phase.rate_per_sec;
    warmups.push(phase);
    fill_pool(
        &admin,
        &pool,
        tokens_for(enroll_rate, options.seconds, n).saturating_mul(options.rounds),
    )
    .await?;

    let mut rounds = Vec::new();
    for round in 1..=options.rounds {
        eprintln!("round {round}/{}", options.rounds);
        let (phase, workers) = measure(Operation::Healthz, round, checkers, duration).await?;
        checkers = workers;
        rounds.push(phase);
        let (phase, workers) = measure(Operation::Sessions, round, handshakers, duration).await?;
        handshakers = workers;
        rounds.push(phase);
        // Normally a no-op: the pool was filled for every round after the warm-up.
        fill_pool(&admin, &pool, tokens_for(enroll_rate, options.seconds, n)).await?;
        let (phase, workers) = measure(Operation::Enrollments, round, enrollers, duration).await?;
        enrollers = workers;
        enroll_rate = enroll_rate.max(phase.rate_per_sec);
        rounds.push(phase);
    }
    // Close the clients' kept-alive connections so the graceful stop below
    // has nothing to drain.
    drop((checkers, handshakers, enrollers));

    let counters = read_counters(&server.state);
    server.stop().await?;

    let operations: Vec<Summary> = Operation::ALL
        .iter()
        .map(|&op| summarize(&rounds, op))
        .collect();
    let ratio_of = |op: Operation| {
        operations
            .iter()
            .find(|s| s.operation == op)
            .and_then(|s| s.ratio_to_healthz)
    };
    let report = Report {
        benchmark: "sessions",
        qflare_version: env!("CARGO_PKG_VERSION"),
        started_at,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        settings: Settings {
            concurrency: n,
            seconds_per_phase: options.seconds,
            warmup_secs: options.warmup,
            rounds: options.rounds,
            kem_suite: kem,
            signature_suite: SignatureSuite::default(),
            server_signature_suite,
            store,
            rate_limit_per_minute: UNLIMITED.per_minute,
            rate_limit_burst: UNLIMITED.burst,
        },
        server: counters,
        ratios: Ratios {
            sessions_per_healthz: ratio_of(Operation::Sessions),
            enrollments_per_healthz: ratio_of(Operation::Enrollments),
        },
        operations,
        rounds,
        warmup: warmups,
    };
    println!("{}", markdown(&report));
    if let Some(path) = &options.json {
        let json = serde_json::to_vec_pretty(&report).context("encoding the results")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }

    let errors: u64 = report.operations.iter().map(|s| s.errors).sum();
    if errors > 0 {
        let first = report
            .rounds
            .iter()
            .find_map(|p| p.first_error.as_deref())
            .unwrap_or("?");
        bail!("{errors} operations failed, so these numbers are suspect; the first: {first}");
    }
    if report.server.rate_limited > 0 {
        bail!(
            "the rate limiter refused {} requests; the numbers measure it, not the protocol",
            report.server.rate_limited
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

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
