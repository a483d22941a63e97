//! Fresh databases for the store tests: Postgres (127.0.0.1:5432, user postgres,
//! trust), MariaDB (127.0.0.1:3306, user kausal/kausal) and SQLite (a temporary file),
//! each dropped when the test ends, even when it fails.
#![allow(dead_code)]

pub mod build;

/// One test per server for a scenario `async fn(Server) -> Result<()>`:
/// `scenario_tests!(scenario: name_on_postgres => Server::Postgres, …);`
#[allow(unused_macros)]
macro_rules! scenario_tests {
    ($scenario:ident: $($name:ident => $server:expr),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> Result<()> {
                $scenario($server).await
            }
        )+
    };
}

use anyhow::{bail, Context as _, Result};
use kausal_subscriber::sink::sql::SqlStore;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe, Connection, Executor, Row};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const MY_ADMIN: &str = "mysql://kausal:kausal@127.0.0.1:3306/";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Server {
    Postgres,
    MariaDb,
    Sqlite,
}

/// A fresh database, dropped (or its file removed) on drop.
pub struct TestDb {
    pub server: Server,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create(server: Server) -> Result<TestDb> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        sqlx::any::install_default_drivers();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let name = format!(
            "t_sql_{}_{nanos}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let url = match server {
            Server::Postgres => {
                admin(PG_ADMIN, &format!("CREATE DATABASE {name}")).await?;
                format!("postgres://postgres@127.0.0.1:5432/{name}")
            }
            Server::MariaDb => {
                admin(MY_ADMIN, &format!("CREATE DATABASE {name}")).await?;
                format!("mysql://kausal:kausal@127.0.0.1:3306/{name}")
            }
            Server::Sqlite => {
                let path = std::env::temp_dir().join(format!("{name}.db"));
                format!("sqlite://{}", path.display())
            }
        };
        Ok(TestDb { server, name, url })
    }

    /// A new store on this database: each call is another worker with its own pool.
    pub async fn store(&self) -> Result<SqlStore> {
        SqlStore::connect(&self.url)
            .await
            .with_context(|| format!("connect to {}", self.url))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server, self.name.clone());
        // Drop runs outside any async context we can use: a thread with its own runtime.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let dropped = match server {
                    Server::Postgres => {
                        admin(
                            PG_ADMIN,
                            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                        )
                        .await
                    }
                    Server::MariaDb => {
                        admin(MY_ADMIN, &format!("DROP DATABASE IF EXISTS {name}")).await
                    }
                    Server::Sqlite => {
                        for suffix in ["db", "db-wal", "db-shm"] {
                            let path = std::env::temp_dir().join(format!("{name}.{suffix}"));
                            let _ = std::fs::remove_file(path);
                        }
                        Ok(())
                    }
                };
                if let Err(error) = dropped {
                    eprintln!("could not drop test database {name}: {error:#}");
                }
            });
        });
        let _ = cleanup.join();
    }
}

pub async fn admin(url: &str, sql: &str) -> Result<()> {
    sqlx::any::install_default_drivers();
    let mut conn = AnyConnection::connect(url).await?;
    conn.execute(AssertSqlSafe(sql.to_string())).await?;
    conn.close().await?;
    Ok(())
}

/// Rows of a query, each cell as JSON (integers, floats, booleans, strings, null).
pub async fn rows(store: &SqlStore, sql: &str) -> Result<Vec<Vec<Value>>> {
    let rows = sqlx::query(AssertSqlSafe(sql.to_string()))
        .fetch_all(store.pool())
        .await
        .with_context(|| sql.to_string())?;
    rows.iter()
        .map(|row| (0..row.len()).map(|i| cell(row, i)).collect())
        .collect()
}

pub fn cell(row: &AnyRow, i: usize) -> Result<Value> {
    if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
        return Ok(v.map_or(Value::Null, Value::from));
    }
    if let Ok(v) = row.try_get::<Option<f64>, _>(i) {
        return Ok(v.map_or(Value::Null, Value::from));
    }
    if let Ok(v) = row.try_get::<Option<bool>, _>(i) {
        return Ok(v.map_or(Value::Null, Value::from));
    }
    if let Ok(v) = row.try_get::<Option<String>, _>(i) {
        return Ok(v.map_or(Value::Null, Value::from));
    }
    bail!("column {i} cannot be decoded")
}
