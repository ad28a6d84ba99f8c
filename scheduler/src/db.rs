//! The database connection: one code path over SQLite and PostgreSQL through sqlx's `Any`
//! driver, with the migrations of each backend compiled into the binary.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, SqlSafeStr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connected, migrated database.
#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    /// SQLite's writers take turns here, in arrival order. SQLite lets one connection write
    /// at a time; the others, left to its busy handler, sleep in growing steps (1, 2, 5, 10,
    /// … 100 ms) and retry, which gave intake at 32 clients a p99 five times its p50. Waiting
    /// here instead wakes the next writer the moment the previous commit ends.
    writes: Arc<tokio::sync::Mutex<()>>,
}

/// A writer's turn ([`Db::write_turn`]): held until the write (or transaction) has committed.
pub struct WriteTurn<'a> {
    _held: Option<tokio::sync::MutexGuard<'a, ()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
    #[error("database: the write was abandoned (the scheduler is shutting down)")]
    Abandoned,
}

/// Written once for both backends.
const CLUSTER_IDENTITY: &str = include_str!("../migrations/shared/0002_cluster_identity.sql");

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (2, "cluster identity", CLUSTER_IDENTITY),
    (
        3,
        "build history",
        include_str!("../migrations/sqlite/0003_build_history.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (2, "cluster identity", CLUSTER_IDENTITY),
    (
        3,
        "build history",
        include_str!("../migrations/postgres/0003_build_history.sql"),
    ),
];

impl Db {
    /// Connects (creating a SQLite file on first start) and applies pending migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DbError> {
        install_default_drivers();
        let (backend, url_to_open) = if url.starts_with("sqlite:") {
            // Create the file on first start; never drop into an in-memory database by accident.
            let with_mode = if url.contains("mode=") {
                url.to_owned()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, with_mode)
        } else {
            (Backend::Postgres, url.to_owned())
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5));
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000;")
                        .await?;
                    Ok(())
                })
            });
        }
        let pool = options
            .connect(&url_to_open)
            .await
            .map_err(|source| DbError::Connect {
                url: sd_protocol::env::redact_url(url),
                source,
            })?;
        let db = Self {
            pool,
            backend,
            writes: Arc::new(tokio::sync::Mutex::new(())),
        };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), DbError> {
        let list = match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS,
            Backend::Postgres => POSTGRES_MIGRATIONS,
        };
        let migrations = list
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations)
            .run(&self.pool)
            .await?;
        Ok(())
    }

    /// Waits for this process's turn to write (SQLite; PostgreSQL writes concurrently and
    /// needs none). Hold it across the write or the whole transaction, never across anything
    /// else: every other writer waits for it.
    pub async fn write_turn(&self) -> WriteTurn<'_> {
        match self.backend {
            Backend::Sqlite => WriteTurn {
                _held: Some(self.writes.lock().await),
            },
            Backend::Postgres => WriteTurn { _held: None },
        }
    }

    /// A real round trip, for `/readyz`.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Milliseconds since the epoch, the unit of every timestamp column.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
