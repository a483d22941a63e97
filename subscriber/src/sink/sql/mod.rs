//! The SQL store: the read model and Kausal's bookkeeping in one database (Postgres,
//! MySQL/MariaDB or SQLite), so a transaction's rows, its callbacks' effects on the
//! store and the record that it was applied commit together.
//!
//! - [`dialect`]: the SQL text that differs between databases.
//! - [`schema`]: mirrored tables created and widened, mapped tables checked.
//! - [`batch`]: a group's row changes coalesced per key, in order.
//! - [`rows`]: those as set-based deletes and multi-row upserts.
//! - [`value`]: JSON values to bound parameters, per destination column type.
//! - [`staging`]: parts of split transactions, kept in `kausal_parts` until all are
//!   there, whichever worker received them.
//! - [`bootstrap`]: chunks of an initial sync, and row versions while one runs.
//!
//! Bookkeeping: `kausal_applied` holds the seq of every applied transaction above the
//! compacted watermark `kausal_progress.through` of its (namespace, generation). A
//! transaction found in either is skipped, which makes redelivery harmless. Applying a
//! split transaction deletes its staged parts; compaction deletes those it covers.

mod batch;
mod bootstrap;
mod dialect;
mod follow;
mod rows;
mod schema;
mod staging;
mod value;
mod workers;

pub use bootstrap::{ChunkApplied, Unfinished};
pub use dialect::Dialect;
pub use workers::{read_progress, read_statuses};

use crate::config::TableMode;
use crate::error::SinkError;
use crate::sink::callback::{Callbacks, StoreTx};
use crate::txn::{Staged, Transaction};
use kausal_bus::Op;
use schema::{TableInfo, Tables};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool};
use sqlx::{AssertSqlSafe, Connection, Executor, Row};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// The `operation` of the [`SinkError::Store`] returned when another worker recorded
/// the same transaction as applied while this group ran. Retrying finds it applied.
pub const CONCURRENT_APPLY: &str = "record applied (concurrent apply)";

/// Connections of a Postgres or MySQL pool: a few groups in flight at once.
const POOL_SIZE: u32 = 8;
/// SQLite has a single writer anyway; one connection avoids `SQLITE_BUSY` between our
/// own connections.
const SQLITE_POOL_SIZE: u32 = 1;
/// How long a write waits for a SQLite lock held by another process.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;
/// How long to wait for a connection (a server that does not answer is unreachable).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A SQL database holding the read model and Kausal's bookkeeping. Cheap to clone.
#[derive(Clone)]
pub struct SqlStore {
    inner: Arc<Inner>,
    /// Sinks beside the store, applied inside its transactions.
    sinks: crate::sink::Sinks,
}

struct Inner {
    pool: AnyPool,
    dialect: Dialect,
    tables: Tables,
    /// (namespace, published table) being bootstrapped: their writes keep row versions.
    bootstrapping: std::sync::Mutex<HashSet<(String, String)>>,
    /// Other worker processes write this store: read the bootstraps in every group's
    /// transaction (another worker may have started one since).
    shared: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("dialect", &self.inner.dialect)
            .finish_non_exhaustive()
    }
}

/// Creates the bookkeeping tables if missing. On Postgres in one transaction under an
/// advisory lock: `CREATE TABLE IF NOT EXISTS` is not safe against itself, and worker
/// processes started together would otherwise fail on the catalog's unique index (and
/// retry their start). MySQL and SQLite serialize DDL themselves.
async fn create_bookkeeping(pool: &AnyPool, dialect: Dialect) -> Result<(), sqlx::Error> {
    if dialect != Dialect::Postgres {
        for ddl in dialect.bookkeeping_ddl() {
            pool.execute(AssertSqlSafe(ddl)).await?;
        }
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    // A constant key: "kausal" in ASCII.
    (&mut *tx)
        .execute("SELECT pg_advisory_xact_lock(107971117115971)")
        .await?;
    for ddl in dialect.bookkeeping_ddl() {
        (&mut *tx).execute(AssertSqlSafe(ddl)).await?;
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

    /// The store with `sinks` applied in its transactions, after the rows of each
    /// transaction and before its callbacks.
    pub fn with_sinks(mut self, sinks: crate::sink::Sinks) -> SqlStore {
        self.sinks = sinks;
        self
    }

    /// Other worker processes share this store (Redis coordination).
    pub fn set_shared(&self) {
        self.inner
            .shared
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn bootstrapping(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
        self.inner
            .bootstrapping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn dialect(&self) -> Dialect {
        self.inner.dialect
    }

    /// The pool, for callers that read the store (tests, health checks).
    pub fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// The compacted watermark of (namespace, generation) (0 if none) and the seqs
    /// applied above it, ascending.
    pub async fn progress(
        &self,
        namespace: &str,
        generation: u64,
    ) -> Result<(u64, Vec<u64>), SinkError> {
        let d = self.inner.dialect;
        let store = |source| SinkError::Store {
            operation: "read progress",
            source,
        };
        let sql = format!(
            "SELECT {} FROM kausal_progress WHERE namespace = {} AND generation = {}",
            d.quote("through"),
            d.placeholder(1),
            d.placeholder(2)
        );
        let through: i64 = sqlx::query(AssertSqlSafe(sql))
            .bind(namespace)
            .bind(int(generation))
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(store)?
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(store)?
            .unwrap_or(0);
        let sql = format!(
            "SELECT seq FROM kausal_applied WHERE namespace = {} AND generation = {} \
             AND seq > {} ORDER BY seq",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3)
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(namespace)
            .bind(int(generation))
            .bind(through)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store)?;
        let applied = rows
            .iter()
            .map(|row| row.try_get::<i64, _>(0).map(|s| s as u64))
            .collect::<Result<Vec<_>, _>>()
            .map_err(store)?;
        Ok((through as u64, applied))
    }

    /// Raises the compacted watermark of (namespace, generation) to `through` (never
    /// lowers it) and forgets the applied seqs and staged parts it covers. The caller
    /// knows every seq up to `through` is applied.
    pub async fn compact(
        &self,
        namespace: &str,
        generation: u64,
        through: u64,
    ) -> Result<(), SinkError> {
        let d = self.inner.dialect;
        let store = |source| SinkError::Store {
            operation: "compact progress",
            source,
        };
        let mut tx = self.begin().await?;
        sqlx::query(AssertSqlSafe(d.raise_progress()))
            .bind(namespace)
            .bind(int(generation))
            .bind(int(through))
            .execute(&mut *tx)
            .await
            .map_err(store)?;
        let sql = format!(
            "DELETE FROM kausal_applied WHERE namespace = {} AND generation = {} AND seq <= {}",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3)
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(namespace)
            .bind(int(generation))
            .bind(int(through))
            .execute(&mut *tx)
            .await
            .map_err(store)?;
        staging::forget_through(&mut tx, d, namespace, generation, through).await?;
        tx.commit().await.map_err(store)
    }

    /// Applies a group of mutually independent transactions in one database
    /// transaction. Per transaction, in order: skipped (`false`) when already applied;
    /// else its rows are written, its callbacks run and it is recorded as applied
    /// (`true`). Either way the staged parts of a split transaction are deleted. Any
    /// error rolls the whole group back.
    pub async fn apply_group(
        &self,
        group: &[Arc<Transaction>],
        callbacks: &Callbacks,
    ) -> Result<Vec<bool>, SinkError> {
        let tables = self.prepare_tables(group).await?;
        // Shared with the callbacks, which may read through it.
        let tx = StoreTx::new(self.begin().await?);
        let applied = async {
            if self.inner.shared.load(std::sync::atomic::Ordering::Relaxed) {
                // A bootstrap begun by another worker commits before its request goes
                // out, so before any change a chunk could be older than: this read sees
                // it.
                let mut conn = tx.held().await?;
                let mut active = bootstrap::load_active(&mut *conn).await?;
                let mut touched: Vec<(String, String)> = group
                    .iter()
                    .flat_map(|t| {
                        t.changes
                            .iter()
                            .map(|c| (t.id.namespace.to_string(), c.source_table.clone()))
                    })
                    .filter(|k| active.contains(k))
                    .collect();
                touched.sort();
                touched.dedup();
                let still =
                    bootstrap::share_tables(&mut conn, self.inner.dialect, &touched).await?;
                active.retain(|k| !touched.contains(k) || still.contains(k));
                *self.bootstrapping() = active;
            }
            let applied = self.apply_in(&tx, group, callbacks, &tables).await?;
            self.sinks.flush().await?;
            Ok(applied)
        }
        .await;
        if applied.is_err() {
            self.sinks.abort().await;
        }
        let Some(tx) = tx.take().await else {
            return Err(SinkError::Store {
                operation: "commit",
                source: sqlx::Error::PoolClosed,
            });
        };
        match applied {
            Ok(applied) => {
                tx.commit().await.map_err(|source| SinkError::Store {
                    operation: "commit",
                    source,
                })?;
                Ok(applied)
            }
            Err(error) => {
                if let Err(rollback) = tx.rollback().await {
                    tracing::debug!(error = %rollback, "rollback failed");
                }
                // A table changed behind our back shows up as a write error: read the
                // catalog again on the retry.
                if matches!(error, SinkError::Store { .. } | SinkError::Write(_)) {
                    self.inner.tables.forget().await;
                }
                Err(error)
            }
        }
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, SinkError> {
        let pool = &self.inner.pool;
        let begun = match self.inner.dialect {
            // Take the write lock up front: a deferred transaction that read first fails
            // with SQLITE_BUSY_SNAPSHOT when another process wrote in between.
            Dialect::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres | Dialect::MySql => pool.begin().await,
        };
        begun.map_err(|source| SinkError::Store {
            operation: "begin",
            source,
        })
    }

    /// Creates or checks every destination table of the group, before the transaction
    /// (DDL commits implicitly on MySQL).
    async fn prepare_tables(
        &self,
        group: &[Arc<Transaction>],
    ) -> Result<HashMap<String, Arc<TableInfo>>, SinkError> {
        let shapes = group.iter().flat_map(|tx| match &tx.staged {
            Some(staged) => staged.shapes.iter().collect::<Vec<_>>(),
            None => tx.changes.iter().map(|c| &c.shape).collect(),
        });
        self.prepare_shapes(shapes).await
    }

    /// Creates or checks the destination table of each shape.
    async fn prepare_shapes(
        &self,
        shapes: impl Iterator<Item = &Arc<crate::txn::TableShape>>,
    ) -> Result<HashMap<String, Arc<TableInfo>>, SinkError> {
        // Shapes are shared per table and column set: one check per distinct shape.
        let mut seen: HashSet<usize> = HashSet::new();
        let mut tables = HashMap::new();
        for shape in shapes {
            if shape.mode == TableMode::None || !seen.insert(Arc::as_ptr(shape) as usize) {
                continue;
            }
            let info = self
                .inner
                .tables
                .ensure(&self.inner.pool, self.inner.dialect, shape)
                .await?;
            tables.insert(shape.name.clone(), info);
        }
        Ok(tables)
    }

    async fn apply_in(
        &self,
        store: &StoreTx,
        group: &[Arc<Transaction>],
        callbacks: &Callbacks,
        tables: &HashMap<String, Arc<TableInfo>>,
    ) -> Result<Vec<bool>, SinkError> {
        let dialect = self.inner.dialect;
        let mut conn = store.held().await?;
        let done = already_applied(&mut conn, dialect, group).await?;
        let mut seen = HashSet::new();
        let fresh: Vec<bool> = group
            .iter()
            .map(|tx| {
                let id = &tx.id;
                let stream = (id.namespace.clone(), id.generation);
                let through = done.through.get(&stream).copied().unwrap_or(0);
                id.seq > through && !done.seqs.contains(&(stream, id.seq)) && seen.insert(id)
            })
            .collect();
        // Claim first, then write and call back. Another worker applying the same
        // transaction at the same time (a publisher's replay delivered to two workers)
        // holds the same bookkeeping row: this insert waits for its commit and then
        // fails as a concurrent apply, before any callback of this group ran — so
        // callbacks run once even then. One statement records the whole group (a round
        // trip per transaction was a fifth of the statements of a pgbench transaction).
        let newly: Vec<&Transaction> = group
            .iter()
            .zip(&fresh)
            .filter(|(_, f)| **f)
            .map(|(t, _)| t.as_ref())
            .collect();
        for chunk in newly.chunks(RECORD_CHUNK) {
            record_applied(&mut conn, dialect, chunk).await?;
        }
        drop(conn);
        // Rows first, coalesced into a few set-based statements (`batch`, `rows`); then
        // sinks and callbacks, transaction by transaction in order. A transaction with
        // callbacks ends a batch: its callbacks see the store as of that transaction
        // (the rows of those before it in the group and its own, none of those after
        // it: a user deleted later in the group is still there for the callback of a
        // message posted to it). A staged split transaction is applied part by part
        // where it stands in the group, after what came before it is written.
        let mut batch = batch::Batch::default();
        let mut pending: Vec<&Transaction> = Vec::new();
        let mut applied = Vec::with_capacity(group.len());
        for (tx, fresh) in group.iter().zip(fresh) {
            let id = &tx.id;
            if !fresh {
                if tx.parts > 1 {
                    let mut conn = store.held().await?;
                    staging::forget(&mut conn, dialect, &id.namespace, id.generation, id.seq)
                        .await?;
                }
                tracing::debug!(tx = %id, "already applied, skipped");
                applied.push(false);
                continue;
            }
            match &tx.staged {
                Some(staged) => {
                    self.write_pending(store, &mut batch, &mut pending, callbacks, tables)
                        .await?;
                    self.apply_staged(store, tx, staged, callbacks, tables)
                        .await?;
                }
                None => {
                    let mut conn = store.held().await?;
                    if tx.parts > 1 {
                        staging::forget(&mut conn, dialect, &id.namespace, id.generation, id.seq)
                            .await?;
                    }
                    self.add_changes(&mut conn, &mut batch, tx).await?;
                    drop(conn);
                    pending.push(tx);
                    if callbacks.wants(tx) {
                        self.write_pending(store, &mut batch, &mut pending, callbacks, tables)
                            .await?;
                    }
                }
            }
            applied.push(true);
        }
        self.write_pending(store, &mut batch, &mut pending, callbacks, tables)
            .await?;
        Ok(applied)
    }

    /// Adds the changes of `tx` to `batch`, and the row versions of those to tables
    /// being bootstrapped.
    async fn add_changes<'a>(
        &self,
        conn: &mut AnyConnection,
        batch: &mut batch::Batch<'a>,
        tx: &'a Transaction,
    ) -> Result<(), SinkError> {
        let id = &tx.id;
        for change in &tx.changes {
            let guarded = {
                let active = self.bootstrapping();
                !active.is_empty()
                    && active.contains(&(id.namespace.to_string(), change.source_table.clone()))
            };
            if guarded {
                if change.op == Op::Truncate {
                    let (ns, table) = (&id.namespace, &change.source_table);
                    bootstrap::truncate(
                        conn,
                        self.inner.dialect,
                        &mut batch.versions,
                        ns,
                        table,
                        id.seq,
                    )
                    .await?;
                } else {
                    batch.versions.note(&id.namespace, change, id.seq);
                }
            }
            if change.shape.mode == TableMode::None {
                continue;
            }
            batch.add(change, id.seq)?;
        }
        Ok(())
    }

    /// Writes `batch`, then runs the sinks and callbacks of the transactions it holds,
    /// in order; both are left empty.
    async fn write_pending(
        &self,
        store: &StoreTx,
        batch: &mut batch::Batch<'_>,
        pending: &mut Vec<&Transaction>,
        callbacks: &Callbacks,
        tables: &HashMap<String, Arc<TableInfo>>,
    ) -> Result<(), SinkError> {
        let mut written = std::mem::take(batch);
        if !written.tables.is_empty() || !written.versions.is_empty() {
            let mut conn = store.held().await?;
            self.write_batch(&mut conn, &mut written, tables).await?;
        }
        // Callbacks may lock the store transaction themselves: it is not held here.
        for tx in pending.drain(..) {
            self.sinks.apply(tx).await?;
            callbacks.run(tx, store).await?;
        }
        Ok(())
    }

    /// Writes the rows of `batch`, then its row versions.
    async fn write_batch(
        &self,
        conn: &mut AnyConnection,
        batch: &mut batch::Batch<'_>,
        tables: &HashMap<String, Arc<TableInfo>>,
    ) -> Result<(), SinkError> {
        let d = self.inner.dialect;
        for table in &batch.tables {
            rows::write(conn, d, &tables[&table.shape.name], table).await?;
        }
        bootstrap::record(conn, d, &mut batch.versions).await
    }

    /// Applies a staged split transaction part by part, reading each part from the
    /// staging table inside the store transaction, then deletes its parts: memory holds
    /// one part at a time, and the transaction stays atomic in the store. Sinks and
    /// callbacks get each part as a view of the transaction ([`Transaction::part`]);
    /// callback events keep their index in the whole transaction.
    async fn apply_staged(
        &self,
        store: &StoreTx,
        tx: &Transaction,
        staged: &Staged,
        callbacks: &Callbacks,
        tables: &HashMap<String, Arc<TableInfo>>,
    ) -> Result<(), SinkError> {
        let d = self.inner.dialect;
        let mut index = 0;
        for part in 0..staged.parts {
            let mut conn = store.held().await?;
            let envelope = staging::load_part(&mut conn, d, &tx.id, part)
                .await?
                .ok_or(SinkError::Store {
                    // Deleted since it was admitted: another worker applied it (the
                    // retry finds it applied) or dead-lettered it.
                    operation: "read staged parts",
                    source: sqlx::Error::RowNotFound,
                })?;
            let view = staged
                .part(&envelope)
                .map_err(|error| SinkError::Rejected {
                    table: staging::TABLE.to_string(),
                    reason: error.to_string(),
                })?;
            drop(envelope);
            let mut batch = batch::Batch::default();
            self.add_changes(&mut conn, &mut batch, &view).await?;
            self.write_batch(&mut conn, &mut batch, tables).await?;
            drop((batch, conn));
            self.sinks.apply(&view).await?;
            callbacks.run_from(&view, index, store).await?;
            index += view.changes.len();
        }
        let id = &tx.id;
        let mut conn = store.held().await?;
        staging::forget(&mut conn, d, &id.namespace, id.generation, id.seq).await
    }
}

type Stream = (Arc<str>, u64);

/// What the bookkeeping says about the transactions of a group.
struct Applied {
    through: HashMap<Stream, u64>,
    seqs: HashSet<(Stream, u64)>,
}

/// Reads the watermarks and applied rows of the group's transactions: one query per
/// group whatever its size.
async fn already_applied(
    conn: &mut AnyConnection,
    dialect: Dialect,
    group: &[Arc<Transaction>],
) -> Result<Applied, SinkError> {
    let mut streams: Vec<(Stream, Vec<u64>)> = Vec::new();
    for tx in group {
        let stream = (tx.id.namespace.clone(), tx.id.generation);
        match streams.iter_mut().find(|(s, _)| *s == stream) {
            Some((_, seqs)) => seqs.push(tx.id.seq),
            None => streams.push((stream, vec![tx.id.seq])),
        }
    }
    let through = dialect.quote("through");
    let mut parts = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        dialect.placeholder(n)
    };
    for (i, (_, seqs)) in streams.iter().enumerate() {
        parts.push(format!(
            "SELECT {i} AS s, {through} AS seq, 1 AS w FROM kausal_progress \
             WHERE namespace = {} AND generation = {}",
            next(),
            next()
        ));
        let (ns, generation) = (next(), next());
        let list: Vec<String> = seqs.iter().map(|_| next()).collect();
        parts.push(format!(
            "SELECT {i}, seq, 0 FROM kausal_applied WHERE namespace = {ns} \
             AND generation = {generation} AND seq IN ({})",
            list.join(", ")
        ));
    }
    // Its text changes with the size of the group: not worth a slot in the per-connection
    // statement cache, where it would push out the row statements.
    let mut query = sqlx::query(AssertSqlSafe(parts.join(" UNION ALL "))).persistent(false);
    for ((namespace, generation), seqs) in &streams {
        query = query
            .bind(namespace.to_string())
            .bind(int(*generation))
            .bind(namespace.to_string())
            .bind(int(*generation));
        for seq in seqs {
            query = query.bind(int(*seq));
        }
    }
    let store = |source| SinkError::Store {
        operation: "read applied",
        source,
    };
    let rows = query.fetch_all(&mut *conn).await.map_err(store)?;
    let mut applied = Applied {
        through: HashMap::new(),
        seqs: HashSet::new(),
    };
    for row in rows {
        let stream: i64 = row.try_get(0).map_err(store)?;
        let seq: i64 = row.try_get(1).map_err(store)?;
        let watermark: i64 = row.try_get(2).map_err(store)?;
        let stream = streams[stream as usize].0.clone();
        if watermark == 1 {
            applied.through.insert(stream, seq as u64);
        } else {
            applied.seqs.insert((stream, seq as u64));
        }
    }
    Ok(applied)
}

/// Rows per bookkeeping insert: SQLite allows 500 terms in a compound SELECT.
const RECORD_CHUNK: usize = 200;

/// Records transactions as applied, unless a compaction that covers one of them
/// committed since the group read the watermark (then another worker applied it, and
/// the group must be retried: it finds them applied).
async fn record_applied(
    conn: &mut AnyConnection,
    dialect: Dialect,
    txs: &[&Transaction],
) -> Result<(), SinkError> {
    let query = if dialect == Dialect::Postgres {
        // Three array parameters: one statement text whatever the group's size, so it
        // stays prepared (a text per size churned the statement cache).
        let (mut namespaces, mut generations, mut seqs) =
            (String::from("{"), String::from("{"), String::from("{"));
        for (i, tx) in txs.iter().enumerate() {
            if i > 0 {
                namespaces.push(',');
                generations.push(',');
                seqs.push(',');
            }
            value::Bound::Text(tx.id.namespace.to_string()).push_pg_element(&mut namespaces);
            generations.push_str(&int(tx.id.generation).to_string());
            seqs.push_str(&int(tx.id.seq).to_string());
        }
        sqlx::query(AssertSqlSafe(dialect.record_applied_arrays()))
            .bind(namespaces + "}")
            .bind(generations + "}")
            .bind(seqs + "}")
    } else {
        let mut query =
            sqlx::query(AssertSqlSafe(dialect.record_applied(txs.len()))).persistent(false);
        for tx in txs {
            let id = &tx.id;
            query = query
                .bind(id.namespace.to_string())
                .bind(int(id.generation))
                .bind(int(id.seq));
        }
        query
    };
    let done = query.execute(conn).await.map_err(|source| {
        let concurrent = matches!(&source, sqlx::Error::Database(db) if db.is_unique_violation());
        SinkError::Store {
            operation: if concurrent {
                CONCURRENT_APPLY
            } else {
                "record applied"
            },
            source,
        }
    })?;
    if done.rows_affected() != txs.len() as u64 {
        return Err(SinkError::Store {
            operation: CONCURRENT_APPLY,
            source: sqlx::Error::RowNotFound,
        });
    }
    Ok(())
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

/// Sequence numbers and generations are below 2^63 in practice; saturate rather than
/// wrap if one is not.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
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
