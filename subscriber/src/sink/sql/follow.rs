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
        let tables = ["kausal_progress", "kausal_applied"];
        self.any_of_generation(&tables, namespace, generation, "<>")
            .await
    }

    /// Whether the store joined the stream of `namespace`/`generation`: it recorded a
    /// compacted watermark for it (possibly 0: joined before its first transaction).
    /// A joined store never joins again — a later join point would pass over
    /// transactions its queue holds for it.
    pub async fn has_joined(&self, namespace: &str, generation: u64) -> Result<bool, SinkError> {
        self.any_of_generation(&["kausal_progress"], namespace, generation, "=")
            .await
    }

    /// Whether the store joined `namespace`/`generation` or applied a transaction of
    /// it: one that did neither may still join it (at its first transaction, say).
    pub async fn has_followed_generation(
        &self,
        namespace: &str,
        generation: u64,
    ) -> Result<bool, SinkError> {
        let tables = ["kausal_progress", "kausal_applied"];
        self.any_of_generation(&tables, namespace, generation, "=")
            .await
    }

    /// Whether any of `tables` has a row of `namespace` whose generation compares to
    /// `generation` by `op` (`=` or `<>`).
    async fn any_of_generation(
        &self,
        tables: &[&str],
        namespace: &str,
        generation: u64,
        op: &str,
    ) -> Result<bool, SinkError> {
        let d = self.inner.dialect;
        let filter = format!(
            "WHERE namespace = {} AND generation {op} {}",
            d.placeholder(1),
            d.placeholder(2)
        );
        let binds = Some((namespace, super::int(generation)));
        self.any_row(tables, &filter, binds).await
    }

    /// Whether the store has applied anything from a stream (or started a bootstrap).
    pub async fn has_followed(&self) -> Result<bool, SinkError> {
        let tables = ["kausal_progress", "kausal_applied", "kausal_bootstrap"];
        self.any_row(&tables, "", None).await
    }

    /// Whether any of `tables` has a row matching `filter` (with its two parameters).
    async fn any_row(
        &self,
        tables: &[&str],
        filter: &str,
        binds: Option<(&str, i64)>,
    ) -> Result<bool, SinkError> {
        for table in tables {
            let sql = format!("SELECT COUNT(*) FROM {table} {filter}");
            let mut query = sqlx::query(AssertSqlSafe(sql));
            if let Some((namespace, generation)) = binds {
                query = query.bind(namespace).bind(generation);
            }
            let n: i64 = query
                .fetch_one(&self.inner.pool)
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|source| SinkError::Store {
                    operation: "read progress",
                    source,
                })?;
            if n > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
