//! Bootstrap bookkeeping in the store (see `docs/bootstrap.md`).
//!
//! `kausal_bootstrap` has one row per table being (or once) bootstrapped: the request
//! whose chunks count, the key where the next chunk starts, and `done`: 0 while chunks
//! are to come, 1 once the last one is applied, 2 once the store has applied every
//! transaction up to the last chunk's version (`done_seq`). Until then every stream write
//! to the table records its version in `kausal_rowv` (a delete too, a truncate a floor
//! under key `''`), and a chunk writes a row only where no version at or above its own
//! is recorded. A chunk is applied only once the store has applied every transaction up
//! to its version (the worker waits), so it never meets an older write after it, and it
//! never overwrites a newer one. At `done = 2` no chunk can come any more: the row
//! versions are dropped.

use super::dialect::Dialect;
use super::{int, SqlStore};
use crate::error::SinkError;
use crate::txn::{RowChange, Transaction};
use kausal_bus::Snapshot;
use serde_json::{Map, Value};
use sqlx::{AnyConnection, AssertSqlSafe, Row};
use std::collections::{HashMap, HashSet};

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

/// Row-lock suffixes: a chunk takes its table's bootstrap row exclusively, a group
/// writing that table shares it. SQLite has one writer at a time and needs neither.
fn exclusive(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => "",
        Dialect::Postgres | Dialect::MySql => " FOR UPDATE",
    }
}

/// Holds the bootstrap rows of `tables` shared, in the group's transaction, for a group
/// that writes them while other worker processes may apply chunks of them: without it
/// a chunk applied meanwhile would not see the group's row versions (uncommitted) and
/// would overwrite the group's newer rows once it committed.
///
/// Returns the tables among them whose bootstrap is still active as read under the
/// lock: one finished meanwhile (`done = 2`, its row versions dropped) records none.
pub(super) async fn share_tables(
    conn: &mut AnyConnection,
    d: Dialect,
    tables: &[(String, String)],
) -> Result<HashSet<(String, String)>, SinkError> {
    let suffix = match d {
        Dialect::Sqlite => return Ok(tables.iter().cloned().collect()),
        Dialect::Postgres => " FOR SHARE",
        Dialect::MySql => " LOCK IN SHARE MODE",
    };
    let mut active = HashSet::new();
    for (ns, table) in tables {
        let sql = format!(
            "SELECT done FROM kausal_bootstrap WHERE namespace = {} AND tbl = {}{suffix}",
            d.placeholder(1),
            d.placeholder(2)
        );
        let done: Option<i32> = sqlx::query(AssertSqlSafe(sql))
            .bind(ns.as_str())
            .bind(table.as_str())
            .fetch_optional(&mut *conn)
            .await
            .and_then(|r| r.map(|r| r.try_get(0)).transpose())
            .map_err(store("share a bootstrap row"))?;
        if done.is_some_and(|d| d < 2) {
            active.insert((ns.clone(), table.clone()));
        }
    }
    Ok(active)
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

/// The row versions a group's stream writes record in tables being bootstrapped, per
/// (namespace, table) and row key: the group's later write wins. Written in one
/// statement per table and batch ([`record`]), after the group's rows.
///
/// A stream write only records its version, it never reads one: chunks are applied only
/// once the store applied every transaction up to their version, so no write can meet a
/// newer chunk row, and two writes to one row come in source order (the causal gate).
/// The versions are there for the chunks: a chunk skips the rows the stream wrote after
/// its version.
#[derive(Debug, Default)]
pub(super) struct Versions(HashMap<(String, String), HashMap<String, u64>>);

impl Versions {
    /// Notes the write of `change` by the transaction numbered `seq` (both keys of a
    /// key change). A truncate is recorded at once ([`truncate`]), not here.
    pub(super) fn note(&mut self, namespace: &str, change: &RowChange, seq: u64) {
        let rows = self
            .0
            .entry((namespace.to_string(), change.source_table.clone()))
            .or_default();
        if let Some(old) = change.old_key.as_ref().filter(|o| **o != change.key) {
            rows.insert(key_text(old), seq);
        }
        rows.insert(key_text(&change.key), seq);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Forgets the notes of a table: a truncate newer than them is recorded.
    fn forget(&mut self, namespace: &str, table: &str) {
        self.0.remove(&(namespace.to_string(), table.to_string()));
    }
}

/// Records a truncate of version `seq`: the table's row versions (and the group's notes
/// of it) give way to a floor, under key `''`, that every chunk row older than it meets.
pub(super) async fn truncate(
    conn: &mut AnyConnection,
    d: Dialect,
    versions: &mut Versions,
    namespace: &str,
    table: &str,
    seq: u64,
) -> Result<(), SinkError> {
    versions.forget(namespace, table);
    let sql = format!(
        "DELETE FROM kausal_rowv WHERE namespace = {} AND tbl = {}",
        d.placeholder(1),
        d.placeholder(2)
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(namespace)
        .bind(table)
        .execute(&mut *conn)
        .await
        .map_err(store("truncate row versions"))?;
    set_versions(conn, d, namespace, table, &[(String::new(), seq)]).await
}

/// Writes the noted row versions (the notes are emptied).
pub(super) async fn record(
    conn: &mut AnyConnection,
    d: Dialect,
    versions: &mut Versions,
) -> Result<(), SinkError> {
    for ((namespace, table), rows) in std::mem::take(&mut versions.0) {
        let rows: Vec<(String, u64)> = rows.into_iter().collect();
        set_versions(conn, d, &namespace, &table, &rows).await?;
    }
    Ok(())
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

/// Records each (key, version) of `rows` (keys unique: a statement may not touch a row
/// twice).
async fn set_versions(
    conn: &mut AnyConnection,
    d: Dialect,
    namespace: &str,
    table: &str,
    rows: &[(String, u64)],
) -> Result<(), SinkError> {
    for batch in rows.chunks(BATCH) {
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
        for (k, seq) in batch {
            query = query
                .bind(namespace)
                .bind(table)
                .bind(k.as_str())
                .bind(int(*seq));
        }
        query
            .execute(&mut *conn)
            .await
            .map_err(store("record row versions"))?;
    }
    Ok(())
}

/// The rows applied so far by the bootstrap of `snapshot`'s table, if `snapshot` is a
/// chunk of its current request and the table still receives chunks.
async fn current_rows<'c>(
    conn: impl sqlx::Executor<'c, Database = sqlx::Any>,
    d: Dialect,
    namespace: &str,
    snapshot: &Snapshot,
    lock: bool,
) -> Result<Option<i64>, SinkError> {
    let sql = format!(
        "SELECT request, done, rows_applied FROM kausal_bootstrap \
         WHERE namespace = {} AND tbl = {}{}",
        d.placeholder(1),
        d.placeholder(2),
        if lock { exclusive(d) } else { "" }
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(namespace)
        .bind(snapshot.table.as_str())
        .fetch_optional(conn)
        .await
        .map_err(store("read bootstrap"))?;
    let Some(row) = row else { return Ok(None) };
    let request: String = row.try_get(0).map_err(store("read bootstrap"))?;
    let done: i32 = row.try_get(1).map_err(store("read bootstrap"))?;
    let rows: i64 = row.try_get(2).map_err(store("read bootstrap"))?;
    Ok((request == snapshot.request && done == 0).then_some(rows))
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
            // The bootstrap row first: its lock waits for the groups of other worker
            // processes that share it (they record row versions), so the delete sees
            // their versions; groups after it read `done = 2` and record none.
            for sql in [
                format!(
                    "UPDATE kausal_bootstrap SET done = 2 WHERE namespace = {} AND tbl = {}",
                    p[0], p[1]
                ),
                format!(
                    "DELETE FROM kausal_rowv WHERE namespace = {} AND tbl = {}",
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

    /// Whether a chunk belongs to the current request of a table still receiving
    /// chunks (else [`SqlStore::apply_chunk`] ignores it).
    pub async fn chunk_is_current(
        &self,
        namespace: &str,
        snapshot: &Snapshot,
    ) -> Result<bool, SinkError> {
        let rows = current_rows(
            &self.inner.pool,
            self.inner.dialect,
            namespace,
            snapshot,
            false,
        )
        .await?;
        Ok(rows.is_some())
    }

    /// Applies one chunk (`tx`, assembled from its envelope) in one store transaction:
    /// each row only where the store has nothing newer, the sinks after, and the
    /// bootstrap's progress. Chunks of another request or of a finished table are
    /// ignored. The caller applies a chunk only once the store has applied every
    /// transaction of the stream up to the chunk's version (`tx.id.seq`), and with no
    /// store transaction of the stream in flight (docs/bootstrap.md).
    pub async fn apply_chunk(
        &self,
        mut tx: Transaction,
        snapshot: &Snapshot,
    ) -> Result<ChunkApplied, SinkError> {
        let d = self.inner.dialect;
        let ns = tx.id.namespace.to_string();
        // Taken by value and never cloned: a chunk is thousands of rows, and copying
        // them was most of the subscriber's CPU in a bootstrap (profile in BENCHMARKS.md).
        let tables = self
            .prepare_shapes(tx.changes.iter().map(|c| &c.shape))
            .await?;
        let mut conn = self.begin().await?;
        // The table's bootstrap row, locked: a group of another worker process that
        // writes this table holds it shared until it commits, so the versions read
        // below include every stream write that could be newer than this chunk, and no
        // such group starts until the chunk is committed (see [`share_tables`]).
        let Some(before) = current_rows(&mut *conn, d, &ns, snapshot, true).await? else {
            return Ok(ChunkApplied {
                written: 0,
                rows_applied: 0,
                done: false,
                current: false,
            });
        };
        let newer = newer_versions(&mut conn, d, &ns, &snapshot.table, &tx).await?;
        let rows = tx.changes.len() as u64;
        if !newer.is_empty() {
            tx.changes.retain(|c| !newer.contains(&key_text(&c.key)));
        }
        let written = tx.changes.len() as u64;
        // The chunk's rows as set-based statements (see `super::rows`).
        let mut batch = super::batch::Batch::default();
        for change in tx
            .changes
            .iter()
            .filter(|c| c.shape.mode != crate::table::TableMode::None)
        {
            batch.add(change, tx.id.seq)?;
        }
        for table in &batch.tables {
            super::rows::write(&mut conn, d, &tables[&table.shape.name], table).await?;
        }
        drop(batch);
        // No row versions for the chunk's rows: it is applied only once the store
        // applied every transaction up to its version (the worker waits for that), so
        // every later write to its rows is newer and goes ahead anyway. Writing a
        // version per row was most of a chunk's store time, and grew the table the
        // stream's writes look their versions up in to one row per bootstrapped row.
        // Sinks keep their own versions; they get the rows the store took.
        let applied = async {
            self.sinks.apply(&tx).await?;
            self.sinks.flush().await
        }
        .await;
        if let Err(error) = applied {
            self.sinks.abort().await;
            return Err(error);
        }
        let rows_applied = before.max(0) as u64 + rows;
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
