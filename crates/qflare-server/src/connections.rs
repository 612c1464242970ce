//! What a connection may cost before it carries a single request: how many
//! the server holds at once, in all and per client address, how fast one
//! address may open new ones, and how long one may sit idle.
//!
//! * [`ConnectionLimiter`] counts open connections per client address (an
//!   IPv6 /64, as the rate limits key them) and in all. A connection over
//!   either cap is closed on accept, before the TLS handshake, which is the
//!   expensive part (a hybrid ML-KEM key exchange and an ECDSA signature).
//!   The count is per process: each replica guards its own sockets and file
//!   descriptors, which are per process too.
//! * [`IdleIo`] closes a connection that moves no byte in either direction
//!   for the idle timeout. hyper bounds the wait for HTTP/1.1 request headers
//!   but has no idle timeout for HTTP/2, and an idle timer on reads alone
//!   (`tokio-io-timeout`'s) would also cut a large model download, during
//!   which the client sends nothing: here a write that makes progress counts
//!   as activity as much as a read does. It is a thin wrapper kept here
//!   because no maintained crate measures idleness over both directions.
//!
//! The per-address rate of new connections is a rate limit like the others
//! (`rate_limits.connections`, class `connections`), checked by the accept
//! loop in `lib.rs` with the shared limiter.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Why a connection was closed on accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds `max_connections` already.
    Total,
    /// This address holds `max_connections_per_address` already.
    PerAddress,
}

impl Refusal {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::PerAddress => "per_address",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_address: HashMap<String, usize>,
}

/// Counts open connections; see the module documentation.
#[derive(Debug)]
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_address: usize,
    counts: Arc<Mutex<Counts>>,
    open: Gauge,
}

impl ConnectionLimiter {
    /// A limiter with the two caps, reporting the open count to `open`.
    pub fn new(max_total: usize, max_per_address: usize, open: Gauge) -> Self {
        Self {
            max_total,
            max_per_address,
            counts: Arc::default(),
            open,
        }
    }

    /// Admits one more connection from `address` (a rate-limit key), or says
    /// which cap it would break. The connection counts until the returned
    /// permit is dropped.
    pub fn admit(&self, address: String) -> Result<ConnectionPermit, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= self.max_total {
            return Err(Refusal::Total);
        }
        let held = counts.per_address.entry(address.clone()).or_insert(0);
        if *held >= self.max_per_address {
            return Err(Refusal::PerAddress);
        }
        *held += 1;
        counts.total += 1;
        self.open.set(gauge_value(counts.total));
        Ok(ConnectionPermit {
            address,
            counts: self.counts.clone(),
            open: self.open.clone(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// One admitted connection; dropping it releases its place.
#[derive(Debug)]
pub struct ConnectionPermit {
    address: String,
    counts: Arc<Mutex<Counts>>,
    open: Gauge,
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        self.open.set(gauge_value(counts.total));
        if let Some(held) = counts.per_address.get_mut(&self.address) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                // Only addresses with open connections keep an entry.
                counts.per_address.remove(&self.address);
            }
        }
    }
}

/// A connection's I/O that fails with `TimedOut` once neither direction has
/// moved a byte for `idle`; see the module documentation.
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`; the clock starts now.
    pub fn new(inner: T, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// The wrapped I/O.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn moved(&mut self) {
        let next = Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    /// Called whenever the connection waits: a pending operation that has
    /// outlived the deadline ends the connection.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle for longer than server.idle_timeout_secs",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(written)) => {
                if written > 0 {
                    this.moved();
                }
                Poll::Ready(Ok(written))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(written)) => {
                if written > 0 {
                    this.moved();
                }
                Poll::Ready(Ok(written))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.check_idle(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn caps_hold_per_address_and_in_all_and_free_on_drop() {
        let gauge = Gauge::default();
        let limiter = ConnectionLimiter::new(3, 2, gauge.clone());
        let a1 = limiter.admit("a".into()).expect("first from a");
        let _a2 = limiter.admit("a".into()).expect("second from a");
        assert_eq!(limiter.admit("a".into()).unwrap_err(), Refusal::PerAddress);
        let _b1 = limiter.admit("b".into()).expect("first from b");
        assert_eq!(limiter.admit("c".into()).unwrap_err(), Refusal::Total);
        assert_eq!(gauge.get(), 3);
        drop(a1);
        assert_eq!(limiter.open(), 2);
        assert_eq!(gauge.get(), 2);
        let _c1 = limiter.admit("c".into()).expect("a place was freed");
        assert_eq!(limiter.admit("a".into()).unwrap_err(), Refusal::Total);
    }

    /// Real time, scaled down: the timeout is 300 ms, activity comes every
    /// 100 ms (reads, then writes alone), then silence.
    #[tokio::test]
    async fn a_silent_connection_times_out_and_a_busy_one_does_not() {
        let idle = Duration::from_millis(300);
        let step = Duration::from_millis(100);
        let (client, server) = tokio::io::duplex(64);
        let mut server = IdleIo::new(server, idle);
        let mut client = client;
        let started = Instant::now();
        for _ in 0..5 {
            tokio::time::sleep(step).await;
            client.write_all(b"x").await.expect("client write");
            let mut byte = [0u8; 1];
            server
                .read_exact(&mut byte)
                .await
                .expect("read within the timeout");
        }
        // Writes alone (a download the client only receives) count too.
        for _ in 0..5 {
            tokio::time::sleep(step).await;
            server.write_all(b"y").await.expect("server write");
            let mut byte = [0u8; 1];
            client.read_exact(&mut byte).await.expect("client read");
        }
        // 1 s of steady traffic outlived the 300 ms timeout...
        assert!(started.elapsed() > Duration::from_millis(900));
        // ...and silence does not: the pending read fails.
        let silent = Instant::now();
        let mut byte = [0u8; 1];
        let err = server.read_exact(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(silent.elapsed() >= Duration::from_millis(250));
    }
}
