//! The server under test: the real [`Server`], on a runtime of its own, and
//! the counters read back from its Prometheus registry.

use anyhow::{Context, bail};
use qflare_edge::transport::Transport;
use qflare_protocol::crypto::sha256;
use qflare_protocol::identity::ServerFingerprint;
use qflare_server::{Config, Server, ServerOptions, SharedState};
use serde::Serialize;
use tokio::sync::oneshot;

/// The in-process server, on a runtime of its own.
pub(super) struct BenchServer {
    pub(super) url: String,
    pub(super) fingerprint: ServerFingerprint,
    pub(super) certificate_sha256: [u8; 32],
    pub(super) state: SharedState,
    pub(super) stop: Option<oneshot::Sender<()>>,
    pub(super) serving: Option<tokio::task::JoinHandle<Result<(), qflare_server::ServerError>>>,
    pub(super) runtime: Option<tokio::runtime::Runtime>,
}

impl BenchServer {
    pub(super) async fn start(config: Config) -> anyhow::Result<Self> {
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

    pub(super) fn transport(&self) -> anyhow::Result<Transport> {
        Ok(Transport::pinned(
            &self.url,
            self.certificate_sha256,
            qflare_edge::client::DEFAULT_TIMEOUT,
        )?)
    }

    /// Graceful shutdown, as `qflare server` does on SIGTERM.
    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
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
pub(super) struct GroupCount {
    pub(super) group: String,
    pub(super) handshakes: u64,
}

/// Counters read from the server's own Prometheus registry.
#[derive(Debug, Default, Serialize)]
pub(super) struct ServerCounters {
    /// TLS handshakes by negotiated key-exchange group.
    pub(super) tls_handshakes: Vec<GroupCount>,
    /// Requests the rate limiter refused (must stay 0).
    pub(super) rate_limited: u64,
}

pub(super) fn read_counters(state: &SharedState) -> ServerCounters {
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
