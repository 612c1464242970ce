//! Schema migrations through sqlx: a new database migrates and passes the conformance suite, a
//! database created by the hand-written migrations that came before (fixtures in
//! `tests/fixtures/schema_v1/`, made by that code) is adopted with its rows intact, migrating twice
//! changes nothing, a database at an earlier migration gets the later ones on open, and schema
//! versions this build does not know are refused.
//!
//! SQLite always runs; PostgreSQL when `QFLARE_TEST_POSTGRES_URL` is set, each test in a fresh
//! schema that is dropped afterwards.

mod common;

use std::future::Future;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use qflare_store::conformance::{self as check, test_link};
use qflare_store::{
    AuditDraft, DeviceKeys, EvaluationRecord, GENESIS_HASH, ModelRecord, NewDevice, RoundRecord,
    RoundState, SessionState, Store, StoreError, SubmissionOutcome,
};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Row};

/// What the store before sqlx migrations executed to create its SQLite schema, plus rows written
/// through it (`sqlite3 .dump` of such a database).
const SQLITE_V1: &str = include_str!("fixtures/schema_v1/sqlite.sql");
/// The same for PostgreSQL, without schema qualification so it can be loaded into any schema.
const POSTGRES_V1: &str = include_str!("fixtures/schema_v1/postgres.sql");

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// One row of `_sqlx_migrations`: version, success, checksum.
type Applied = (i64, bool, Vec<u8>);

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("qflare.db").display())
}

async fn sqlite_conn(dir: &Path) -> SqliteConnection {
    let options = SqliteConnectOptions::new()
        .filename(dir.join("qflare.db"))
        .create_if_missing(true);
    SqliteConnection::connect_with(&options)
        .await
        .expect("connect to SQLite")
}

async fn sqlite_applied(dir: &Path) -> Vec<Applied> {
    let mut conn = sqlite_conn(dir).await;
    let rows =
        sqlx::query("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .expect("read _sqlx_migrations");
    rows.iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// The rows a database fully migrated by this build must hold.
fn expected_applied(migrator: &Migrator) -> Vec<Applied> {
    migrator
        .iter()
        .map(|m| (m.version, true, m.checksum.to_vec()))
        .collect()
}

/// Runs `check` in a fresh PostgreSQL schema (see [`common::in_fresh_schema`]).
async fn in_fresh_schema<F, Fut>(check: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: Future<Output = Result<(), StoreError>> + Send + 'static,
{
    common::in_fresh_schema("qflare_migr", "migration check", check).await;
}

/// A connection whose unqualified names resolve into `schema`, which is created if missing.
async fn postgres_conn(url: &str, schema: &str) -> PgConnection {
    let options = PgConnectOptions::from_str(url).expect("PostgreSQL URL");
    let mut conn = PgConnection::connect_with(&options)
        .await
        .expect("connect to PostgreSQL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}"
    )))
    .execute(&mut conn)
    .await
    .expect("enter test schema");
    conn
}

async fn postgres_applied(url: &str, schema: &str) -> Vec<Applied> {
    let mut conn = postgres_conn(url, schema).await;
    let rows =
        sqlx::query("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .expect("read _sqlx_migrations");
    rows.iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// Builds a database the way the store before sqlx migrations left it.
async fn load_sqlite_v1(dir: &Path) {
    let mut conn = sqlite_conn(dir).await;
    sqlx::raw_sql(SQLITE_V1)
        .execute(&mut conn)
        .await
        .expect("load schema_v1 fixture");
    conn.close().await.expect("close");
}

async fn load_postgres_v1(url: &str, schema: &str) {
    let mut conn = postgres_conn(url, schema).await;
    sqlx::raw_sql(POSTGRES_V1)
        .execute(&mut conn)
        .await
        .expect("load schema_v1 fixture");
    conn.close().await.expect("close");
}

/// A model row written while the schema was at migration 1.
const MODEL_AT_0001: &str = "INSERT INTO models (version, round_id, architecture, bytes, \
     certificate_json, created_at) VALUES (1, 0, 'mnist-2nn', $1, '{}', 100)";

/// What a store opened on a database at migration 1 must show: migration 2 applied, and the
/// evaluations it adds working against the model written before.
async fn evaluations_after_0002(store: Arc<dyn Store>) -> Result<(), StoreError> {
    assert!(store.evaluation_history().await?.is_empty());
    store
        .record_evaluation(&EvaluationRecord {
            model_version: 1,
            round_id: 1,
            device_id: "dev-a".to_owned(),
            examples: 4,
            metrics: vec![("accuracy".to_owned(), 0.75)],
            created_at: 200,
        })
        .await?;
    let history = store.evaluation_history().await?;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(
        (
            history[0].model_version,
            history[0].mean,
            history[0].examples
        ),
        (1, 0.75, 4)
    );
    Ok(())
}

/// Every single-store conformance check, each on a store `open` hands out fresh.
async fn conformance_suite<F, Fut>(open: F) -> Result<(), StoreError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Arc<dyn Store>, StoreError>>,
{
    check::token_lifecycle(open().await?).await?;
    check::concurrent_enrollment(open().await?).await?;
    check::devices(open().await?).await?;
    check::sessions(open().await?).await?;
    check::concurrent_sequence_advance(open().await?).await?;
    check::rounds(open().await?).await?;
    check::submissions(open().await?).await?;
    check::models(open().await?).await?;
    check::evaluations(open().await?).await?;
    check::audit_chain(open().await?).await?;
    check::checkpoints(open().await?).await?;
    check::out_of_range_values(open().await?).await
}

/// Reads back what the fixture's store wrote, then writes through the adopted store.
async fn legacy_rows_survive(store: Arc<dyn Store>) -> Result<(), StoreError> {
    // Tokens: one consumed by the legacy device, one still usable.
    let tokens = store.list_tokens().await?;
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    let used = tokens
        .iter()
        .find(|t| t.id == "legacy-token-1")
        .expect("legacy-token-1");
    assert_eq!(used.hash, "legacy-hash-1");
    assert_eq!(used.used_at, Some(1_010));
    assert_eq!(used.used_by.as_deref(), Some("legacy-device-1"));

    let device = store
        .get_device("legacy-device-1")
        .await?
        .expect("legacy device");
    assert_eq!(device.name, "legacy device");
    assert_eq!(device.keys.kem_suite, "ML-KEM-768");
    assert_eq!(device.keys.kem_public_key, vec![0x11; 8]);
    assert_eq!(device.keys.verifying_key, vec![0x22; 8]);
    assert_eq!(device.enrolled_at, 1_010);
    assert_eq!(device.last_seen_at, Some(1_020));
    assert_eq!(device.key_version, 1);
    assert_eq!(device.token_id.as_deref(), Some("legacy-token-1"));

    let session = store
        .get_session("legacy-session-1")
        .await?
        .expect("legacy session");
    assert_eq!(session.state, SessionState::Established);
    assert_eq!(session.sealed_state, vec![0x55; 8]);
    assert_eq!(session.last_seq, 3);

    let round = store.get_round(1).await?.expect("legacy round");
    assert_eq!(round.state, RoundState::Completed);
    assert_eq!(round.closed_at, Some(1_400));
    assert_eq!(round.outcome_json.as_deref(), Some(r#"{"accepted":1}"#));
    let participants = store.participants(1).await?;
    assert_eq!(participants.len(), 1);
    assert_eq!(participants[0].device_id, "legacy-device-1");
    assert_eq!(participants[0].envelope.as_deref(), Some(&[0x66; 8][..]));
    assert_eq!(participants[0].verdict.as_deref(), Some("accepted"));
    assert_eq!(store.submission_count(1).await?, 1);

    let model = store.get_model(1).await?.expect("legacy model");
    assert_eq!(model.bytes, vec![0x77; 8]);
    assert_eq!(model.accuracy, Some(0.875));
    assert_eq!(model.loss, Some(0.25));

    let entries = store.audit_entries(0, 10).await?;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].prev_hash, GENESIS_HASH);
    assert_eq!(entries[1].prev_hash, entries[0].hash);
    let head = store.audit_head().await?.expect("legacy audit head");
    assert_eq!(head, entries[1]);
    let checkpoints = store.checkpoints().await?;
    assert_eq!(checkpoints.len(), 1);
    assert_eq!(
        (checkpoints[0].seq, checkpoints[0].head_hash.as_str()),
        (2, head.hash.as_str())
    );

    // New writes land next to the old rows: the unused legacy token enrolls a device, the audit
    // chain continues from the legacy head, a new round and model follow the old ones.
    let keys = DeviceKeys {
        kem_suite: "ML-KEM-768".to_owned(),
        kem_public_key: vec![1; 8],
        signature_suite: "ML-DSA-65".to_owned(),
        verifying_key: vec![2; 8],
    };
    let new_device = NewDevice {
        id: "new-device".to_owned(),
        name: "enrolled after the upgrade".to_owned(),
        keys,
    };
    let enrolled = store
        .enroll_with_token("legacy-hash-2", 2_000, &new_device)
        .await?;
    assert_eq!(enrolled.token_id.as_deref(), Some("legacy-token-2"));
    assert_eq!(store.list_devices().await?.len(), 2);

    let entry = store
        .append_audit(
            &AuditDraft {
                at: 2_000,
                kind: "test.upgrade".to_owned(),
                actor: "server".to_owned(),
                subject: "new-device".to_owned(),
                detail_json: "{}".to_owned(),
            },
            &test_link,
        )
        .await?;
    assert_eq!(
        (entry.seq, entry.prev_hash.as_str()),
        (3, head.hash.as_str())
    );

    let round = RoundRecord {
        id: 2,
        state: RoundState::Open,
        base_model_version: 1,
        config_json: r#"{"round":2}"#.to_owned(),
        min_updates: 1,
        target_updates: 2,
        opened_at: 2_000,
        deadline: 3_000,
        closed_at: None,
        attempt: 1,
        outcome_json: None,
    };
    store
        .create_round(
            &round,
            &["legacy-device-1".to_owned(), "new-device".to_owned()],
        )
        .await?;
    assert_eq!(
        store
            .record_submission(2, "legacy-device-1", b"sealed", 2_100)
            .await?,
        SubmissionOutcome::Stored
    );
    assert_eq!(store.latest_round().await?.map(|r| r.id), Some(2));
    store
        .insert_model(&ModelRecord {
            version: 2,
            round_id: 1,
            architecture: "mnist-2nn".to_owned(),
            bytes: vec![9; 8],
            certificate_json: r#"{"version":2}"#.to_owned(),
            created_at: 2_200,
            accuracy: None,
            loss: None,
        })
        .await?;
    assert_eq!(store.model_history().await?.len(), 2);
    Ok(())
}

// --- SQLite

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_fresh_database_migrates_and_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    qflare_store::open(&sqlite_url(dir.path()))
        .await
        .expect("open SQLite store");
    assert_eq!(
        sqlite_applied(dir.path()).await,
        expected_applied(&SQLITE_MIGRATIONS)
    );
    let counter = AtomicU32::new(0);
    conformance_suite(|| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let url = format!(
            "sqlite://{}",
            dir.path().join(format!("check-{n}.db")).display()
        );
        async move { qflare_store::open(&url).await }
    })
    .await
    .expect("conformance check failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_legacy_database_is_adopted() {
    let dir = tempfile::tempdir().expect("tempdir");
    load_sqlite_v1(dir.path()).await;
    let url = sqlite_url(dir.path());
    let store = qflare_store::open(&url)
        .await
        .expect("open legacy SQLite database");
    assert_eq!(
        sqlite_applied(dir.path()).await,
        expected_applied(&SQLITE_MIGRATIONS),
        "migration 1 recorded with its checksum, the later ones run"
    );
    legacy_rows_survive(store).await.expect("legacy rows");
    // Reopening an adopted database is an ordinary no-op migration.
    let store = qflare_store::open(&url).await.expect("reopen");
    assert_eq!(store.list_devices().await.expect("devices").len(), 2);
    assert_eq!(
        sqlite_applied(dir.path()).await,
        expected_applied(&SQLITE_MIGRATIONS)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_schema_0001_gets_0002_on_open() {
    // A database an earlier build migrated: only migration 1 applied, with a model in it.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut conn = sqlite_conn(dir.path()).await;
    SQLITE_MIGRATIONS
        .run_direct(Some(1), &mut conn, false)
        .await
        .expect("migrate to 0001");
    sqlx::query(MODEL_AT_0001)
        .bind(vec![7_u8; 8])
        .execute(&mut conn)
        .await
        .expect("insert model");
    conn.close().await.expect("close");
    assert_eq!(
        sqlite_applied(dir.path()).await,
        expected_applied(&SQLITE_MIGRATIONS)[..1]
    );
    let store = qflare_store::open(&sqlite_url(dir.path()))
        .await
        .expect("open database at 0001");
    assert_eq!(
        sqlite_applied(dir.path()).await,
        expected_applied(&SQLITE_MIGRATIONS)
    );
    evaluations_after_0002(store).await.expect("evaluations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migrating_twice_is_a_no_op() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url(dir.path());
    let store = qflare_store::open(&url).await.expect("open");
    check::token_lifecycle(store)
        .await
        .expect("write some rows");
    let read_all = || async {
        let mut conn = sqlite_conn(dir.path()).await;
        let migrations: Vec<(i64, String)> = sqlx::query_as(
            "SELECT version, CAST(installed_on AS TEXT) FROM _sqlx_migrations ORDER BY version",
        )
        .fetch_all(&mut conn)
        .await
        .expect("read _sqlx_migrations");
        let tokens: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens")
            .fetch_one(&mut conn)
            .await
            .expect("count tokens");
        (migrations, tokens)
    };
    let before = read_all().await;
    let store = qflare_store::open(&url).await.expect("reopen");
    assert_eq!(read_all().await, before);
    // The migrator itself, run again on the migrated database, finds nothing to do.
    let mut conn = sqlite_conn(dir.path()).await;
    SQLITE_MIGRATIONS
        .run(&mut conn)
        .await
        .expect("migrate again");
    assert_eq!(read_all().await, before);
    let tokens = store.list_tokens().await.expect("tokens").len();
    assert_eq!(i64::try_from(tokens).ok(), Some(before.1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_unknown_schema_versions_are_refused() {
    // A legacy database at a version the hand-written code never had.
    let dir = tempfile::tempdir().expect("tempdir");
    load_sqlite_v1(dir.path()).await;
    let mut conn = sqlite_conn(dir.path()).await;
    sqlx::query("INSERT INTO qflare_schema_version (version, applied_at) VALUES (2, 0)")
        .execute(&mut conn)
        .await
        .expect("bump legacy version");
    conn.close().await.expect("close");
    let result = qflare_store::open(&sqlite_url(dir.path())).await;
    assert!(matches!(result, Err(StoreError::Config(_))), "{result:?}");
    let mut conn = sqlite_conn(dir.path()).await;
    let sqlx_table: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = '_sqlx_migrations'")
            .fetch_one(&mut conn)
            .await
            .expect("inspect");
    assert_eq!(sqlx_table, 0, "a refused database is left untouched");

    // A database migrated by a newer build.
    let dir = tempfile::tempdir().expect("tempdir");
    qflare_store::open(&sqlite_url(dir.path()))
        .await
        .expect("open");
    let mut conn = sqlite_conn(dir.path()).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (9999, 'from the future', TRUE, X'00', 0)",
    )
    .execute(&mut conn)
    .await
    .expect("add future migration");
    let result = qflare_store::open(&sqlite_url(dir.path())).await;
    assert!(matches!(result, Err(StoreError::Config(_))), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_edited_applied_migration_is_refused() {
    // sqlx keeps each applied migration's checksum: a database whose record
    // no longer matches this build's file is not silently re-used.
    let dir = tempfile::tempdir().expect("tempdir");
    qflare_store::open(&sqlite_url(dir.path()))
        .await
        .expect("open");
    let mut conn = sqlite_conn(dir.path()).await;
    sqlx::query("UPDATE _sqlx_migrations SET checksum = X'00' WHERE version = 1")
        .execute(&mut conn)
        .await
        .expect("edit checksum");
    conn.close().await.expect("close");
    let result = qflare_store::open(&sqlite_url(dir.path())).await;
    match result {
        Err(StoreError::Config(message)) => assert!(message.contains("differs"), "{message}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

// --- PostgreSQL

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fresh_database_migrates_and_conforms() {
    in_fresh_schema(|url, schema| async move {
        qflare_store::open_postgres_in_schema(&url, &schema).await?;
        assert_eq!(
            postgres_applied(&url, &schema).await,
            expected_applied(&POSTGRES_MIGRATIONS)
        );
        Ok(())
    })
    .await;
    // Each check gets its own schema, as tests/conformance.rs does.
    for run in 0..12 {
        in_fresh_schema(|url, schema| async move {
            let store = qflare_store::open_postgres_in_schema(&url, &schema).await?;
            match run {
                0 => check::token_lifecycle(store).await,
                1 => check::concurrent_enrollment(store).await,
                2 => check::devices(store).await,
                3 => check::sessions(store).await,
                4 => check::concurrent_sequence_advance(store).await,
                5 => check::rounds(store).await,
                6 => check::submissions(store).await,
                7 => check::models(store).await,
                8 => check::evaluations(store).await,
                9 => check::audit_chain(store).await,
                10 => check::checkpoints(store).await,
                _ => check::out_of_range_values(store).await,
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_legacy_database_is_adopted() {
    in_fresh_schema(|url, schema| async move {
        load_postgres_v1(&url, &schema).await;
        let store = qflare_store::open_postgres_in_schema(&url, &schema).await?;
        assert_eq!(
            postgres_applied(&url, &schema).await,
            expected_applied(&POSTGRES_MIGRATIONS),
            "migration 1 recorded with its checksum, the later ones run"
        );
        legacy_rows_survive(store).await?;
        let store = qflare_store::open_postgres_in_schema(&url, &schema).await?;
        assert_eq!(store.list_devices().await?.len(), 2);
        assert_eq!(
            postgres_applied(&url, &schema).await,
            expected_applied(&POSTGRES_MIGRATIONS)
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_0001_gets_0002_on_open() {
    in_fresh_schema(|url, schema| async move {
        let mut conn = postgres_conn(&url, &schema).await;
        POSTGRES_MIGRATIONS
            .run_direct(Some(1), &mut conn, false)
            .await
            .expect("migrate to 0001");
        sqlx::query(MODEL_AT_0001)
            .bind(vec![7_u8; 8])
            .execute(&mut conn)
            .await
            .expect("insert model");
        conn.close().await.expect("close");
        assert_eq!(
            postgres_applied(&url, &schema).await,
            expected_applied(&POSTGRES_MIGRATIONS)[..1]
        );
        let store = qflare_store::open_postgres_in_schema(&url, &schema).await?;
        assert_eq!(
            postgres_applied(&url, &schema).await,
            expected_applied(&POSTGRES_MIGRATIONS)
        );
        evaluations_after_0002(store).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrating_twice_is_a_no_op() {
    in_fresh_schema(|url, schema| async move {
        let store = qflare_store::open_postgres_in_schema(&url, &schema).await?;
        check::token_lifecycle(store).await?;
        let read_all = || async {
            let mut conn = postgres_conn(&url, &schema).await;
            let migrations: Vec<(i64, String)> = sqlx::query_as(
                "SELECT version, installed_on::TEXT FROM _sqlx_migrations ORDER BY version",
            )
            .fetch_all(&mut conn)
            .await
            .expect("read _sqlx_migrations");
            let tokens: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens")
                .fetch_one(&mut conn)
                .await
                .expect("count tokens");
            (migrations, tokens)
        };
        let before = read_all().await;
        let store = qflare_store::open_postgres_in_schema(&url, &schema).await?;
        assert_eq!(read_all().await, before);
        let mut conn = postgres_conn(&url, &schema).await;
        // `run_direct` is what `run` calls; `run`'s `Acquire` bound is not `Send`-friendly here.
        POSTGRES_MIGRATIONS
            .run_direct(None, &mut conn, false)
            .await
            .expect("migrate again");
        assert_eq!(read_all().await, before);
        assert_eq!(
            i64::try_from(store.list_tokens().await?.len()).ok(),
            Some(before.1)
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unknown_legacy_version_is_refused() {
    in_fresh_schema(|url, schema| async move {
        load_postgres_v1(&url, &schema).await;
        let mut conn = postgres_conn(&url, &schema).await;
        sqlx::query("INSERT INTO qflare_schema_version (version, applied_at) VALUES (2, 0)")
            .execute(&mut conn)
            .await
            .expect("bump legacy version");
        let result = qflare_store::open_postgres_in_schema(&url, &schema).await;
        assert!(matches!(result, Err(StoreError::Config(_))), "{result:?}");
        let adopted: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&mut conn)
                .await
                .expect("inspect");
        assert!(!adopted, "a refused database is left untouched");
        Ok(())
    })
    .await;
}
