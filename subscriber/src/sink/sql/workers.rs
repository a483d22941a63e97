//! Live status of the app's workers in its store (`kausal_workers`): each worker
//! rewrites its row every few seconds and deletes it when it stops, so `kausal status`
//! sees every worker of the app — one process or many hosts — through the store alone.

use super::SqlStore;
use crate::error::SinkError;
use crate::status::WorkerStatus;
use sqlx::{AnyPool, AssertSqlSafe, Row};

/// Rows of workers not seen for this long are removed by the next worker that writes
/// (a crashed worker's row stays visible as "gone" until then).
const FORGET_AFTER_MS: i64 = 3_600_000;

impl SqlStore {
    /// Replaces this worker's row.
    pub async fn write_status(&self, status: &WorkerStatus) -> Result<(), SinkError> {
        let d = self.inner.dialect;
        let body = serde_json::to_string(status).unwrap_or_default();
        let store = |source| SinkError::Store {
            operation: "write worker status",
            source,
        };
        let mut tx = self.inner.pool.begin().await.map_err(store)?;
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM kausal_workers WHERE worker = {} OR updated_ms < {}",
            d.placeholder(1),
            d.placeholder(2)
        )))
        .bind(status.worker.as_str())
        .bind(status.updated_ms - FORGET_AFTER_MS)
        .execute(&mut *tx)
        .await
        .map_err(store)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO kausal_workers (worker, updated_ms, body) VALUES ({}, {}, {})",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3)
        )))
        .bind(status.worker.as_str())
        .bind(status.updated_ms)
        .bind(body)
        .execute(&mut *tx)
        .await
        .map_err(store)?;
        tx.commit().await.map_err(store)
    }

    /// Removes this worker's row (a clean stop).
    pub async fn remove_status(&self, worker: &str) -> Result<(), SinkError> {
        let d = self.inner.dialect;
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM kausal_workers WHERE worker = {}",
            d.placeholder(1)
        )))
        .bind(worker)
        .execute(&self.inner.pool)
        .await
        .map(|_| ())
        .map_err(|source| SinkError::Store {
            operation: "remove worker status",
            source,
        })
    }
}

/// Every worker row of a store, for `kausal status` (which opens the store read-only:
/// a store no worker ever started has no rows, not an error).
pub async fn read_statuses(pool: &AnyPool) -> Result<Vec<WorkerStatus>, sqlx::Error> {
    let rows = rows_if_any(
        pool,
        "SELECT body FROM kausal_workers ORDER BY worker".into(),
    )
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let body: String = row.try_get(0)?;
        // A row written by another Kausal version may not parse: shown as unknown.
        if let Ok(s) = serde_json::from_str(&body) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Applied-through watermark per (namespace, generation), from the store.
pub async fn read_progress(
    pool: &AnyPool,
    dialect: super::Dialect,
) -> Result<Vec<(String, u64, u64)>, sqlx::Error> {
    let through = dialect.quote("through");
    let sql = format!(
        "SELECT namespace, generation, {through} FROM kausal_progress ORDER BY namespace, generation"
    );
    let rows = rows_if_any(pool, sql).await?;
    let mut out = Vec::new();
    for row in rows {
        let ns: String = row.try_get(0)?;
        let generation: i64 = row.try_get(1)?;
        let through: i64 = row.try_get(2)?;
        out.push((ns, generation.max(0) as u64, through.max(0) as u64));
    }
    Ok(out)
}

/// A table's bootstrap as the store records it.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct BootstrapState {
    pub namespace: String,
    pub table: String,
    /// 0 while chunks come; 1 once every chunk is applied (the table is complete);
    /// 2 once its bookkeeping is dropped too (see docs/bootstrap.md).
    pub done: i32,
    pub rows_applied: u64,
}

/// Every table's bootstrap in the store, for `kausal status`.
pub async fn read_bootstraps(pool: &AnyPool) -> Result<Vec<BootstrapState>, sqlx::Error> {
    let sql = "SELECT namespace, tbl, done, rows_applied FROM kausal_bootstrap \
               ORDER BY namespace, tbl";
    let rows = rows_if_any(pool, sql.into()).await?;
    let mut out = Vec::new();
    for row in rows {
        let rows_applied: i64 = row.try_get(3)?;
        out.push(BootstrapState {
            namespace: row.try_get(0)?,
            table: row.try_get(1)?,
            done: row.try_get(2)?,
            rows_applied: rows_applied.max(0) as u64,
        });
    }
    Ok(out)
}

/// The rows `sql` answers; none when its table is missing (a store no worker ever ran
/// on), which `kausal status` reads as "nothing yet", not as an error.
async fn rows_if_any(pool: &AnyPool, sql: String) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    match sqlx::query(AssertSqlSafe(sql)).fetch_all(pool).await {
        Err(e) if is_missing_table(&e) => Ok(Vec::new()),
        answer => answer,
    }
}

/// The table is missing (a store no worker ever ran on): by SQLSTATE on Postgres
/// (42P01) and MySQL/MariaDB (42S02); SQLite reports only its generic error code, so
/// there the message decides.
fn is_missing_table(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    match db.code().as_deref() {
        Some("42P01") | Some("42S02") => true,
        Some("1") => db.message().starts_with("no such table"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_store_no_worker_ran_on_has_no_progress_and_no_workers() {
        sqlx::any::install_default_drivers();
        // A bare database, without the bookkeeping tables (`kausal status` pointed at a
        // store before any worker started).
        // One connection: each in-memory SQLite connection is a database of its own.
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let progress = read_progress(&pool, super::super::Dialect::Sqlite).await;
        assert_eq!(progress.unwrap(), Vec::new());
        assert!(read_statuses(&pool).await.unwrap().is_empty());
        // Any other error is still an error.
        sqlx::query("CREATE TABLE kausal_progress (x INTEGER)")
            .execute(&pool)
            .await
            .unwrap();
        assert!(read_progress(&pool, super::super::Dialect::Sqlite)
            .await
            .is_err());
    }
}
