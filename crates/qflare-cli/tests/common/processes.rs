//! Real processes for the CLI's kill -9 tests (`restart.rs`, `replicas.rs`):
//! `qflare` and `qflare-edge` children whose output is collected line by
//! line, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const QFLARE: &str = env!("CARGO_BIN_EXE_qflare");

/// Generous: the machine running the tests may be busy.
pub const PATIENCE: Duration = Duration::from_secs(240);

/// The device binary, built beside `qflare` by a workspace build; `None`
/// (skip) when absent outside CI.
pub fn edge_binary() -> Option<PathBuf> {
    let path = Path::new(QFLARE).with_file_name("qflare-edge");
    if path.exists() {
        return Some(path);
    }
    if std::env::var("QFLARE_REQUIRE_DATA").is_ok_and(|v| v == "1") {
        panic!(
            "{} is missing: build it with `cargo build --release -p qflare-edge`",
            path.display()
        );
    }
    None
}

pub fn qflare(workdir: &Path, config: &Path) -> Command {
    let mut command = Command::new(QFLARE);
    command
        .env_clear()
        .env("RUST_LOG", "warn")
        .current_dir(workdir)
        .arg("--config")
        .arg(config);
    command
}

pub fn succeeded(output: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

pub fn admin(workdir: &Path, config: &Path, args: &[&str]) -> String {
    succeeded(
        qflare(workdir, config).args(args).output().unwrap(),
        &args.join(" "),
    )
}

/// A child process killed (SIGKILL) when dropped, with its output lines
/// forwarded to a channel and collected.
pub struct Process {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    log: PathBuf,
}

impl Process {
    pub fn spawn(mut command: Command, log: PathBuf) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            log,
        }
    }

    pub fn log(&self) -> String {
        let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("stdout:\n{}\nstderr:\n{stderr}", self.seen.join("\n"))
    }

    /// Waits for a line satisfying `wanted`, and returns the line after it
    /// when `next` is set.
    pub fn wait_for_line(&mut self, wanted: impl Fn(&str) -> bool, next: bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut found = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if found {
                        return line;
                    }
                    if wanted(&line) {
                        if !next {
                            return line;
                        }
                        found = true;
                    }
                }
                Err(_) => panic!("the expected line never came; {}", self.log()),
            }
        }
    }

    /// Waits for the exit, collecting the rest of the output.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader thread drains what was left in the pipe.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {PATIENCE:?}; {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = self.wait();
        assert_eq!(status.code(), Some(0), "{}", self.log());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `qflare server`; returns it with the fingerprint it printed
/// (printed once the listener is bound).
pub fn start_server(workdir: &Path, config: &Path, log: &str) -> (Process, String) {
    let mut command = qflare(workdir, config);
    command.env("RUST_LOG", "info").arg("server");
    let mut server = Process::spawn(command, workdir.join(log));
    let fingerprint = server.wait_for_line(|l| l.starts_with("server fingerprint"), true);
    (server, fingerprint.trim().to_owned())
}

/// Training runs of round 1 that reached their end ("round 1: training N/N examples").
pub fn trainings(output: &str) -> usize {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("round 1: training "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|progress| {
            progress
                .split_once('/')
                .is_some_and(|(done, total)| done == total)
        })
        .count()
}
