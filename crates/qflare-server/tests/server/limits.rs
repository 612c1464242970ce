//! Limits: oversized and malformed bodies, rate limits in memory and in Redis.

use std::sync::Arc;
use std::time::Duration;

use qflare_server::ratelimit::{RateLimit, RedisRateLimiter};

use crate::harness::{ManualTimeLimiter, Setup, TestServer, error_of, tempdir};

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
