//! `qflare`: run the server and administer it.
//!
//! Configuration is layered: defaults, then `config/global_config.yaml` (or
//! `--config`), then `QFLARE_*` environment variables (a `.env` file in the
//! working directory is read first), then flags.

mod admin;
mod bench;
mod commands;
mod demo;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qflare_server::Config;

use crate::commands::audit::AuditCommand;
use crate::commands::device::DeviceCommand;
use crate::commands::model::ModelCommand;
use crate::commands::round::RoundCommand;
use crate::commands::server::ServerArgs;
use crate::commands::token::TokenCommand;
use crate::commands::{Remote, admin};

/// The allocator of everything this binary runs (the server, the bench's
/// devices, `qflare enclave`). With glibc's, a server holding 10,000
/// devices' connections grew to 1.46 GiB over three rounds while what it
/// held live stayed near 600 MB: each round's uploads and downloads left
/// their freed pages behind in fragmented arenas. jemalloc returns them
/// (after one second, `.cargo/config.toml`), and peaked at 1.09 GiB.
/// No background threads: `qflare enclave` installs its system-call sandbox
/// after start-up, and purging on allocation needs nothing it forbids.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// What `qflare --help` says about exit statuses; scripts may rely on them.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (configuration, connection, refused by the server, ...)
  2  usage error (unknown command or flag, bad value)
  3  audit verify: the ledger's hash chain or a signed checkpoint does not verify

Data goes to stdout (tables, or JSON with --output json); progress and logs go
to stderr. Byte counts use binary units (KiB, MiB, GiB).";

/// QFLARE: quantum-safe federated learning.
#[derive(Debug, Parser)]
#[command(name = "qflare", version, about, long_about = None)]
#[command(after_help = EXIT_CODES)]
struct Cli {
    /// Configuration file (default: config/global_config.yaml if present).
    #[arg(long, global = true, env = "QFLARE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (HTTPS with post-quantum hybrid key exchange).
    Server(ServerArgs),
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
    /// The server's long-term key and certificate (offline).
    ServerKey {
        #[command(subcommand)]
        command: commands::server_key::ServerKeyCommand,
    },
    /// The audit ledger.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Benchmarks against a real server started in-process.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
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
    /// Enclave attestation: verify reports, certificates and hardware
    /// evidence offline.
    Attest {
        #[command(subcommand)]
        command: commands::attest::AttestCommand,
    },
    /// Central differential privacy, offline: ε for a plan, or the noise
    /// for a target ε (the accountant the server uses).
    Privacy {
        #[command(subcommand)]
        command: commands::privacy::PrivacyCommand,
    },
    /// The federation's model: register it from a file, export and verify it.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
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
    // `.env` before the command line: clap reads `QFLARE_CONFIG` (and every
    // other env-backed flag) while parsing, so a variable set only in `.env`
    // must already be in the environment by then. The enclave is the
    // exception: the server that spawns it decides its environment.
    if std::env::args_os()
        .nth(1)
        .is_none_or(|arg| arg != "enclave")
    {
        load_dotenv();
    }
    // Still before any thread: see `take_admin_token`.
    let _ = ADMIN_TOKEN.set(take_admin_token());
    let cli = Cli::parse();
    // The enclave runs before any async runtime exists: its sandbox forbids
    // the system calls an idle runtime thread makes.
    if let Command::Enclave { args } = cli.command {
        return qflare_enclave::process::main_with_args(args);
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

/// `QFLARE_ADMIN_TOKEN` as it was at start-up; see [`admin_token`].
static ADMIN_TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// The admin token from the environment (or `.env`), which `main` took out
/// of the process environment.
pub(crate) fn admin_token() -> Option<String> {
    ADMIN_TOKEN.get().cloned().flatten()
}

/// Reads `QFLARE_ADMIN_TOKEN` and removes it from the process environment,
/// so that no child process (the enclave's environment is an allow-list
/// anyway) and no library that reads or logs the environment later sees it.
/// The kernel's copy of the initial environment (`/proc/<pid>/environ`,
/// readable by the same user) is not changed by this; the token file in the
/// state directory avoids that copy altogether.
///
/// Edition 2024 makes `remove_var` unsafe because another thread could be
/// reading the environment at the same time; this runs at the top of
/// `main`, before the async runtime or any other thread exists.
#[allow(unsafe_code)]
fn take_admin_token() -> Option<String> {
    let token = std::env::var_os("QFLARE_ADMIN_TOKEN")?;
    // SAFETY: single-threaded here (see above), so nothing reads the
    // environment while it changes.
    unsafe { std::env::remove_var("QFLARE_ADMIN_TOKEN") };
    token.into_string().ok()
}

/// Reads `.env` from the working directory into the environment (variables
/// already set win). A missing file is normal; a malformed one is worth saying.
fn load_dotenv() {
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        eprintln!("warning: .env: {err}");
    }
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

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // An auditor checks evidence with no server configuration at all.
    if let Command::Attest { command } = &cli.command {
        commands::attest::run(command)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Privacy { command } = &cli.command {
        commands::privacy::run(command)?;
        return Ok(ExitCode::SUCCESS);
    }
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Server(args) => commands::server::run(config, args).await?,
        Command::Token { command, remote } => {
            commands::token::run(&admin(&config, &remote).await?, command).await?;
        }
        Command::Device { command, remote } => {
            commands::device::run(&admin(&config, &remote).await?, command).await?;
        }
        Command::Round { command, remote } => {
            commands::round::run(&admin(&config, &remote).await?, command).await?;
        }
        Command::Model {
            command: ModelCommand::Verify(args),
            ..
        } => commands::model::verify(&args)?,
        Command::Model { command, remote } => {
            commands::model::run_remote(&admin(&config, &remote).await?, command).await?;
        }
        Command::ServerKey { command } => commands::server_key::run(&config, command)?,
        Command::Attest { command } => commands::attest::run(&command)?,
        Command::Privacy { command } => commands::privacy::run(&command)?,
        Command::Audit { command } => return commands::audit::run(&config, command).await,
        Command::Bench { command } => bench::run(command).await?,
        Command::Demo(args) => demo::run(args).await?,
        Command::Enclave { .. } => {
            anyhow::bail!("the enclave subcommand runs before the async runtime starts")
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::output::OutputFormat;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("qflare").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exit_codes_are_distinct_and_documented() {
        use crate::commands::audit::EXIT_AUDIT_BROKEN;
        let usage = Cli::try_parse_from(["qflare", "no-such-command"]).unwrap_err();
        assert_eq!(usage.exit_code(), 2, "clap's usage errors");
        assert!(![0, 1, 2].contains(&EXIT_AUDIT_BROKEN));
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:"), "{help}");
        assert!(
            help.contains(&format!("{EXIT_AUDIT_BROKEN}  audit verify")),
            "{help}"
        );
    }

    #[test]
    fn server_flags() {
        let cli = parse(&[
            "--config",
            "q.yaml",
            "server",
            "--listen",
            "0.0.0.0:8443",
            "--database",
            "sqlite://x.db",
            "--state-dir",
            "state",
        ]);
        assert_eq!(cli.config, Some(PathBuf::from("q.yaml")));
        let Command::Server(args) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(args.listen, Some("0.0.0.0:8443".parse().unwrap()));
        assert_eq!(args.database.as_deref(), Some("sqlite://x.db"));
        assert_eq!(args.state_dir, Some(PathBuf::from("state")));
    }

    #[test]
    fn listing_commands_take_output_and_remote_flags() {
        // The remote flags belong to the noun, the output flag to the listing.
        let cli = parse(&[
            "token",
            "--server",
            "https://h:1",
            "--server-key",
            "ab",
            "list",
            "--output",
            "json",
        ]);
        let Command::Token {
            command: TokenCommand::List(output),
            remote,
        } = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(output.output, OutputFormat::Json);
        assert_eq!(remote.server.as_deref(), Some("https://h:1"));
        assert_eq!(remote.server_key.as_deref(), Some("ab"));
        let cli = parse(&["device", "list"]);
        assert!(matches!(
            cli.command,
            Command::Device { command: DeviceCommand::List(o), .. } if o.output == OutputFormat::Table
        ));
        let cli = parse(&["round", "status", "--output", "table"]);
        assert!(matches!(
            cli.command,
            Command::Round { command: RoundCommand::Status(o), .. } if o.output == OutputFormat::Table
        ));
        let cli = parse(&["round", "start", "--output", "json"]);
        assert!(matches!(
            cli.command,
            Command::Round { command: RoundCommand::Start(o), .. } if o.output == OutputFormat::Json
        ));
        let cli = parse(&["round", "pause"]);
        assert!(matches!(
            cli.command,
            Command::Round { command: RoundCommand::Pause(o), .. } if o.output == OutputFormat::Table
        ));
        assert!(Cli::try_parse_from(["qflare", "token", "list", "--output", "yaml"]).is_err());
    }

    #[test]
    fn token_and_audit_flags() {
        let cli = parse(&["token", "create", "--label", "lab", "--ttl", "7d"]);
        let Command::Token {
            command: TokenCommand::Create { label, ttl },
            ..
        } = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(label, "lab");
        assert_eq!(ttl, Some(std::time::Duration::from_secs(7 * 24 * 3600)));
        assert!(matches!(
            parse(&["token", "revoke", "abc"]).command,
            Command::Token { command: TokenCommand::Revoke { id }, .. } if id == "abc"
        ));
        assert!(matches!(
            parse(&["audit", "verify"]).command,
            Command::Audit {
                command: AuditCommand::Verify
            }
        ));
    }

    #[test]
    fn demo_and_bench_flags() {
        let cli = parse(&["demo", "--data", "mnist", "--devices", "4", "--rounds", "2"]);
        let Command::Demo(args) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(args.data, Some(PathBuf::from("mnist")));
        assert_eq!((args.devices, args.rounds), (4, 2));
        assert!(Cli::try_parse_from(["qflare", "demo", "--data-dir", "x"]).is_err());
        let cli = parse(&[
            "bench",
            "sessions",
            "--devices",
            "8",
            "--seconds",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--json",
            "out.json",
        ]);
        assert!(matches!(
            cli.command,
            Command::Bench {
                command: bench::BenchCommand::Sessions {
                    devices: 8,
                    seconds: 1,
                    warmup: 0,
                    rounds: 1,
                    ..
                }
            }
        ));
        let cli = parse(&[
            "bench",
            "fedavg",
            "--setup",
            "cnn-iid",
            "--data",
            "mnist",
            "--max-rounds",
            "5",
        ]);
        assert!(matches!(
            cli.command,
            Command::Bench {
                command: bench::BenchCommand::Fedavg(args)
            } if args.max_rounds == 5 && args.data == Some(PathBuf::from("mnist"))
        ));
        let cli = parse(&["bench", "flood", "--seconds", "5", "--attackers", "2"]);
        assert!(matches!(
            cli.command,
            Command::Bench {
                command: bench::BenchCommand::Flood(args)
            } if (args.seconds, args.attackers, args.multiplier) == (5, 2, 10)
        ));
    }
}
