//! What the store followed: used to tell a first start from a store whose queue vanished,
//! and a first join of a stream from a later one.

use super::SqlStore;
use crate::error::SinkError;
use sqlx::{AssertSqlSafe, Row};

impl SqlStore {
    /// Whether the store has applied anything of `namespace` in a generation other
    /// than `generation`.
    pub async fn has_other_generations(
        &self,
        namespace: &str,
        generation: u64,
    ) -> Result<bool, SinkError> {
        let d = self.inner.dialect;
        let mut found = false;
        for table in ["kausal_progress", "kausal_applied"] {
            let sql = format!(
                "SELECT COUNT(*) FROM {table} WHERE namespace = {} AND generation <> {}",
                d.placeholder(1),
                d.placeholder(2)
            );
            let n: i64 = sqlx::query(AssertSqlSafe(sql))
                .bind(namespace)
                .bind(super::int(generation))
                .fetch_one(&self.inner.pool)
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|source| SinkError::Store {
                    operation: "read progress",
                    source,
                })?;
            found |= n > 0;
        }
        Ok(found)
    }

    /// Whether the store has applied anything from a stream (or started a bootstrap).
    pub async fn has_followed(&self) -> Result<bool, SinkError> {
        let mut found = false;
        for table in ["kausal_progress", "kausal_applied", "kausal_bootstrap"] {
            let sql = format!("SELECT COUNT(*) FROM {table}");
            let n: i64 = sqlx::query(AssertSqlSafe(sql))
                .fetch_one(&self.inner.pool)
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|source| SinkError::Store {
                    operation: "read progress",
                    source,
                })?;
            found |= n > 0;
        }
        Ok(found)
    }
}
