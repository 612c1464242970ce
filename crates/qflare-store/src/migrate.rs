//! Schema migrations: sqlx's embedded migrators, plus the baseline that adopts databases created
//! before the store used them.
//!
//! The SQL lives in `migrations/sqlite/` and `migrations/postgres/` (one numbered file per schema
//! change, embedded at compile time by `sqlx::migrate!`); sqlx records what it applied, with a
//! SHA-384 checksum of each file, in the `_sqlx_migrations` table and refuses a database whose
//! applied migrations were edited afterwards or that knows migrations this build does not.
//!
//! Why a baseline: until sqlx took over, the store created its schema with hand-written code that
//! tracked the version in its own `qflare_schema_version` table (it only ever reached version 1).
//! Such a database already holds exactly what `0001_initial_schema.sql` creates, but it has no
//! `_sqlx_migrations` table, so sqlx would run migration 0001 again and fail on the existing
//! tables. So, when `_sqlx_migrations` is absent and `qflare_schema_version` says 1, migration
//! 0001 is recorded as applied (sqlx's own `Migrate::skip`, which writes the row with its
//! checksum) without running it, and the migrator then runs as usual from there. Any other legacy
//! version is refused with [`StoreError::Config`] rather than guessed at. The legacy table is left
//! as it is; once `_sqlx_migrations` exists it is no longer read.
//!
//! The caller runs all of this inside one write transaction that also serializes concurrent
//! openers (SQLite's `BEGIN IMMEDIATE`, a PostgreSQL advisory lock), so the check, the baseline
//! and the migrations commit together or not at all; sqlx runs each migration in a savepoint of it.
//! The migrator is driven through `Migrator::run_direct` (what `Migrator::run` calls) on that
//! transaction's connection: `run`'s `Acquire` bound on a borrowed connection makes the future
//! non-`Send`, and the stores are opened from spawned tasks.

use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::{PgConnection, SqliteConnection};

use crate::StoreError;

/// The SQLite schema's migrations.
static SQLITE: Migrator = sqlx::migrate!("migrations/sqlite");

/// The PostgreSQL schema's migrations.
static POSTGRES: Migrator = sqlx::migrate!("migrations/postgres");

/// sqlx's bookkeeping table (its default name).
const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// The table in which the hand-written migrations recorded the schema version.
const LEGACY_TABLE: &str = "qflare_schema_version";

/// The only hand-written schema version there ever was; it equals sqlx migration 1.
const LEGACY_VERSION: i64 = 1;

/// What the database says about its schema before migrating.
struct Found {
    /// `_sqlx_migrations` exists.
    migrations_table: bool,
    /// `MAX(version)` of `qflare_schema_version`, if that table exists (`None` inside if empty).
    legacy_version: Option<Option<i64>>,
}

/// Brings a SQLite database up to date. `conn` must be inside a `BEGIN IMMEDIATE` transaction.
pub(crate) async fn sqlite(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    let exists = "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1)";
    let migrations_table = sqlx::query_scalar::<_, bool>(exists)
        .bind(MIGRATIONS_TABLE)
        .fetch_one(&mut *conn)
        .await
        .map_err(crate::error::backend)?;
    let legacy_table = sqlx::query_scalar::<_, bool>(exists)
        .bind(LEGACY_TABLE)
        .fetch_one(&mut *conn)
        .await
        .map_err(crate::error::backend)?;
    let legacy_version = if legacy_table {
        Some(
            sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(version) FROM qflare_schema_version")
                .fetch_one(&mut *conn)
                .await
                .map_err(crate::error::backend)?,
        )
    } else {
        None
    };
    let found = Found {
        migrations_table,
        legacy_version,
    };
    apply(conn, &SQLITE, &found).await
}

/// Brings a PostgreSQL schema (the connection's `search_path`) up to date. `conn` must be inside
/// a transaction that holds the store's migration lock.
pub(crate) async fn postgres(conn: &mut PgConnection) -> Result<(), StoreError> {
    // `to_regclass` resolves the name through `search_path`, like the unqualified DDL does.
    let exists = "SELECT to_regclass($1) IS NOT NULL";
    let migrations_table = sqlx::query_scalar::<_, bool>(exists)
        .bind(MIGRATIONS_TABLE)
        .fetch_one(&mut *conn)
        .await
        .map_err(crate::error::backend)?;
    let legacy_table = sqlx::query_scalar::<_, bool>(exists)
        .bind(LEGACY_TABLE)
        .fetch_one(&mut *conn)
        .await
        .map_err(crate::error::backend)?;
    let legacy_version = if legacy_table {
        Some(
            sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(version) FROM qflare_schema_version")
                .fetch_one(&mut *conn)
                .await
                .map_err(crate::error::backend)?,
        )
    } else {
        None
    };
    let found = Found {
        migrations_table,
        legacy_version,
    };
    apply(conn, &POSTGRES, &found).await
}

/// The part both backends share once they know what the database holds:
/// adopt a legacy schema, then run what is not applied yet.
async fn apply<C: Migrate>(
    conn: &mut C,
    embedded: &Migrator,
    found: &Found,
) -> Result<(), StoreError> {
    let migrator = without_own_lock(embedded);
    baseline_if_legacy(conn, &migrator, found).await?;
    migrator
        .run_direct(None, conn, false)
        .await
        .map_err(|error| migrate_error(error, &migrator))
}

/// The embedded migrations with sqlx's own lock switched off. The caller's
/// transaction already serializes openers (`BEGIN IMMEDIATE`, the store's
/// advisory lock); sqlx's PostgreSQL lock is a second, session-level advisory
/// lock that its error paths leave held on the pooled connection.
fn without_own_lock(embedded: &Migrator) -> Migrator {
    let mut migrator = Migrator::with_migrations(embedded.iter().cloned().collect());
    migrator.set_locking(false);
    migrator
}

/// Records migration 1 as applied, without running it, on a database the hand-written
/// migrations created; does nothing on a new database or one sqlx already manages.
async fn baseline_if_legacy<C: Migrate>(
    conn: &mut C,
    migrator: &Migrator,
    found: &Found,
) -> Result<(), StoreError> {
    if found.migrations_table {
        return Ok(());
    }
    let Some(legacy_version) = found.legacy_version else {
        return Ok(());
    };
    if legacy_version != Some(LEGACY_VERSION) {
        let version = legacy_version.map_or_else(|| "(none)".to_owned(), |v| v.to_string());
        return Err(StoreError::Config(format!(
            "database schema version {version} in {LEGACY_TABLE} is not one this build knows \
             (it can adopt only version {LEGACY_VERSION})"
        )));
    }
    let initial = migrator
        .iter()
        .find(|m| m.version == LEGACY_VERSION && !m.migration_type.is_down_migration())
        .ok_or_else(|| {
            StoreError::Config(format!(
                "migration {LEGACY_VERSION} is missing from this build"
            ))
        })?;
    conn.ensure_migrations_table(MIGRATIONS_TABLE)
        .await
        .map_err(|error| migrate_error(error, migrator))?;
    conn.skip(MIGRATIONS_TABLE, initial)
        .await
        .map_err(|error| migrate_error(error, migrator))?;
    tracing::info!(
        legacy_version = LEGACY_VERSION,
        "adopted a database from before sqlx migrations: migration 1 recorded as applied"
    );
    Ok(())
}

/// Maps sqlx's migration errors; the ones that mean "this database is not ours to run" are
/// configuration errors, as the hand-written migrations reported them.
fn migrate_error(error: MigrateError, migrator: &Migrator) -> StoreError {
    let latest = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    match error {
        MigrateError::VersionMissing(version) => StoreError::Config(format!(
            "database has schema migration {version}, which this build does not know \
             (latest {latest})"
        )),
        MigrateError::VersionMismatch(version) => StoreError::Config(format!(
            "schema migration {version} applied to the database differs from this build's"
        )),
        MigrateError::Dirty(version) => StoreError::Config(format!(
            "schema migration {version} failed part-way earlier; the database needs repair"
        )),
        MigrateError::Execute(error) | MigrateError::ExecuteMigration(error, _) => {
            crate::error::backend(error)
        }
        other => StoreError::Backend(other.to_string()),
    }
}
