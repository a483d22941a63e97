//! Bootstrap bookkeeping in the store (see `docs/bootstrap.md`).
//!
//! `kausal_bootstrap` has one row per table being (or once) bootstrapped: the request
//! whose chunks count, the key where the next chunk starts, and `done`: 0 while chunks
//! are to come, 1 once the last one is applied, 2 once the store has applied every
//! transaction up to the last chunk's version (`done_seq`). Until then every write to
//! the table — chunk rows and stream changes alike — goes through its row version in
//! `kausal_rowv`: a write is applied only when its version is newer than the row's (a
//! delete leaves its version behind, a truncate a floor under key `''`). So a chunk
//! read after a change is never overwritten by that change arriving late, and a chunk
//! never overwrites a newer change, whatever order they arrive in. At `done = 2` no
//! older change can arrive any more: the row versions are dropped.

use super::dialect::Dialect;
use super::{int, SqlStore};
use crate::error::SinkError;
use crate::txn::{RowChange, Transaction};
use kausal_bus::{Op, Snapshot};
use serde_json::{Map, Value};
use sqlx::{AnyConnection, AssertSqlSafe, Row};
use std::collections::HashSet;

/// A bootstrap the store has not finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Unfinished {
    pub namespace: String,
    pub table: String,
    pub request: String,
    pub last_key: Option<Map<String, Value>>,
    pub rows_applied: u64,
}

/// What applying a chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkApplied {
    /// Rows written (the others were older than what the store has).
    pub written: u64,
    /// Rows of the table applied by this bootstrap so far.
    pub rows_applied: u64,
    /// The table's last chunk: its bootstrap is complete.
    pub done: bool,
    /// `false`: the chunk belongs to an earlier request or a finished table: ignored.
    pub current: bool,
}

fn store(operation: &'static str) -> impl Fn(sqlx::Error) -> SinkError {
    move |source| SinkError::Store { operation, source }
}

pub(super) async fn load_active<'c>(
    conn: impl sqlx::Executor<'c, Database = sqlx::Any>,
) -> Result<HashSet<(String, String)>, SinkError> {
    let rows = sqlx::query("SELECT namespace, tbl FROM kausal_bootstrap WHERE done < 2")
        .fetch_all(conn)
        .await
        .map_err(store("read bootstraps"))?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(store("read bootstraps"))
}

/// Decides whether a write of version `seq` to the row of `change` goes ahead, and if so
/// records `seq` as the row's version. Only for tables being bootstrapped.
pub(super) async fn admit(
    conn: &mut AnyConnection,
    d: Dialect,
    namespace: &str,
    change: &RowChange,
    seq: u64,
) -> Result<bool, SinkError> {
    let table = &change.source_table;
    if change.op == Op::Truncate {
        let sql = format!(
            "DELETE FROM kausal_rowv WHERE namespace = {} AND tbl = {}",
            d.placeholder(1),
            d.placeholder(2)
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(namespace)
            .bind(table.as_str())
            .execute(&mut *conn)
            .await
            .map_err(store("truncate row versions"))?;
        set_versions(conn, d, namespace, table, &[String::new()], seq).await?;
        return Ok(true);
    }
    let mut keys = vec![key_text(&change.key)];
    if let Some(old) = change.old_key.as_ref().filter(|o| **o != change.key) {
        keys.push(key_text(old));
    }
    let sql = format!(
        "SELECT MAX(seq) FROM kausal_rowv WHERE namespace = {} AND tbl = {} AND k IN ({}, {}, {})",
        d.placeholder(1),
        d.placeholder(2),
        d.placeholder(3),
        d.placeholder(4),
        d.placeholder(5)
    );
    // Not a cached statement: its plan would be the one made while the table was empty
    // (a sequential scan), kept while the table grows to millions of rows.
    let newest: Option<i64> = sqlx::query(AssertSqlSafe(sql))
        .persistent(false)
        .bind(namespace)
        .bind(table.as_str())
        .bind("")
        .bind(keys[0].as_str())
        .bind(keys.get(1).map_or("", |k| k.as_str()))
        .fetch_one(&mut *conn)
        .await
        .and_then(|r| r.try_get(0))
        .map_err(store("read row versions"))?;
    // Strictly newer: a transaction changing a row twice (insert, then update) writes
    // both; a replayed transaction never gets here (`kausal_applied`).
    if newest.is_some_and(|v| v > int(seq)) {
        return Ok(false);
    }
    set_versions(conn, d, namespace, table, &keys, seq).await?;
    Ok(true)
}

/// Rows per statement of the batched row-version reads and writes: 4 parameters per
/// row written, under SQLite's 32,766 and Postgres's and MySQL's 65,535 (a chunk of the
/// default 2,000 rows is two statements each way).
const BATCH: usize = 1_000;

/// Keys of `tx`'s rows whose recorded version (or the table's floor) is at least the
/// chunk's: the store has something newer.
async fn newer_versions(
    conn: &mut AnyConnection,
    d: Dialect,
    namespace: &str,
    table: &str,
    tx: &Transaction,
) -> Result<HashSet<String>, SinkError> {
    let seq = int(tx.id.seq);
    let keys: Vec<String> = tx.changes.iter().map(|c| key_text(&c.key)).collect();
    let mut out = HashSet::new();
    let mut floor = false;
    for batch in keys.chunks(BATCH) {
        let list: Vec<String> = (0..=batch.len()).map(|i| d.placeholder(i + 4)).collect();
        let sql = format!(
            "SELECT k FROM kausal_rowv WHERE namespace = {} AND tbl = {} AND seq >= {} \
             AND k IN ({})",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3),
            list.join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .persistent(false)
            .bind(namespace)
            .bind(table)
            .bind(seq)
            .bind("");
        for k in batch {
            query = query.bind(k.as_str());
        }
        for row in query
            .fetch_all(&mut *conn)
            .await
            .map_err(store("read row versions"))?
        {
            let k: String = row.try_get(0).map_err(store("read row versions"))?;
            floor |= k.is_empty();
            out.insert(k);
        }
    }
    if floor {
        // A truncate newer than the chunk: none of its rows may come back.
        out.extend(keys);
    }
    Ok(out)
}

/// Records `seq` as the version of every key in `keys`.
async fn set_versions(
    conn: &mut AnyConnection,
    d: Dialect,
    namespace: &str,
    table: &str,
    keys: &[String],
    seq: u64,
) -> Result<(), SinkError> {
    for batch in keys.chunks(BATCH) {
        let rows: Vec<String> = (0..batch.len())
            .map(|i| {
                let b = 4 * i;
                format!(
                    "({}, {}, {}, {})",
                    d.placeholder(b + 1),
                    d.placeholder(b + 2),
                    d.placeholder(b + 3),
                    d.placeholder(b + 4)
                )
            })
            .collect();
        let insert = format!(
            "INSERT INTO kausal_rowv (namespace, tbl, k, seq) VALUES {}",
            rows.join(", ")
        );
        let sql = match d {
            Dialect::MySql => format!("{insert} ON DUPLICATE KEY UPDATE seq = VALUES(seq)"),
            Dialect::Postgres | Dialect::Sqlite => {
                format!("{insert} ON CONFLICT (namespace, tbl, k) DO UPDATE SET seq = excluded.seq")
            }
        };
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
        for k in batch {
            query = query
                .bind(namespace)
                .bind(table)
                .bind(k.as_str())
                .bind(int(seq));
        }
        query
            .execute(&mut *conn)
            .await
            .map_err(store("record row versions"))?;
    }
    Ok(())
}

fn key_text(key: &Map<String, Value>) -> String {
    serde_json::to_string(key).unwrap_or_default()
}

impl SqlStore {
    /// Ends the row versions of tables of `namespace` whose chunks are all applied and
    /// whose last chunk's version the store has applied everything up to (`through`,
    /// the compacted watermark of `generation`).
    pub async fn finish_bootstraps(
        &self,
        namespace: &str,
        generation: u64,
        through: u64,
    ) -> Result<(), SinkError> {
        if !self.bootstrapping().iter().any(|(ns, _)| ns == namespace) {
            return Ok(());
        }
        let d = self.inner.dialect;
        let p: Vec<String> = (1..=3).map(|n| d.placeholder(n)).collect();
        let sql = format!(
            "SELECT tbl FROM kausal_bootstrap WHERE namespace = {} AND done = 1 \
             AND generation = {} AND done_seq <= {}",
            p[0], p[1], p[2]
        );
        let tables: Vec<String> = sqlx::query(AssertSqlSafe(sql))
            .bind(namespace)
            .bind(int(generation))
            .bind(int(through))
            .fetch_all(&self.inner.pool)
            .await
            .and_then(|rows| rows.iter().map(|r| r.try_get(0)).collect())
            .map_err(store("read bootstraps"))?;
        for table in tables {
            let mut conn = self.begin().await?;
            for sql in [
                format!(
                    "DELETE FROM kausal_rowv WHERE namespace = {} AND tbl = {}",
                    p[0], p[1]
                ),
                format!(
                    "UPDATE kausal_bootstrap SET done = 2 WHERE namespace = {} AND tbl = {}",
                    p[0], p[1]
                ),
            ] {
                sqlx::query(AssertSqlSafe(sql))
                    .bind(namespace)
                    .bind(table.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(store("finish a bootstrap"))?;
            }
            conn.commit().await.map_err(store("commit"))?;
            self.bootstrapping()
                .remove(&(namespace.to_string(), table.clone()));
            tracing::info!(namespace, table = %table, through, "bootstrap finished: row versions dropped");
        }
        Ok(())
    }

    /// Starts (or restarts) the bootstrap of `tables` (published names) of `namespace`
    /// under `request`: from now on their writes keep row versions, and only chunks of
    /// this request count. A table already done is started over.
    pub async fn begin_bootstrap(
        &self,
        namespace: &str,
        tables: &[String],
        request: &str,
        resume: bool,
    ) -> Result<(), SinkError> {
        let d = self.inner.dialect;
        let mut tx = self.inner.pool.begin().await.map_err(store("begin"))?;
        for table in tables {
            let values: Vec<String> = (1..=3).map(|n| d.placeholder(n)).collect();
            let insert = format!(
                "INSERT INTO kausal_bootstrap (namespace, tbl, request, last_key, done, \
                 rows_applied, generation, done_seq) VALUES ({}, NULL, 0, 0, 0, 0)",
                values.join(", ")
            );
            // A resumed bootstrap keeps its position and counts; a new one starts over.
            let update = if resume {
                "request = {r}, done = 0"
            } else {
                "request = {r}, done = 0, last_key = NULL, rows_applied = 0"
            };
            let sql = match d {
                Dialect::MySql => format!(
                    "{insert} ON DUPLICATE KEY UPDATE {}",
                    update.replace("{r}", "VALUES(request)")
                ),
                Dialect::Postgres | Dialect::Sqlite => format!(
                    "{insert} ON CONFLICT (namespace, tbl) DO UPDATE SET {}",
                    update.replace("{r}", "excluded.request")
                ),
            };
            sqlx::query(AssertSqlSafe(sql))
                .bind(namespace)
                .bind(table.as_str())
                .bind(request)
                .execute(&mut *tx)
                .await
                .map_err(store("record a bootstrap"))?;
        }
        tx.commit().await.map_err(store("commit"))?;
        let mut active = self.bootstrapping();
        for table in tables {
            active.insert((namespace.to_string(), table.clone()));
        }
        Ok(())
    }

    /// `(namespace, table)` whose bootstrap has received all its chunks.
    pub async fn bootstrapped_tables(&self) -> Result<HashSet<(String, String)>, SinkError> {
        let rows = sqlx::query("SELECT namespace, tbl FROM kausal_bootstrap WHERE done >= 1")
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store("read bootstraps"))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store("read bootstraps"))
    }

    /// `(namespace, generation)` of bootstraps whose chunks are all applied but whose
    /// row versions are not dropped yet (`done = 1`).
    pub async fn finishing_bootstraps(&self) -> Result<HashSet<(String, u64)>, SinkError> {
        let rows = sqlx::query("SELECT namespace, generation FROM kausal_bootstrap WHERE done = 1")
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store("read bootstraps"))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get::<i64, _>(1)?.max(0) as u64)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store("read bootstraps"))
    }

    /// Bootstraps not finished (a worker stopped in the middle): resumed at start.
    pub async fn unfinished_bootstraps(&self) -> Result<Vec<Unfinished>, SinkError> {
        let rows = sqlx::query(
            "SELECT namespace, tbl, request, last_key, rows_applied FROM kausal_bootstrap \
             WHERE done = 0 ORDER BY namespace, tbl",
        )
        .fetch_all(&self.inner.pool)
        .await
        .map_err(store("read bootstraps"))?;
        let mut out = Vec::new();
        for r in rows {
            let last: Option<String> = r.try_get(3).map_err(store("read bootstraps"))?;
            let applied: i64 = r.try_get(4).map_err(store("read bootstraps"))?;
            out.push(Unfinished {
                namespace: r.try_get(0).map_err(store("read bootstraps"))?,
                table: r.try_get(1).map_err(store("read bootstraps"))?,
                request: r.try_get(2).map_err(store("read bootstraps"))?,
                last_key: last.and_then(|t| serde_json::from_str(&t).ok()),
                rows_applied: applied.max(0) as u64,
            });
        }
        Ok(out)
    }

    /// Applies one chunk (`tx`, assembled from its envelope) in one store transaction:
    /// each row only where the store has nothing newer, the sinks after, and the
    /// bootstrap's progress. Chunks of another request or of a finished table are
    /// ignored.
    pub async fn apply_chunk(
        &self,
        tx: &Transaction,
        snapshot: &Snapshot,
    ) -> Result<ChunkApplied, SinkError> {
        let d = self.inner.dialect;
        let ns = tx.id.namespace.to_string();
        let tables = self
            .prepare_tables(std::slice::from_ref(&std::sync::Arc::new(tx.clone())))
            .await?;
        let mut conn = self.begin().await?;
        let sql = format!(
            "SELECT request, done, rows_applied FROM kausal_bootstrap \
             WHERE namespace = {} AND tbl = {}",
            d.placeholder(1),
            d.placeholder(2)
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(ns.as_str())
            .bind(snapshot.table.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(store("read bootstrap"))?;
        let ignored = ChunkApplied {
            written: 0,
            rows_applied: 0,
            done: false,
            current: false,
        };
        let Some(row) = row else { return Ok(ignored) };
        let request: String = row.try_get(0).map_err(store("read bootstrap"))?;
        let done: i32 = row.try_get(1).map_err(store("read bootstrap"))?;
        let before: i64 = row.try_get(2).map_err(store("read bootstrap"))?;
        if request != snapshot.request || done != 0 {
            return Ok(ignored);
        }
        let newer = newer_versions(&mut conn, d, &ns, &snapshot.table, tx).await?;
        let mut written = 0;
        let mut kept = Vec::with_capacity(tx.changes.len());
        for change in &tx.changes {
            if newer.contains(&key_text(&change.key)) {
                continue;
            }
            written += 1;
            kept.push(change.clone());
        }
        // The chunk's rows as set-based statements (see `super::rows`).
        let mut batch = super::batch::Batch::default();
        for change in kept
            .iter()
            .filter(|c| c.shape.mode != crate::config::TableMode::None)
        {
            batch.add(change, tx.id.seq)?;
        }
        for table in &batch.tables {
            super::rows::write(&mut conn, d, &tables[&table.shape.name], table).await?;
        }
        let keys: Vec<String> = kept.iter().map(|c| key_text(&c.key)).collect();
        set_versions(&mut conn, d, &ns, &snapshot.table, &keys, tx.id.seq).await?;
        // Sinks keep their own versions; they get the rows the store took.
        let sinks_tx = Transaction {
            changes: kept,
            ..tx.clone()
        };
        let applied = async {
            self.sinks.apply(&sinks_tx).await?;
            self.sinks.flush().await
        }
        .await;
        if let Err(error) = applied {
            self.sinks.abort().await;
            return Err(error);
        }
        let rows_applied = before.max(0) as u64 + tx.changes.len() as u64;
        let p: Vec<String> = (1..=7).map(|n| d.placeholder(n)).collect();
        let sql = format!(
            "UPDATE kausal_bootstrap SET last_key = {}, done = {}, rows_applied = {}, \
             generation = {}, done_seq = {} WHERE namespace = {} AND tbl = {}",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6]
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(
                snapshot
                    .last_key
                    .as_ref()
                    .map(|k| Value::Object(k.clone()).to_string()),
            )
            .bind(i32::from(snapshot.done))
            .bind(int(rows_applied))
            .bind(int(tx.id.generation))
            .bind(int(tx.id.seq))
            .bind(ns.as_str())
            .bind(snapshot.table.as_str())
            .execute(&mut *conn)
            .await
            .map_err(store("record bootstrap progress"))?;
        conn.commit().await.map_err(store("commit"))?;
        // A worker that did not ask for this bootstrap learns of it here at the latest.
        self.bootstrapping()
            .insert((ns.clone(), snapshot.table.clone()));
        Ok(ChunkApplied {
            written,
            rows_applied,
            done: snapshot.done,
            current: true,
        })
    }
}
