//! Connecting to a SQL store: the pool per database, the bookkeeping tables, and store
//! URLs without their password for messages.

use super::{bootstrap, Dialect, Inner, SqlStore};
use crate::error::SinkError;
use crate::sink::sql::schema::Tables;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool};
use sqlx::{AssertSqlSafe, Connection, Executor};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Connections of a Postgres or MySQL pool: a few groups in flight at once.
const POOL_SIZE: u32 = 8;
/// SQLite has a single writer anyway; one connection avoids `SQLITE_BUSY` between our
/// own connections.
const SQLITE_POOL_SIZE: u32 = 1;
/// How long a write waits for a SQLite lock held by another process.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;
/// How long to wait for a connection (a server that does not answer is unreachable).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the bookkeeping tables if missing.
async fn create_bookkeeping(pool: &AnyPool, dialect: Dialect) -> Result<(), sqlx::Error> {
    create_tables(pool, dialect, &dialect.bookkeeping_ddl()).await
}

/// Runs `CREATE TABLE IF NOT EXISTS` statements. On Postgres in one transaction under
/// an advisory lock: `CREATE TABLE IF NOT EXISTS` is not safe against itself, and
/// worker processes started together would otherwise fail on the catalog's unique index
/// (and retry their start). MySQL and SQLite serialize DDL themselves. Quietly:
/// Postgres answers every `IF NOT EXISTS` on an existing table with a NOTICE, which the
/// driver logs at info level, lines that look like a problem and are not.
pub(super) async fn create_tables(
    pool: &AnyPool,
    dialect: Dialect,
    ddl: &[String],
) -> Result<(), sqlx::Error> {
    if dialect != Dialect::Postgres {
        for statement in ddl {
            pool.execute(AssertSqlSafe(statement.clone())).await?;
        }
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    // A constant key: "kausal" in ASCII.
    (&mut *tx)
        .execute("SELECT pg_advisory_xact_lock(107971117115971)")
        .await?;
    (&mut *tx)
        .execute("SET LOCAL client_min_messages = warning")
        .await?;
    for statement in ddl {
        (&mut *tx).execute(AssertSqlSafe(statement.clone())).await?;
    }
    tx.commit().await
}

impl SqlStore {
    /// Connects to `postgres://…`, `mysql://…` (MariaDB too) or `sqlite://path` (the file
    /// is created if missing) and creates the bookkeeping tables if they are missing.
    pub async fn connect(url: &str) -> Result<SqlStore, SinkError> {
        let endpoint = redact(url);
        let dialect = Dialect::from_url(url).ok_or_else(|| SinkError::Store {
            operation: "connect",
            source: sqlx::Error::Configuration(
                format!("store URL {endpoint} is not postgres://, mysql:// or sqlite://").into(),
            ),
        })?;
        sqlx::any::install_default_drivers();
        kausal_bus::tls::install_crypto_provider();
        let mut url = crate::tls::store_url(url).map_err(|e| SinkError::Tls {
            endpoint: endpoint.clone(),
            detail: e.to_string(),
        })?;
        if dialect == Dialect::Sqlite && !url.contains("mode=") && !url.contains(":memory:") {
            url.push_str(if url.contains('?') {
                "&mode=rwc"
            } else {
                "?mode=rwc"
            });
        }
        let options = AnyConnectOptions::from_str(&url).map_err(|source| SinkError::Store {
            operation: "connect",
            source,
        })?;
        // The server answered and refused (credentials, unknown database): a retry will
        // not help. Anything else (refused, timed out) is worth retrying.
        let tls = !(url.contains("sslmode=disable") || url.contains("ssl-mode=DISABLED"))
            && dialect != Dialect::Sqlite;
        let failed = |source: sqlx::Error| match source {
            // A certificate problem (sqlx reports some as I/O errors): definite.
            source
                if tls && kausal_bus::tls::hint(&kausal_bus::tls::describe(&source)).is_some() =>
            {
                SinkError::Tls {
                    endpoint: endpoint.clone(),
                    detail: kausal_bus::tls::describe(&source),
                }
            }
            sqlx::Error::Database(_) | sqlx::Error::Configuration(_) => SinkError::Store {
                operation: "connect",
                source,
            },
            source => SinkError::Unreachable {
                endpoint: endpoint.clone(),
                source,
            },
        };
        // One plain connection first: the pool would retry a refused connection until its
        // acquire timeout, hiding the cause behind a timeout.
        let probe = tokio::time::timeout(ACQUIRE_TIMEOUT, AnyConnection::connect_with(&options))
            .await
            .unwrap_or_else(|_| {
                Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", ACQUIRE_TIMEOUT.as_secs()),
                )))
            })
            .map_err(failed)?;
        if let Err(error) = probe.close().await {
            tracing::debug!(error = %error, "closing the probe connection failed");
        }
        let pool = pool_options(dialect)
            .connect_with(options)
            .await
            .map_err(failed)?;
        create_bookkeeping(&pool, dialect)
            .await
            .map_err(|source| SinkError::Store {
                operation: "create bookkeeping tables",
                source,
            })?;
        let bootstrapping = bootstrap::load_active(&pool).await?;
        Ok(SqlStore {
            inner: Arc::new(Inner {
                pool,
                dialect,
                tables: Tables::default(),
                bootstrapping: std::sync::Mutex::new(bootstrapping),
                shared: std::sync::atomic::AtomicBool::new(false),
            }),
            sinks: crate::sink::Sinks::default(),
        })
    }
}

fn pool_options(dialect: Dialect) -> AnyPoolOptions {
    let options = AnyPoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
    match dialect {
        Dialect::Sqlite => options
            .max_connections(SQLITE_POOL_SIZE)
            // An in-memory database lives as long as its connection.
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute(AssertSqlSafe(format!(
                        "PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}"
                    )))
                    .await?;
                    Ok(())
                })
            }),
        // Datetimes are sent in UTC, without an offset.
        Dialect::MySql => options.max_connections(POOL_SIZE).after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET time_zone = '+00:00'").await?;
                Ok(())
            })
        }),
        Dialect::Postgres => options.max_connections(POOL_SIZE),
    }
}

/// The URL without its password, for messages and logs.
fn redact(url: &str) -> String {
    match AnyConnectOptions::from_str(url) {
        Ok(options) => {
            let mut url = options.database_url;
            if url.password().is_some() {
                // Fails only for URLs that cannot have a password at all.
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "(an unparseable URL)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(
            redact("mysql://kausal:s3cr:et@db:3306/app?ssl-mode=required"),
            "mysql://kausal:***@db:3306/app?ssl-mode=required"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/db"),
            "postgres://postgres@127.0.0.1/db"
        );
        assert_eq!(redact("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
    }
}
