//! The Tokio runtime the device's code runs on, its logging, and running a
//! future from Python with the GIL released and Ctrl-C honoured.

use std::sync::OnceLock;
use std::time::Duration;

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;

use crate::errors::QflareError;

pub(crate) fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| QflareError::new_err(format!("starting the runtime: {e}")))
}

/// Logs to stderr, filtered by `RUST_LOG` (default: the device's progress).
pub(crate) fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("qflare_edge=info"));
        // Another library may own the global subscriber already; then it logs.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init();
    });
}

/// Runs `work` on the runtime with the GIL released, checking for signals
/// every 100 ms: Ctrl-C drops `work` and raises `KeyboardInterrupt`.
pub(crate) fn block_on_interruptible<T: Send + 'static>(
    py: Python<'_>,
    work: impl Future<Output = T> + Send + 'static,
) -> PyResult<T> {
    let handle = runtime()?.spawn(work);
    let abort = handle.abort_handle();
    let (tx, rx) = std::sync::mpsc::channel();
    runtime()?.spawn(async move {
        let _ = tx.send(handle.await);
    });
    let mut rx = rx;
    loop {
        // The receiver is `Send`, not `Sync`: it moves into the GIL-free
        // closure and back out each time.
        let (received, back) = py.detach(move || {
            let received = rx.recv_timeout(Duration::from_millis(100));
            (received, rx)
        });
        rx = back;
        match received {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(join)) => {
                return Err(QflareError::new_err(format!(
                    "the device loop failed: {join}"
                )));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(signal) = py.check_signals() {
                    abort.abort();
                    return Err(signal);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PyKeyboardInterrupt::new_err(
                    "the device loop was cancelled",
                ));
            }
        }
    }
}
