//! What the store's integration tests share: the PostgreSQL switch and a
//! fresh schema per test, dropped afterwards whatever happened.

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU32, Ordering};

use qflare_store::StoreError;

/// Set to a PostgreSQL URL to run the PostgreSQL half of the tests.
pub const POSTGRES_URL_VAR: &str = "QFLARE_TEST_POSTGRES_URL";

/// The PostgreSQL URL, or `None` (saying the tests are skipped).
pub fn postgres_url() -> Option<String> {
    let url = std::env::var(POSTGRES_URL_VAR)
        .ok()
        .filter(|url| !url.is_empty());
    if url.is_none() {
        println!("skipped: {POSTGRES_URL_VAR} not set");
    }
    url
}

/// A schema name no other test (or concurrent run) uses.
pub fn fresh_schema(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let random = RandomState::new().hash_one(std::time::SystemTime::now());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{n}_{random:016x}", std::process::id())
}

/// Runs `check(url, schema)` on its own task in a fresh schema, drops the
/// schema whatever happened, then reports; does nothing without PostgreSQL.
pub async fn in_fresh_schema<F, Fut>(prefix: &str, what: &str, check: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: Future<Output = Result<(), StoreError>> + Send + 'static,
{
    let Some(url) = postgres_url() else { return };
    let schema = fresh_schema(prefix);
    let outcome = tokio::spawn(check(url.clone(), schema.clone())).await;
    qflare_store::drop_postgres_schema(&url, &schema)
        .await
        .expect("drop test schema");
    match outcome {
        Ok(result) => result.unwrap_or_else(|err| panic!("{what} failed: {err}")),
        Err(panic) => std::panic::resume_unwind(panic.into_panic()),
    }
}
