//! `qflare`: run the server and administer it.
//!
//! Configuration is layered: defaults, then `config/global_config.yaml` (or
//! `--config`), then `QFLARE_*` environment variables (a `.env` file in the
//! working directory is read first), then flags.

mod admin;
mod bench;
mod demo;
mod fedavg;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use qflare_protocol::KemSuite;
use qflare_protocol::api::routes;
use qflare_server::api::{CreateTokenRequest, CreatedToken, DeviceView, Revoked, TokenView};
use qflare_server::identity::PublicKeyFile;
use qflare_server::{Config, ServerOptions};

use crate::admin::AdminClient;

/// QFLARE: quantum-safe federated learning.
#[derive(Debug, Parser)]
#[command(name = "qflare", version, about, long_about = None)]
struct Cli {
    /// Configuration file (default: config/global_config.yaml if present).
    #[arg(long, global = true, env = "QFLARE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// How admin commands reach the server.
#[derive(Debug, Args)]
struct Remote {
    /// The server's URL (default: https:// + the configured listen address).
    #[arg(long)]
    server: Option<String>,
    /// Pin this server fingerprint instead of the certificate in the local state directory.
    #[arg(long = "server-key")]
    server_key: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (HTTPS with post-quantum hybrid key exchange).
    Server {
        /// Listen address, e.g. 0.0.0.0:8443.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Database URL (sqlite://PATH or postgres://...).
        #[arg(long)]
        database: Option<String>,
        /// State directory holding keys and the certificate.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Enrolled devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// The audit ledger.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Benchmarks against a real server started in-process.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Run a whole federation on this machine: server, enclave, simulated devices.
    Demo(demo::DemoArgs),
    /// Federated training rounds.
    Round {
        #[command(subcommand)]
        command: RoundCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Run the enclave process (started by the server; not for humans).
    #[command(hide = true)]
    Enclave {
        /// The enclave's own arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum RoundCommand {
    /// Start (or resume) opening rounds.
    Start,
    /// Stop opening new rounds; an open round still finishes.
    Pause,
    /// Rounds, models and their test accuracy.
    Status,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a single-use token; printed once, alone on the last line.
    Create {
        /// Who or what the token is for.
        #[arg(long)]
        label: String,
        /// How long it stays valid (e.g. 30m, 24h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// List tokens (never their values).
    List,
    /// Revoke an unused token by id.
    Revoke {
        /// The token's id from `token list`.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// List enrolled devices.
    List,
    /// Revoke a device: its sessions end and its updates are refused.
    Revoke {
        /// The device id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
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
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute the hash chain and check the signed checkpoints.
    Verify,
}

fn init_tracing(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The enclave runs before any async runtime exists: its sandbox forbids
    // the system calls an idle runtime thread makes.
    if let Command::Enclave { args } = cli.command {
        return qflare_enclave::process::main_with_args(args);
    }
    // A missing .env is normal; a malformed one is worth saying.
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        eprintln!("warning: .env: {err}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main(cli))
}

async fn async_main(cli: Cli) -> ExitCode {
    // A benchmark would otherwise log every enrollment it performs, and the
    // logging would become part of what it measures.
    init_tracing(
        if matches!(cli.command, Command::Bench { .. } | Command::Demo(_)) {
            "warn"
        } else {
            "info"
        },
    );
    match run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_federation(view: &qflare_server::api::federation::FederationView) {
    println!(
        "training {}; enclave generation {}, measurement {}",
        if view.running { "running" } else { "paused" },
        view.enclave_generation,
        view.enclave_measurement.as_deref().unwrap_or("-")
    );
    println!(
        "{:>6} {:<12} {:>6} {:>9} {:>10}  outcome",
        "round", "state", "model", "selected", "submitted"
    );
    for round in &view.rounds {
        let outcome = round
            .outcome
            .as_ref()
            .map(|o| o.to_string())
            .unwrap_or_default();
        println!(
            "{:>6} {:<12} {:>6} {:>9} {:>10}  {}",
            round.id,
            round.state,
            round.base_model_version,
            round.selected,
            round.submitted,
            outcome
        );
    }
    println!(
        "{:>6} {:>6} {:>10} {:>8}",
        "model", "round", "accuracy", "loss"
    );
    for model in &view.models {
        println!(
            "{:>6} {:>6} {:>10} {:>8}",
            model.version,
            model.round_id,
            model
                .accuracy
                .map_or_else(|| "-".into(), |a| format!("{:.2}%", 100.0 * a)),
            model.loss.map_or_else(|| "-".into(), |l| format!("{l:.4}"))
        );
    }
}

fn server_url(config: &Config, remote: &Remote) -> String {
    remote.server.clone().unwrap_or_else(|| {
        let listen = config.server.listen;
        let host = if listen.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            listen.ip().to_string()
        };
        format!("https://{host}:{}", listen.port())
    })
}

async fn admin(config: &Config, remote: &Remote) -> anyhow::Result<AdminClient> {
    AdminClient::connect(
        &server_url(config, remote),
        remote.server_key.as_deref(),
        &config.server.state_dir,
        std::env::var("QFLARE_ADMIN_TOKEN").ok(),
    )
    .await
}

fn time(unix: i64) -> String {
    u64::try_from(unix)
        .ok()
        .map(|secs| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Server {
            listen,
            database,
            state_dir,
        } => {
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            if let Some(database) = database {
                config.server.database_url = Some(database);
            }
            if let Some(state_dir) = state_dir {
                config.server.state_dir = state_dir;
            }
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| format!("binding {}", config.server.listen))?;
            let metrics = match config.server.metrics_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding the metrics listener {addr}"))?,
                ),
                None => None,
            };
            let options = ServerOptions {
                admin_token: std::env::var("QFLARE_ADMIN_TOKEN").ok(),
                ..ServerOptions::default()
            };
            let state_dir = config.server.state_dir.clone();
            let server = qflare_server::Server::new(config, options).await?;
            println!("QFLARE server on https://{}", listener.local_addr()?);
            if let Some(metrics) = &metrics {
                println!("metrics on http://{}/metrics", metrics.local_addr()?);
            }
            if std::env::var("QFLARE_ADMIN_TOKEN").is_err() {
                println!("admin token: {}", state_dir.join("admin-token").display());
            }
            println!("server fingerprint (devices pin it with --server-key):");
            println!("{}", server.fingerprint());
            server
                .serve(listener, metrics, qflare_server::shutdown_signal())
                .await?;
        }
        Command::Token { command, remote } => {
            let client = admin(&config, &remote).await?;
            match command {
                TokenCommand::Create { label, ttl } => {
                    let created: CreatedToken = client
                        .post(
                            routes::ADMIN_TOKENS,
                            &CreateTokenRequest {
                                label,
                                ttl_secs: ttl.map(|d| d.as_secs().max(1)),
                            },
                        )
                        .await?;
                    println!(
                        "token {} for {:?}, valid until {}; it is shown only now:",
                        created.id,
                        created.label,
                        time(created.expires_at)
                    );
                    println!("{}", created.token);
                }
                TokenCommand::List => {
                    let tokens: Vec<TokenView> = client.get(routes::ADMIN_TOKENS).await?;
                    println!(
                        "{:<17} {:<8} {:<21} {:<33} label",
                        "id", "status", "expires", "used by"
                    );
                    for t in tokens {
                        println!(
                            "{:<17} {:<8} {:<21} {:<33} {}",
                            t.id,
                            t.status,
                            time(t.expires_at),
                            t.used_by.unwrap_or_else(|| "-".into()),
                            t.label
                        );
                    }
                }
                TokenCommand::Revoke { id } => {
                    let result: Revoked =
                        client.post(&routes::admin_token_revoke(&id), &()).await?;
                    println!(
                        "{}",
                        if result.revoked {
                            "revoked"
                        } else {
                            "not revoked (unknown, used or already revoked)"
                        }
                    );
                }
            }
        }
        Command::Device { command, remote } => {
            let client = admin(&config, &remote).await?;
            match command {
                DeviceCommand::List => {
                    let devices: Vec<DeviceView> = client.get(routes::ADMIN_DEVICES).await?;
                    println!(
                        "{:<33} {:<8} {:<18} {:<10} {:<21} name",
                        "id", "status", "kem", "signature", "last seen"
                    );
                    for d in devices {
                        println!(
                            "{:<33} {:<8} {:<18} {:<10} {:<21} {}",
                            d.id,
                            d.status,
                            d.kem_suite,
                            d.signature_suite,
                            d.last_seen_at.map_or_else(|| "-".into(), time),
                            d.name
                        );
                    }
                }
                DeviceCommand::Revoke { id } => {
                    let result: Revoked =
                        client.post(&routes::admin_device_revoke(&id), &()).await?;
                    println!(
                        "{}",
                        if result.revoked {
                            "revoked"
                        } else {
                            "not revoked (unknown or already revoked)"
                        }
                    );
                }
            }
        }
        Command::Bench { command } => match command {
            BenchCommand::Fedavg(args) => fedavg::run(args).await?,
            BenchCommand::Sessions {
                devices,
                seconds,
                warmup,
                rounds,
                kem,
                json,
            } => {
                bench::sessions(bench::SessionsOptions {
                    devices,
                    seconds,
                    warmup,
                    rounds,
                    kem,
                    json,
                })
                .await?;
            }
        },
        Command::Round { command, remote } => {
            let client = admin(&config, &remote).await?;
            let view: qflare_server::api::federation::FederationView = match command {
                RoundCommand::Start => client.post(routes::ADMIN_ROUNDS_START, &()).await?,
                RoundCommand::Pause => client.post(routes::ADMIN_ROUNDS_PAUSE, &()).await?,
                RoundCommand::Status => client.get(routes::ADMIN_ROUNDS).await?,
            };
            print_federation(&view);
        }
        Command::Demo(args) => demo::run(args).await?,
        Command::Enclave { .. } => {
            anyhow::bail!("the enclave subcommand runs before the async runtime starts")
        }
        Command::Audit {
            command: AuditCommand::Verify,
        } => {
            let store = qflare_store::open(&config.server.database_url()).await?;
            let key = PublicKeyFile::load(&config.server.state_dir)?;
            let report = qflare_server::ledger::verify(store.as_ref(), &key).await?;
            match report.first_bad {
                None => {
                    println!(
                        "audit ledger intact: {} entries, {} signed checkpoints verified",
                        report.entries, report.checkpoints
                    );
                }
                Some((seq, reason)) => {
                    println!("audit ledger BROKEN at entry {seq}: {reason}");
                    println!("({} entries verified before it)", report.entries);
                    return Ok(ExitCode::from(2));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
