//! The host's handle on the enclave process (feature `host`).
//!
//! [`EnclaveClient`] spawns `qflare-enclave`, attests it with a fresh nonce
//! against an [`AttestationPolicy`], and forwards frames one at a time. If the
//! process dies or stops answering, the call fails with
//! [`EnclaveError::Died`], the process is killed and a new one is started and
//! attested on the next call. A new process has new keys: its
//! [`EnclaveClient::generation`] changes, which tells the round controller
//! that envelopes sealed to the old keys cannot be opened and the round must
//! be retried.
//!
//! Each exchange runs in its own task that holds the lock from writing the
//! request to reading the answer, so a caller that gives up midway (an HTTP
//! timeout, a client gone) cannot leave the stream one answer behind.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use qflare_protocol::attestation::{self, AttestationPolicy, AttestationReport, VerifiedEnclave};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Mutex;

use crate::frame::{ErrorMeta, Frame, FrameError, HEADER_LEN, Kind, parse_header};
use crate::messages::{AttestRequest, Hardening, ReportAnswer};

/// How to start the enclave.
#[derive(Debug, Clone)]
pub struct EnclaveCommand {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// Why a call to the enclave failed.
#[derive(Debug, thiserror::Error)]
pub enum EnclaveError {
    /// The process could not be started.
    #[error("cannot start the enclave: {0}")]
    Spawn(std::io::Error),
    /// The process died or stopped answering; it will be restarted.
    #[error("the enclave process died ({0}); it is being restarted")]
    Died(String),
    /// The enclave's report did not satisfy the policy.
    #[error("attestation failed: {0}")]
    Attestation(qflare_protocol::ProtocolError),
    /// The enclave refused the request.
    #[error("the enclave refused: {code}: {message}")]
    Refused {
        /// Its error code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The enclave answered with the wrong kind of frame.
    #[error("unexpected answer {0:?}")]
    Unexpected(Kind),
    /// A frame could not be encoded or decoded.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    info: EnclaveInfo,
}

/// The current enclave, as the host knows it.
#[derive(Debug, Clone)]
pub struct EnclaveInfo {
    /// The report the host verified at start-up.
    pub report: AttestationReport,
    /// The keys it vouches for.
    pub verified: VerifiedEnclave,
    /// The process's self-reported hardening.
    pub hardening: Hardening,
    /// Increments on every (re)start.
    pub generation: u64,
    /// The process id.
    pub pid: Option<u32>,
}

/// Everything needed to start a process, shared with exchange tasks.
#[derive(Debug)]
struct Launcher {
    command: EnclaveCommand,
    policy: AttestationPolicy,
    timeout: Duration,
    generations: AtomicU64,
}

/// A supervised enclave process.
pub struct EnclaveClient {
    launcher: Arc<Launcher>,
    running: Arc<Mutex<Option<Running>>>,
}

impl std::fmt::Debug for EnclaveClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnclaveClient")
            .field("command", &self.launcher.command)
            .field(
                "generation",
                &self.launcher.generations.load(Ordering::SeqCst),
            )
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn write_frame(stdin: &mut ChildStdin, frame: &Frame) -> Result<(), EnclaveError> {
    let died = |e: std::io::Error| EnclaveError::Died(format!("writing: {e}"));
    // In pieces: a model-sized blob goes to the pipe without a copy.
    let (head, blobs) = frame.encode_parts()?;
    stdin.write_all(&head).await.map_err(died)?;
    for (len, blob) in blobs {
        stdin.write_all(&len).await.map_err(died)?;
        stdin.write_all(blob).await.map_err(died)?;
    }
    stdin
        .flush()
        .await
        .map_err(|e| EnclaveError::Died(format!("writing: {e}")))
}

async fn read_frame(stdout: &mut BufReader<ChildStdout>) -> Result<Frame, EnclaveError> {
    let mut header = [0u8; HEADER_LEN];
    stdout
        .read_exact(&mut header)
        .await
        .map_err(|e| EnclaveError::Died(format!("reading: {e}")))?;
    let (kind, len) = parse_header(&header)?;
    let mut body = vec![0u8; len];
    stdout
        .read_exact(&mut body)
        .await
        .map_err(|e| EnclaveError::Died(format!("reading: {e}")))?;
    Ok(Frame::decode_body(kind?, &body)?)
}

fn expect(frame: Frame, kind: Kind) -> Result<Frame, EnclaveError> {
    if frame.kind == Kind::Error {
        let meta: ErrorMeta = frame.meta()?;
        return Err(EnclaveError::Refused {
            code: meta.code,
            message: meta.message,
        });
    }
    if frame.kind == kind {
        Ok(frame)
    } else {
        Err(EnclaveError::Unexpected(frame.kind))
    }
}

/// The only environment variables the enclave inherits: its log filter and
/// backtraces. Everything else the host holds (the admin token, a database
/// URL with its password, cloud credentials) stays out of it; what the
/// enclave needs comes as arguments, which its report signs.
pub const INHERITED_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE", "RUST_LIB_BACKTRACE"];

impl Launcher {
    async fn spawn(&self) -> Result<Running, EnclaveError> {
        let inherited = INHERITED_ENV
            .iter()
            .filter_map(|name| std::env::var_os(name).map(|value| (*name, value)));
        let mut child = Command::new(&self.command.program)
            .args(&self.command.args)
            .env_clear()
            .envs(inherited)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(EnclaveError::Spawn)?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(EnclaveError::Died("no pipes to the enclave".into()));
        };
        let mut stdout = BufReader::with_capacity(1 << 20, stdout);
        let mut nonce = [0u8; 32];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
        let attest = async {
            write_frame(
                &mut stdin,
                &Frame::new(Kind::Attest, &AttestRequest { nonce }, Vec::new()),
            )
            .await?;
            read_frame(&mut stdout).await
        };
        let answer = tokio::time::timeout(self.timeout, attest)
            .await
            .map_err(|_| EnclaveError::Died("no attestation report in time".into()))??;
        let answer: ReportAnswer = expect(answer, Kind::Report)?.meta()?;
        let verified =
            attestation::verify_report(&answer.report, &self.policy, Some(&nonce), unix_now())
                .map_err(EnclaveError::Attestation)?;
        let generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        if !verified
            .runtime
            .as_ref()
            .is_some_and(attestation::EnclaveRuntime::sandboxed)
        {
            tracing::warn!(
                generation,
                runtime = ?verified.runtime,
                "the enclave's sandbox is off: devices refuse its reports unless they allow \
                 unsandboxed enclaves"
            );
        }
        tracing::info!(
            generation,
            pid = child.id(),
            measurement = %hex::encode(verified.measurement),
            hardening = ?answer.hardening,
            "enclave started and attested"
        );
        let info = EnclaveInfo {
            report: answer.report,
            verified,
            hardening: answer.hardening,
            generation,
            pid: child.id(),
        };
        Ok(Running {
            child,
            stdin,
            stdout,
            info,
        })
    }

    /// One request and its answer on the locked process, restarting it first
    /// if it is gone and killing it if the exchange fails.
    async fn exchange(
        &self,
        slot: &mut Option<Running>,
        frame: &Frame,
    ) -> Result<Frame, EnclaveError> {
        if slot.is_none() {
            *slot = Some(self.spawn().await?);
        }
        let Some(running) = slot.as_mut() else {
            return Err(EnclaveError::Died("no enclave".into()));
        };
        let round_trip = async {
            write_frame(&mut running.stdin, frame).await?;
            read_frame(&mut running.stdout).await
        };
        let outcome = match tokio::time::timeout(self.timeout, round_trip).await {
            Ok(outcome) => outcome,
            Err(_) => Err(EnclaveError::Died(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        };
        match outcome {
            Ok(answer) if answer.kind == Kind::Error => {
                let meta: ErrorMeta = answer.meta()?;
                Err(EnclaveError::Refused {
                    code: meta.code,
                    message: meta.message,
                })
            }
            Ok(answer) => Ok(answer),
            Err(err) => {
                if let Some(mut dead) = slot.take() {
                    let _ = dead.child.start_kill();
                    let status = dead.child.wait().await;
                    tracing::error!(generation = dead.info.generation, ?status, %err, "enclave lost; restarting on next use");
                }
                Err(match err {
                    EnclaveError::Died(reason) => EnclaveError::Died(reason),
                    other => EnclaveError::Died(other.to_string()),
                })
            }
        }
    }
}

impl EnclaveClient {
    /// Starts and attests the enclave. `timeout` bounds every request.
    pub async fn start(
        command: EnclaveCommand,
        policy: AttestationPolicy,
        timeout: Duration,
    ) -> Result<Self, EnclaveError> {
        let launcher = Arc::new(Launcher {
            command,
            policy,
            timeout,
            generations: AtomicU64::new(0),
        });
        let first = launcher.spawn().await?;
        Ok(Self {
            launcher,
            running: Arc::new(Mutex::new(Some(first))),
        })
    }

    /// Sends one request and returns the answer. On a dead or silent process
    /// the process is killed and [`EnclaveError::Died`] returned; the next
    /// call starts and attests a new one.
    ///
    /// The frame is taken by value: it moves into the task that outlives a
    /// cancelled caller, and a copy of every sealed update waiting for the
    /// enclave doubled what a busy round held (at 1,000 devices, 80 MB).
    pub async fn call(&self, frame: Frame) -> Result<Frame, EnclaveError> {
        let launcher = Arc::clone(&self.launcher);
        let running = Arc::clone(&self.running);
        tokio::spawn(async move {
            let mut slot = running.lock_owned().await;
            launcher.exchange(&mut slot, &frame).await
        })
        .await
        .map_err(|e| EnclaveError::Died(format!("the exchange task failed: {e}")))?
    }

    /// Sends a request and checks the answer's kind.
    pub async fn call_expecting(&self, frame: Frame, kind: Kind) -> Result<Frame, EnclaveError> {
        expect(self.call(frame).await?, kind)
    }

    /// Starts the enclave if it is not running (after a death) and returns its state.
    pub async fn ensure_running(&self) -> Result<EnclaveInfo, EnclaveError> {
        let mut slot = self.running.lock().await;
        if slot.is_none() {
            *slot = Some(self.launcher.spawn().await?);
        }
        slot.as_ref()
            .map(|running| running.info.clone())
            .ok_or_else(|| EnclaveError::Died("no enclave".into()))
    }

    /// The current process's state, if one is running.
    pub async fn info(&self) -> Option<EnclaveInfo> {
        self.running
            .lock()
            .await
            .as_ref()
            .map(|running| running.info.clone())
    }

    /// The generation of the latest process (0 before the first).
    pub fn generation(&self) -> u64 {
        self.launcher.generations.load(Ordering::SeqCst)
    }

    /// A fresh report for a verifier's own nonce (a device's, say).
    pub async fn attest(&self, nonce: [u8; 32]) -> Result<AttestationReport, EnclaveError> {
        let answer = self
            .call_expecting(
                Frame::new(Kind::Attest, &AttestRequest { nonce }, Vec::new()),
                Kind::Report,
            )
            .await?;
        let answer: ReportAnswer = answer.meta()?;
        Ok(answer.report)
    }

    /// Stops the process (it also stops when the client is dropped).
    pub async fn shutdown(&self) {
        if let Some(mut running) = self.running.lock().await.take() {
            drop(running.stdin);
            if tokio::time::timeout(Duration::from_secs(5), running.child.wait())
                .await
                .is_err()
            {
                let _ = running.child.start_kill();
            }
        }
    }
}
