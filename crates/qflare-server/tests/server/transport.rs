//! Transport: the TLS handshake really negotiates X25519MLKEM768, TLS 1.2 is
//! refused, the metrics listener counts handshakes, shutdown is graceful.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Setup, TestServer, client_config, tempdir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_negotiates_x25519mlkem768_and_metrics_count_it() {
    let dir = tempdir();
    let mut setup = Setup::new(&dir.path().join("state"));
    setup.with_metrics = true;
    let server = TestServer::start(setup).await;

    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(
        &server,
        &[&rustls::version::TLS13],
    )));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (_, connection) = tls.get_ref();
    assert_eq!(
        connection.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    assert_eq!(
        connection.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));

    // The server saw the same group, and says so on the metrics listener.
    let metrics_url = server.metrics_url.clone().unwrap();
    let text = reqwest::get(&metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#"qflare_tls_handshakes_total{group="X25519MLKEM768"}"#),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_is_refused() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(
        &server,
        &[&rustls::version::TLS12],
    )));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    assert!(
        connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .is_err()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_client_refuses_another_certificate() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let identity = server.enrolled(&dir.path().join("device")).await;
    // Another server (another certificate and key) at the address the device trusts.
    let impostor = TestServer::start(Setup::new(&dir.path().join("impostor"))).await;
    let mut redirected = qflare_edge::Identity::load(&dir.path().join("device")).unwrap();
    redirected.server_url = impostor.url.clone();
    let transport = qflare_edge::transport_for(&redirected).unwrap();
    let err = qflare_edge::open_session(&redirected, &transport)
        .await
        .unwrap_err();
    assert!(matches!(err, qflare_edge::EdgeError::Network(_)), "{err}");
    // And enrollment against the impostor with the real fingerprint fails before any token is sent.
    let token = server.create_token(600).await;
    let err = qflare_edge::enroll(
        qflare_edge::EnrollOptions {
            server_url: impostor.url.clone(),
            token: qflare_protocol::identity::EnrollmentToken::parse(&token.token).unwrap(),
            fingerprint: server.fingerprint,
            device_name: "victim".into(),
            kem_suite: None,
            signature_suite: None,
            alternate_urls: Vec::new(),
        },
        &dir.path().join("victim"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            qflare_edge::EdgeError::Protocol(qflare_protocol::ProtocolError::PinMismatch)
        ),
        "{err}"
    );
    assert!(impostor.state.store.list_tokens().await.unwrap().is_empty());
    drop(identity);
    server.stop().await;
    impostor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_graceful() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let addr = server.addr;
    server.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}
