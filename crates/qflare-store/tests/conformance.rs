//! Runs the conformance suite against SQLite (always, a fresh file per test) and PostgreSQL (when
//! `QFLARE_TEST_POSTGRES_URL` is set, a fresh schema per test, dropped afterwards).

mod common;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use qflare_store::conformance as check;
use qflare_store::{PostgresStore, SqliteStore, Store, StoreError};

fn sqlite_url(dir: &Path) -> String {
    format!(
        "sqlite://{}",
        dir.join("nested").join("qflare.db").display()
    )
}

async fn sqlite_store(dir: &Path) -> Arc<dyn Store> {
    qflare_store::open(&sqlite_url(dir))
        .await
        .expect("open SQLite store")
}

/// Runs `check` in a fresh PostgreSQL schema (see [`common::in_fresh_schema`]).
async fn in_fresh_schema<F, Fut>(check: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: Future<Output = Result<(), StoreError>> + Send + 'static,
{
    common::in_fresh_schema("qflare_test", "conformance check", check).await;
}

async fn postgres_store(url: &str, schema: &str) -> Result<Arc<dyn Store>, StoreError> {
    qflare_store::open_postgres_in_schema(url, schema).await
}

/// One test per backend for every check that takes a single fresh store.
macro_rules! single_store_checks {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    check::$name(sqlite_store(dir.path()).await)
                        .await
                        .expect("conformance check failed");
                }
            )*
        }

        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    in_fresh_schema(|url, schema| async move {
                        check::$name(postgres_store(&url, &schema).await?).await
                    })
                    .await;
                }
            )*
        }
    };
}

single_store_checks!(
    token_lifecycle,
    concurrent_enrollment,
    devices,
    sessions,
    concurrent_sequence_advance,
    rounds,
    submissions,
    closed_envelopes,
    models,
    evaluations,
    audit_chain,
    checkpoints,
    out_of_range_values,
    coordinator_lease,
    training_control,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_lease_race_across_stores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = sqlite_store(dir.path()).await;
    let b = sqlite_store(dir.path()).await;
    check::lease_race(&[a, b])
        .await
        .expect("conformance check failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lease_race_across_stores() {
    in_fresh_schema(|url, schema| async move {
        let a = postgres_store(&url, &schema).await?;
        let b = postgres_store(&url, &schema).await?;
        check::lease_race(&[a, b]).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_concurrent_enrollment_across_stores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = sqlite_store(dir.path()).await;
    let b = sqlite_store(dir.path()).await;
    check::concurrent_enrollment_across_stores(a, b)
        .await
        .expect("conformance check failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_enrollment_across_stores() {
    in_fresh_schema(|url, schema| async move {
        let a = postgres_store(&url, &schema).await?;
        let b = postgres_store(&url, &schema).await?;
        check::concurrent_enrollment_across_stores(a, b).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_persists_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    check::persists_across_reopen(|| qflare_store::open(&url))
        .await
        .expect("conformance check failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_persists_across_reopen() {
    in_fresh_schema(|url, schema| async move {
        check::persists_across_reopen(|| postgres_store(&url, &schema)).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_corrupt_values_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&sqlite_url(dir.path()))
        .await
        .expect("open SQLite store");
    let raw = store.clone();
    check::corrupt_values_are_reported(Arc::new(store), |sql| {
        let raw = raw.clone();
        async move { raw.execute_raw(sql).await }
    })
    .await
    .expect("conformance check failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_corrupt_values_are_reported() {
    in_fresh_schema(|url, schema| async move {
        let store = PostgresStore::open(&url, Some(&schema)).await?;
        let raw = store.clone();
        check::corrupt_values_are_reported(Arc::new(store), |sql| {
            let raw = raw.clone();
            async move { raw.execute_raw(sql).await }
        })
        .await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_is_owner_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = sqlite_store(dir.path()).await;
    assert_eq!(store.backend(), "sqlite");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let file = dir.path().join("nested").join("qflare.db");
        let mode = std::fs::metadata(&file)
            .expect("database file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "database file mode {mode:o}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_store_works() {
    let store = qflare_store::open("sqlite::memory:")
        .await
        .expect("open in-memory store");
    check::token_lifecycle(Arc::clone(&store))
        .await
        .expect("conformance check failed");
    check::concurrent_enrollment(qflare_store::open("sqlite::memory:").await.expect("open"))
        .await
        .expect("conformance check failed");
}

#[tokio::test]
async fn bad_urls_are_config_errors() {
    for url in [
        "mysql://localhost/db",
        "sqlite:",
        "sqlite://db.sqlite?mode=ro",
        "file.db",
    ] {
        let result = qflare_store::open(url).await;
        assert!(
            matches!(result, Err(StoreError::Config(_))),
            "{url}: {result:?}"
        );
    }
    let result = qflare_store::open_postgres_in_schema("postgres://localhost/db", "Bad-Name").await;
    assert!(matches!(result, Err(StoreError::Config(_))), "{result:?}");
}
