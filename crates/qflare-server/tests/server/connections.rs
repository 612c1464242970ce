//! Connections: caps per address and in all, the rate of new connections,
//! and the idle timeout, over HTTP/1.1 and HTTP/2.

use std::time::Duration;

use qflare_server::metrics::OutcomeLabels;
use qflare_server::ratelimit::RateLimit;
use tokio::io::AsyncReadExt;

use crate::harness::{Setup, TestServer, connect_from, raw_tls, tempdir};

fn refused(server: &TestServer, reason: &str) -> u64 {
    server
        .state
        .metrics
        .connections_refused
        .get_or_create(&OutcomeLabels {
            outcome: reason.into(),
        })
        .get()
}

/// An address holding thousands of idle connections takes only its share of
/// the server, and a device elsewhere goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_from_one_address_do_not_stop_a_device() {
    let dir = tempdir();
    let mut setup = Setup::new(&dir.path().join("state"));
    setup.config.server.max_connections_per_address = 50;
    let server = TestServer::start(setup).await;
    let identity = server.enrolled(&dir.path().join("device")).await;

    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        idle.push(connect_from("127.0.0.2", server.addr).await);
    }
    // The device's connections are accepted after all of those, so by the
    // time its session works the server has decided on every one of them.
    let transport = qflare_edge::transport_for(&identity).unwrap();
    let mut session = qflare_edge::open_session(&identity, &transport)
        .await
        .unwrap();
    session.ping().await.unwrap();
    assert_eq!(refused(&server, "per_address"), 1950);
    assert!(
        server.state.metrics.connections_open.get() <= 50 + 4,
        "{} connections open",
        server.state.metrics.connections_open.get()
    );
    // The refused ones were closed at once: they read end-of-stream.
    let mut closed = 0;
    for stream in idle.iter_mut().rev().take(100) {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 100);
    drop(idle);
    server.stop().await;
}

/// New connections (TLS handshakes) from one address are rate limited before
/// the handshake; other addresses are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_from_one_address_is_cut_off_before_tls() {
    let dir = tempdir();
    let mut setup = Setup::new(&dir.path().join("state"));
    setup.config.rate_limits.connections = RateLimit {
        per_minute: 1,
        burst: 5,
    };
    let server = TestServer::start(setup).await;
    let mut handshakes = Vec::new();
    for _ in 0..5 {
        handshakes.push(raw_tls(&server, "127.0.0.4", &[b"http/1.1"]).await);
    }
    // The sixth is closed before the server says a word of TLS.
    let mut tcp = connect_from("127.0.0.4", server.addr).await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte))
        .await
        .expect("closed, not left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(refused(&server, "rate"), 1);
    // Another address still connects.
    let _other = raw_tls(&server, "127.0.0.5", &[b"http/1.1"]).await;
    drop(handshakes);
    server.stop().await;
}

/// A connection that moves no byte is closed after the idle timeout, over
/// HTTP/2 as over HTTP/1.1 (hyper alone has no idle timeout for HTTP/2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_over_http1_and_http2() {
    let dir = tempdir();
    let mut setup = Setup::new(&dir.path().join("state"));
    setup.config.server.request_timeout_secs = 1;
    setup.config.server.idle_timeout_secs = 2;
    let server = TestServer::start(setup).await;
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut tls = raw_tls(&server, "127.0.0.6", &[alpn]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        // Read (the server's HTTP/2 SETTINGS, for one) until the server
        // closes; the client never sends a byte.
        let mut sink = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut sink)).await;
        assert!(ended.is_ok(), "{alpn:?}: still open after 30 s");
    }
    server.stop().await;
}
