//! `qflare bench flood`: every rate-limited route driven at a multiple of
//! its limit from several loopback addresses, while an enrolled device goes
//! on with its calls; what it owns is the flood and the device's side of it.
//! The server runs as a child process ([`super::child_server`]) with its
//! default rate limits written out in full, so that what is measured is the
//! limiter as shipped.
//!
//! Three phases:
//!
//! 1. **Set-up.** One device enrolls from 127.0.0.1 and waits until it is
//!    selected for the open round. It runs on a thread and runtime of its
//!    own, so that the attackers' tasks do not sit in its latencies.
//! 2. **Baseline.** The device does what a device does, at its own pace:
//!    every `--poll-interval-ms` a poll of the round and a health check, a
//!    new session (hello and confirmation) every eighth time, all within
//!    the limits of its own address and its own id.
//! 3. **Flood.** Each attacker address 127.0.0.2 … 127.0.0.(1 + N) sends,
//!    per class, `--multiplier` times that class's per-minute limit, paced
//!    open-loop (requests leave on a fixed schedule whatever the answers),
//!    while the device goes on as before.
//!
//! What each class is sent (the server keys IPv4 clients by address):
//!
//! * `enroll`: `POST /v1/enroll`, a well-formed request with a valid proof
//!   of possession and a token that does not exist;
//! * `sessions`: `POST /v1/sessions`, valid hellos naming the legitimate
//!   device (the server charges them to the device-and-address pair, after
//!   the address's own sessions budget);
//! * `admin`: the admin API and the dashboard with a wrong admin token;
//! * `public`: health, server info, an unknown path, and a sealed route with
//!   a session that does not exist;
//! * `connections`: a health check on a new TLS connection every time.
//!
//! The `device` class is not flooded: it is spent only by a confirmation or
//! a sealed request, which need the device's keys. Over its limit, the
//! device's own calls would be refused, which is what the bench checks for.

mod report;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use qflare_edge::Identity;
use qflare_edge::transport::Transport;
use qflare_protocol::api::{SEALED_CONTENT_TYPE, SESSION_HEADER, routes};
use qflare_protocol::enrollment;
use qflare_protocol::handshake::ClientHello;
use qflare_protocol::identity::{DeviceKeys, EnrollmentToken, ServerFingerprint};
use qflare_protocol::kem::KemKeyPair;
use qflare_server::config::RateLimitSection;
use qflare_server::ratelimit::RateLimit;
use reqwest::header::CONTENT_TYPE;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::report::{Call, Class, Outcome, Report, Sample, Tally};
use super::child_server::{self, ChildConfig, ChildServer};

/// The attackers' request timeout: long enough to tell a slow answer from
/// none, short enough to bound what is in flight.
const ATTACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A new session every this many polls of the device.
const HANDSHAKE_EVERY: u64 = 8;

/// A wrong admin token, long enough that the server hashes and compares it.
const WRONG_ADMIN_TOKEN: &str = "not-the-admin-token-0123456789abcdefghijkl";

/// `qflare bench flood` options.
#[derive(Debug, clap::Args)]
pub struct FloodArgs {
    /// Seconds of flood.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seconds of the device's calls measured before the flood.
    #[arg(long, default_value_t = 20)]
    pub baseline_seconds: u64,
    /// Attacking addresses: 127.0.0.2 to 127.0.0.(1 + N).
    #[arg(long, default_value_t = 4)]
    pub attackers: u8,
    /// Each address sends this many times each class's per-minute limit.
    #[arg(long, default_value_t = 10)]
    pub multiplier: u32,
    /// Milliseconds between the device's polls (each with a health check; a
    /// new session every eighth).
    #[arg(long, default_value_t = 250)]
    pub poll_interval_ms: u64,
    /// The server executable to measure (default: this one). Its enclave
    /// executable must sit beside it, as in a build directory.
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Also write the results as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// Runs the benchmark; prints markdown tables, and fails if the server
/// answered 5xx or refused the device anything.
pub async fn run(args: FloodArgs) -> anyhow::Result<()> {
    if args.seconds == 0 || args.multiplier == 0 || args.poll_interval_ms == 0 {
        bail!("--seconds, --multiplier and --poll-interval-ms must be at least 1");
    }
    if !(1..=253).contains(&args.attackers) {
        bail!("--attackers must be between 1 and 253 (127.0.0.2 to 127.0.0.254)");
    }
    let bin = child_server::server_bin(args.server_bin.clone())?;
    let limits = RateLimitSection::default();
    // A device over its own limits would be refused whatever the attackers
    // do; the bench is about the attackers.
    let cycles_per_minute = 60_000 / args.poll_interval_ms;
    if 2 * cycles_per_minute > u64::from(limits.public.per_minute)
        || 2 * cycles_per_minute / HANDSHAKE_EVERY > u64::from(limits.sessions.per_minute)
    {
        bail!(
            "--poll-interval-ms {} puts the device itself over its address's limits",
            args.poll_interval_ms
        );
    }
    let written: Vec<(&str, RateLimit)> = Class::ALL
        .iter()
        .map(|class| (class.name(), class.limit(&limits)))
        .chain([("device", limits.device)])
        .collect();
    let server = ChildServer::start(
        &bin,
        "qflare-bench-flood-",
        &ChildConfig::new("mnist-cnn", &written),
    )
    .await?;
    eprintln!("server up; enrolling the device");
    let identity = server.enroll("bench-device", "device").await?;
    let payloads = Arc::new(Payloads::new(&identity, &server.fingerprint)?);

    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = oneshot::channel();
    let interval = Duration::from_millis(args.poll_interval_ms);
    let device = std::thread::Builder::new()
        .name("bench-device".into())
        .spawn(move || device_thread(identity, interval, ready_tx, stop_rx))
        .context("starting the device's thread")?;
    ready_rx
        .await
        .map_err(|_| anyhow!("the device's thread ended during set-up"))??;

    let addresses: Vec<IpAddr> = (0..args.attackers)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
        .collect();
    let mut attackers = Vec::new();
    for &address in &addresses {
        attackers.push(Arc::new(Attacker::connect(&server.url, address).await?));
    }
    let at_start = server.memory()?;

    eprintln!("baseline: {} s of the device alone", args.baseline_seconds);
    let baseline_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.baseline_seconds)).await;
    let baseline = (baseline_start, Instant::now());
    let after_baseline = server.memory()?;

    eprintln!(
        "flood: {} s from {} addresses at {}x every limit",
        args.seconds, args.attackers, args.multiplier
    );
    let flood_start = Instant::now();
    let flood_end = flood_start + Duration::from_secs(args.seconds);
    let tallies: Vec<Arc<Mutex<Tally>>> = Class::ALL
        .iter()
        .map(|_| Arc::new(Mutex::new(Tally::default())))
        .collect();
    let mut pacers = JoinSet::new();
    for attacker in &attackers {
        for (class, tally) in Class::ALL.iter().zip(&tallies) {
            let per_second =
                f64::from(class.limit(&limits).per_minute) * f64::from(args.multiplier) / 60.0;
            pacers.spawn(pace(
                *class,
                per_second,
                (flood_start, flood_end),
                attacker.clone(),
                payloads.clone(),
                tally.clone(),
            ));
        }
    }
    let mut progress = tokio::time::interval_at(
        flood_start + Duration::from_secs(10),
        Duration::from_secs(10),
    );
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(flood_end) => break,
            _ = progress.tick() => {
                let sent: u64 = tallies.iter().map(|t| lock(t).sent).sum();
                eprintln!("  {:>3} s: {sent} requests sent", flood_start.elapsed().as_secs());
            }
        }
    }
    let end_of_flood = server.memory()?;
    let flood = (flood_start, Instant::now());
    let _ = stop_tx.send(true);
    eprintln!("flood over; waiting for the answers still in flight");
    while let Some(joined) = pacers.join_next().await {
        joined?;
    }
    let samples = tokio::task::spawn_blocking(move || device.join())
        .await?
        .map_err(|_| anyhow!("the device's thread panicked"))??;

    let report = Report::new(
        &args,
        &limits,
        &addresses,
        Class::ALL
            .iter()
            .zip(&tallies)
            .map(|(class, tally)| (*class, lock(tally).clone()))
            .collect(),
        &samples,
        baseline,
        flood,
        [at_start, after_baseline, end_of_flood],
    );
    println!("{}", report.markdown());
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("encoding the results")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    let server_errors: u64 = report.classes.iter().map(|c| c.tally.server_errors).sum();
    let refused = report.device_failures.len();
    if server_errors > 0 || refused > 0 {
        bail!(
            "{server_errors} answers were 5xx and {refused} of the device's calls failed \
             (server log: {})",
            server.log().display()
        );
    }
    Ok(())
}

fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the attackers send that takes work to build: one enrollment
/// request (a real key pair and proof, a token that does not exist) and the
/// parts of a hello naming the device.
struct Payloads {
    enroll: Vec<u8>,
    hello: ClientHello,
}

impl Payloads {
    fn new(device: &Identity, fingerprint: &ServerFingerprint) -> anyhow::Result<Self> {
        let mut rng = rand::rng();
        let kem_suite = device.keys.kem.public.suite();
        let keys = DeviceKeys::generate(kem_suite, device.keys.signing.suite(), &mut rng)?;
        let request = enrollment::build_request(
            &EnrollmentToken::generate(&mut rng),
            "bench-flood",
            &keys,
            fingerprint,
        )?;
        let ephemeral = KemKeyPair::generate(kem_suite, &mut rng)?;
        Ok(Self {
            enroll: serde_json::to_vec(&request)?,
            hello: ClientHello {
                version: qflare_protocol::PROTOCOL_VERSION,
                device_id: device.device_id,
                kem_suite,
                ephemeral_public_key: ephemeral.public.as_bytes().to_vec(),
                client_nonce: [0; 32],
            },
        })
    }
}

/// One attacking address: a client whose connection is kept (HTTP/2, one
/// connection for all its requests) and one that opens a new connection
/// for every request. Neither checks the server's certificate: an attacker
/// has no reason to.
struct Attacker {
    base: String,
    pooled: reqwest::Client,
    fresh: reqwest::Client,
}

impl Attacker {
    /// Builds the clients and opens the kept connection, so that the flood
    /// of new connections cannot starve it later.
    async fn connect(base: &str, address: IpAddr) -> anyhow::Result<Self> {
        let builder = || {
            reqwest::Client::builder()
                .local_address(address)
                .tls_danger_accept_invalid_certs(true)
                .no_proxy()
                .timeout(ATTACK_TIMEOUT)
                .connect_timeout(ATTACK_TIMEOUT)
        };
        let attacker = Self {
            base: base.to_owned(),
            pooled: builder().build()?,
            fresh: builder().http1_only().pool_max_idle_per_host(0).build()?,
        };
        attacker
            .pooled
            .get(attacker.url(routes::HEALTHZ))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| {
                format!("a first request from {address} (is 127.0.0.0/8 loopback?)")
            })?;
        Ok(attacker)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The `n`th request of `class`.
    fn request(&self, class: Class, n: u64, payloads: &Payloads) -> reqwest::RequestBuilder {
        let json =
            |builder: reqwest::RequestBuilder| builder.header(CONTENT_TYPE, "application/json");
        match class {
            Class::Enroll => {
                json(self.pooled.post(self.url(routes::ENROLL))).body(payloads.enroll.clone())
            }
            Class::Sessions => {
                let mut hello = payloads.hello.clone();
                hello.client_nonce = rand::random();
                self.pooled.post(self.url(routes::SESSIONS)).json(&hello)
            }
            Class::Admin => match n % 4 {
                0 => self
                    .pooled
                    .get(self.url(routes::ADMIN_DEVICES))
                    .bearer_auth(WRONG_ADMIN_TOKEN),
                1 => self
                    .pooled
                    .get(self.url(routes::ADMIN_AUDIT))
                    .bearer_auth(WRONG_ADMIN_TOKEN),
                2 => json(self.pooled.post(self.url(routes::ADMIN_TOKENS)))
                    .bearer_auth(WRONG_ADMIN_TOKEN)
                    .body(r#"{"label":"flood"}"#),
                _ => self
                    .pooled
                    .get(self.url(routes::PAGE_DASHBOARD))
                    .basic_auth("admin", Some(WRONG_ADMIN_TOKEN)),
            },
            Class::Public => match n % 4 {
                0 => self.pooled.get(self.url(routes::HEALTHZ)),
                1 => self.pooled.get(self.url(routes::SERVER_INFO)),
                2 => self.pooled.get(self.url("/v1/no-such-route")),
                _ => self
                    .pooled
                    .post(self.url(routes::CURRENT_ROUND))
                    .header(SESSION_HEADER, hex::encode(rand::random::<[u8; 16]>()))
                    .header(CONTENT_TYPE, SEALED_CONTENT_TYPE)
                    .body(rand::random::<[u8; 64]>().to_vec()),
            },
            Class::Connections => self.fresh.get(self.url(routes::HEALTHZ)),
        }
    }
}

/// Sends `class` from one attacker at `per_second` during `window`, on a
/// fixed schedule (open loop), and waits for the answers still in flight.
async fn pace(
    class: Class,
    per_second: f64,
    window: (Instant, Instant),
    attacker: Arc<Attacker>,
    payloads: Arc<Payloads>,
    tally: Arc<Mutex<Tally>>,
) {
    let step = Duration::from_secs_f64(1.0 / per_second);
    // Addresses and classes out of step with each other, as real clients are.
    let first = window.0 + step.mul_f64(rand::random::<f64>());
    let mut in_flight = JoinSet::new();
    for n in 0u64.. {
        let due = first + step.mul_f64(n as f64);
        if due >= window.1 {
            break;
        }
        tokio::time::sleep_until(due).await;
        let request = attacker.request(class, n, &payloads);
        lock(&tally).sent += 1;
        let tally = tally.clone();
        in_flight.spawn(async move {
            let outcome = Outcome::of(request.send().await).await;
            lock(&tally).record(outcome);
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}

/// The device's thread: its own runtime, so that its latencies are the
/// server's and its own, not the attackers' queue.
fn device_thread(
    identity: Identity,
    interval: Duration,
    ready: oneshot::Sender<anyhow::Result<()>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<Sample>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the device's runtime")?;
    runtime.block_on(device(identity, interval, ready, stop))
}

async fn device(
    identity: Identity,
    interval: Duration,
    ready: oneshot::Sender<anyhow::Result<()>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<Sample>> {
    let setup = async {
        let transport = qflare_edge::transport_for(&identity)?;
        let mut session = qflare_edge::open_session(&identity, &transport).await?;
        child_server::wait_for_training(&mut session).await?;
        anyhow::Ok((transport, session))
    }
    .await;
    let (transport, mut session) = match setup {
        Ok(set_up) => {
            let _ = ready.send(Ok(()));
            set_up
        }
        Err(err) => {
            let _ = ready.send(Err(err));
            bail!("the device's set-up failed");
        }
    };
    eprintln!("device selected for the round; measuring");
    let mut samples = Vec::new();
    let mut next = Instant::now();
    for cycle in 0u64.. {
        if *stop.borrow() {
            break;
        }
        if cycle % HANDSHAKE_EVERY == 0 {
            let at = Instant::now();
            let opened = qflare_edge::open_session(&identity, &transport).await;
            let latency = at.elapsed();
            let failure = match opened {
                Ok(opened) => {
                    session = opened;
                    None
                }
                Err(err) => Some(err.to_string()),
            };
            samples.push(Sample::new(Call::Handshake, at, latency, failure));
        }
        let at = Instant::now();
        let polled = child_server::poll(&mut session).await;
        let latency = at.elapsed();
        samples.push(Sample::new(
            Call::Poll,
            at,
            latency,
            polled.err().map(|e| format!("{e:#}")),
        ));
        let at = Instant::now();
        let checked = healthz(&transport).await;
        let latency = at.elapsed();
        samples.push(Sample::new(
            Call::Healthz,
            at,
            latency,
            checked.err().map(|e| format!("{e:#}")),
        ));
        // The device's own pace: a slow answer delays the next call, it does
        // not make the device catch up with a burst.
        next = (next + interval).max(Instant::now());
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => {}
        }
    }
    Ok(samples)
}

async fn healthz(transport: &Transport) -> anyhow::Result<()> {
    transport
        .http
        .get(transport.url(routes::HEALTHZ))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    Ok(())
}
