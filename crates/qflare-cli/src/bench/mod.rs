//! `qflare bench`: benchmarks, one module per family:
//! [`attacks`] (the attack table) and [`privacy`] (DP-FedAvg's accuracy
//! cost), both real training and enclave rounds in process without the
//! transport,
//! [`fedavg`] (the FedAvg paper's experiments over the whole stack) and
//! [`sessions`] (handshakes and enrollments per second) in-process, and
//! [`uploads`] (the server's memory under an upload flood), [`flood`]
//! (every rate limit at ten times its rate) and [`overhead`] (the
//! framework's cost per round, N devices, no training) against a server
//! process, which [`child_server`] starts and watches.
//! Results go to stdout, progress to stderr.

pub mod attacks;
mod child_server;
pub mod fedavg;
pub mod flood;
pub mod overhead;
pub mod privacy;
pub mod sessions;
pub mod uploads;

use std::path::PathBuf;

use clap::Subcommand;
use qflare_protocol::KemSuite;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The attack table: final accuracy and honest updates rejected, per
    /// attack and aggregation.
    ///
    /// MNIST 2NN (E = 1, B = 10), --devices devices of which --malicious
    /// (the share) are attackers, --per-round selected uniformly at random
    /// each round, --rounds rounds per cell; IID and Dirichlet(0.5) splits.
    /// Rows: no attack, sign flip, scaling ×10, Gaussian noise, label flip,
    /// ALIE, IPM (ε = 0.5 and 100), min-max, min-sum, Fang. Columns: the
    /// aggregations named by --columns. Devices train for real and every
    /// round is the enclave's own `RoundAggregator`; the transport
    /// (sessions, sealing, the process boundary) is left out, since it
    /// changes no weight. Prints one markdown table per split on stdout,
    /// progress on stderr.
    #[command(verbatim_doc_comment)]
    Attacks(attacks::AttacksArgs),
    /// What central differential privacy costs in accuracy.
    ///
    /// For each --epsilons target, calibrates the noise multiplier with the
    /// server's accountant (Poisson sampling at --sampling-rate, --rounds
    /// rounds, --delta) and trains the MNIST 2NN with DP-FedAvg through the
    /// enclave's own round (clip to --clip-norm, weight 1, noise, fixed
    /// denominator); a first row without DP. Prints a markdown table.
    #[command(verbatim_doc_comment)]
    Privacy(privacy::PrivacyArgs),
    /// The FedAvg paper's MNIST experiments with every security layer on.
    ///
    /// 100 devices, C = 0.1; 2NN E=1 B=10 to 97% (paper: 87 rounds IID, 664
    /// non-IID), CNN E=5 B=10 to 99% (paper: 20 rounds IID). Reports rounds to
    /// target, wall time, and the share of time spent in cryptography and in
    /// the enclave.
    Fedavg(fedavg::FedavgArgs),
    /// Sessions and enrollments per second, next to plain HTTPS requests.
    ///
    /// Starts a real server in-process on 127.0.0.1:0 (TLS 1.3 with
    /// X25519MLKEM768, SQLite in a temporary directory, built-in defaults
    /// rather than --config) and measures over real HTTPS on loopback, each
    /// with --devices concurrent workers:
    ///
    ///   healthz      GET /healthz, one pinned client per worker, the
    ///                connection kept alive by the pool as in normal use;
    ///   sessions     a full handshake (POST /v1/sessions, then /confirm) by
    ///                one of --devices devices enrolled beforehand, each on
    ///                its own kept-alive connection;
    ///   enrollments  discovery (server info + fingerprint check), key
    ///                generation and POST /v1/enroll, with tokens created
    ///                through the admin API before the clock starts.
    ///
    /// After a --warmup of each, it runs --rounds rounds of healthz, sessions,
    /// enrollments for --seconds each, and reports the median rate of the
    /// rounds and the median of the per-round ratios sessions/healthz and
    /// enrollments/healthz: what the post-quantum application layer costs on
    /// top of the same TLS. Every rate-limit class is raised far above what
    /// loopback reaches (the check still runs), so the numbers measure crypto
    /// and I/O, not the limiter. Client and server share the machine's CPUs;
    /// "CPU ms/op" is the whole process's CPU time per operation, which is
    /// less sensitive than the rates to other load on the machine.
    ///
    /// Prints a markdown table on stdout (progress on stderr). Exits with an
    /// error if any operation failed or the limiter refused anything.
    #[command(verbatim_doc_comment)]
    Sessions {
        /// Concurrent workers in every phase (health checkers, enrolled devices, enrolling devices).
        #[arg(long, default_value_t = 64)]
        devices: usize,
        /// Measured seconds per operation and round.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Warm-up seconds per operation, before the first round.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// Rounds of healthz, sessions, enrollments.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The devices' KEM suite, e.g. x25519-ml-kem-768 (default: the server's, ml-kem-768).
        #[arg(long)]
        kem: Option<KemSuite>,
        /// Also write the results as JSON to PATH.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// The server's peak memory while one device sends many uploads at once.
    ///
    /// Starts `--server-bin` (default: this executable) as a child process
    /// with its enclave, enrolls one device, waits until it is selected, then
    /// sends --uploads update bodies as large as the update limit at once,
    /// each on its own session, and reports the answers and the server's
    /// peak RSS (VmHWM) before and during the flood. Linux only.
    Uploads(uploads::UploadsArgs),
    /// Every rate-limited route at ten times its limit while a device works.
    ///
    /// Starts `--server-bin` (default: this executable) as a child process
    /// with its default rate limits, enrolls one device from 127.0.0.1 and
    /// waits until it is selected for a round. The device then polls the
    /// round and the health check every --poll-interval-ms and opens a new
    /// session every eighth time: for --baseline-seconds alone, then for
    /// --seconds while each of --attackers addresses (127.0.0.2 on) sends
    /// every rate-limited class --multiplier times its per-minute limit,
    /// paced open-loop:
    ///
    ///   enroll       enrollment requests with a token that does not exist;
    ///   sessions     valid hellos naming the device;
    ///   admin        the admin API and the dashboard with a wrong token;
    ///   public       health, server info, an unknown path, a sealed route
    ///                with an unknown session;
    ///   connections  a health check on a new TLS connection each time.
    ///
    /// Reports what each class was answered (2xx, 429, other 4xx, 5xx, no
    /// answer), the device's p50 and p99 latencies before and during the
    /// flood and their ratio, and the server's RSS (VmHWM and VmRSS) at the
    /// start, after the baseline and at the end of the flood. Prints
    /// markdown on stdout (progress on stderr). Exits with an error if the
    /// server answered 5xx or the device had any call refused or failed.
    /// Linux only.
    #[command(verbatim_doc_comment)]
    Flood(flood::FloodArgs),
    /// What the framework costs per round, with training taken out.
    ///
    /// Starts `--server-bin` (default: this executable) as a child process
    /// with its enclave, enrolls --devices devices (each its own keys, pinned
    /// TLS client and session) and runs --rounds rounds in which every
    /// device is selected, runs the real device loop (attestation check,
    /// model download and certificate check, signing, sealing to the
    /// enclave), and returns a small deterministic delta instead of
    /// training; the enclave's defense and FedAvg run as configured by
    /// default. Reports the time to enroll, round 1, the median and range of
    /// rounds 2..R (from the first device told to train in one round to the
    /// first told to train in the next), CPU-seconds per round of the
    /// server, the enclave and the devices, the peak RSS of each, and bytes
    /// per round on loopback and as model downloads and sealed updates.
    /// Prints markdown on stdout (progress on stderr). Linux only.
    #[command(verbatim_doc_comment)]
    Overhead(overhead::OverheadArgs),
}

/// Runs one benchmark.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Attacks(args) => attacks::run(args).await,
        BenchCommand::Privacy(args) => privacy::run(args).await,
        BenchCommand::Fedavg(args) => fedavg::run(args).await,
        BenchCommand::Uploads(args) => uploads::run(args).await,
        BenchCommand::Flood(args) => flood::run(args).await,
        BenchCommand::Overhead(args) => overhead::run(args).await,
        BenchCommand::Sessions {
            devices,
            seconds,
            warmup,
            rounds,
            kem,
            json,
        } => {
            sessions::sessions(sessions::SessionsOptions {
                devices,
                seconds,
                warmup,
                rounds,
                kem,
                json,
            })
            .await
        }
    }
}
