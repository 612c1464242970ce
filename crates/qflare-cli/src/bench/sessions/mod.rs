//! `qflare bench sessions`: measurements of a real server over real HTTPS.
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

mod load;
mod report;
mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use qflare_edge::EnrollOptions;
use qflare_protocol::identity::EnrollmentToken;
use qflare_protocol::{KemSuite, SignatureSuite};
use qflare_server::Config;
use qflare_server::ratelimit::RateLimit;
use serde::Serialize;
use tokio::task::JoinSet;

use self::load::{
    EnrollWorker, HandshakeWorker, HealthzWorker, TokenPool, WARMUP_ENROLL_GUESS, fill_pool,
    measure, tokens_for,
};
use self::report::{Ratios, Report, Settings, Summary, markdown, summarize};
use self::server::{BenchServer, read_counters};
use crate::admin::AdminClient;

/// The limit every rate-limit class gets during a benchmark: far above what
/// loopback can reach, so the limiter's check still runs on every request
/// but never refuses one.
const UNLIMITED: RateLimit = RateLimit {
    per_minute: 100_000_000,
    burst: 1_000_000,
};

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
            alternate_urls: Vec::new(),
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
