//! Limits: oversized and malformed bodies, rate limits in memory and in Redis.

use std::sync::Arc;
use std::time::Duration;

use qflare_server::ratelimit::{RateLimit, RedisRateLimiter};

use crate::harness::{
    ManualTimeLimiter, Setup, TestServer, error_of, raw_tls, reqwest_from, tempdir,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_bodies_get_the_error_shape() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let json = [("content-type", "application/json".to_owned())];

    let huge = vec![b'a'; 200 * 1024];
    let (status, error) = error_of(server.post_raw("/v1/enroll", huge.clone(), &json).await).await;
    assert_eq!((status, error.code.as_str()), (413, "payload_too_large"));
    let (status, error) = error_of(server.post_raw("/v1/sessions", huge, &json).await).await;
    assert_eq!((status, error.code.as_str()), (413, "payload_too_large"));

    for body in [&b"{"[..], b"null", b"{\"version\":1}", b"\xff\xfe", b"[]"] {
        let (status, error) =
            error_of(server.post_raw("/v1/enroll", body.to_vec(), &json).await).await;
        assert_eq!(
            (status, error.code.as_str()),
            (400, "malformed_request"),
            "{body:?}"
        );
        // The message never echoes the request.
        assert!(!error.message.contains("version"));
    }
    let (status, error) = error_of(
        server
            .post_raw("/v1/sessions", b"{\"bogus\":1}".to_vec(), &json)
            .await,
    )
    .await;
    assert_eq!((status, error.code.as_str()), (400, "malformed_request"));

    let (status, error) = error_of(server.post_raw("/v1/nowhere", vec![], &[]).await).await;
    assert_eq!((status, error.code.as_str()), (404, "not_found"));
    let response = server
        .admin
        .http
        .get(server.admin.url("/v1/enroll"))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!((status, error.code.as_str()), (405, "method_not_allowed"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_rate_limit_answers_429_and_recovers() {
    let dir = tempdir();
    let limiter = Arc::new(ManualTimeLimiter::default());
    let mut setup = Setup::new(&dir.path().join("state"));
    setup.config.rate_limits.enroll = RateLimit {
        per_minute: 6,
        burst: 3,
    };
    setup.limiter = Some(limiter.clone());
    let server = TestServer::start(setup).await;
    let json = [("content-type", "application/json".to_owned())];

    for _ in 0..3 {
        let (status, _) =
            error_of(server.post_raw("/v1/enroll", b"{}".to_vec(), &json).await).await;
        assert_eq!(
            status, 400,
            "within the burst the request reaches the handler"
        );
    }
    let limited = server.post_raw("/v1/enroll", b"{}".to_vec(), &json).await;
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    let (status, error) = error_of(limited).await;
    assert_eq!((status, error.code.as_str()), (429, "rate_limited"));
    // Other routes keep their own budget.
    assert_eq!(
        server
            .admin
            .http
            .get(server.admin.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    limiter.advance(Duration::from_secs(retry_after));
    let (status, _) = error_of(server.post_raw("/v1/enroll", b"{}".to_vec(), &json).await).await;
    assert_eq!(status, 400, "recovered after Retry-After");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_limits_through_redis() {
    let Ok(url) = std::env::var("QFLARE_TEST_REDIS_URL") else {
        eprintln!("skipped: QFLARE_TEST_REDIS_URL not set");
        return;
    };
    let prefix = format!("qflare:test:{}:", crate::harness::random_schema("rl"));
    let dir = tempdir();
    let state = dir.path().join("state");
    let mut servers = Vec::new();
    for _ in 0..2 {
        let mut setup = Setup::new(&state);
        setup.config.rate_limits.enroll = RateLimit {
            per_minute: 1,
            burst: 4,
        };
        setup.limiter = Some(Arc::new(
            RedisRateLimiter::connect(&url, &prefix).await.unwrap(),
        ));
        servers.push(TestServer::start(setup).await);
    }
    let json = [("content-type", "application/json".to_owned())];
    // Four requests spread over both replicas use up the one shared burst.
    for i in 0..4 {
        let (status, _) = error_of(
            servers[i % 2]
                .post_raw("/v1/enroll", b"{}".to_vec(), &json)
                .await,
        )
        .await;
        assert_eq!(status, 400);
    }
    for server in &servers {
        let response = server.post_raw("/v1/enroll", b"{}".to_vec(), &json).await;
        assert!(response.headers().contains_key("retry-after"));
        let (status, error) = error_of(response).await;
        assert_eq!((status, error.code.as_str()), (429, "rate_limited"));
    }
}

/// Writes a whole HTTP/1.1 request, head and body, before reading a byte of
/// the answer, as Python's `urllib` and `curl -H 'Expect:'` do; or, with
/// `expect_continue`, sends the head alone and waits, as curl does by
/// default. Returns the status and the body of the answer.
async fn http1_post(
    server: &TestServer,
    path: &str,
    body: &[u8],
    expect_continue: bool,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = raw_tls(server, "127.0.0.1", &[b"http/1.1"]).await;
    let expect = if expect_continue {
        "expect: 100-continue\r\n"
    } else {
        ""
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{expect}connection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    if !expect_continue {
        tls.write_all(body)
            .await
            .expect("the server reads the whole body");
        tls.flush().await.unwrap();
    }
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer)
        .await
        .expect("an answer, not a reset");
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        !text.starts_with("HTTP/1.1 100"),
        "a refused body must not be invited: {text}"
    );
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// An oversized body is answered 413 with the JSON error body however the
/// client sends it: HTTP/1.1 writing it all first, HTTP/1.1 waiting for
/// `100 Continue`, and HTTP/2, where only the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_answered_413_however_they_are_sent() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(&dir.path().join("state"))).await;
    let body = vec![b'a'; 8 * 1024 * 1024];
    for expect_continue in [false, true] {
        let (status, answer) = http1_post(&server, "/v1/enroll", &body, expect_continue).await;
        assert_eq!(status, 413, "expect-continue {expect_continue}: {answer}");
        let error: qflare_protocol::api::ErrorBody = serde_json::from_str(&answer).unwrap();
        assert_eq!(error.code.as_str(), "payload_too_large");
    }

    let http2 = reqwest_from("127.0.0.1", true);
    let response = http2
        .post(format!("{}/v1/enroll", server.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("an HTTP/2 answer");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let (status, error) = error_of(response).await;
    assert_eq!((status, error.code.as_str()), (413, "payload_too_large"));
    // The connection is still good for the next request.
    let response = http2
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    server.stop().await;
}
