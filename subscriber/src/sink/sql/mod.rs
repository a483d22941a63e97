//! The SQL store: the read model and Kausal's bookkeeping in one database (Postgres,
//! MySQL/MariaDB or SQLite), so a transaction's rows, its callbacks' effects on the
//! store and the record that it was applied commit together.
//!
//! - [`connect`]: the pool and the bookkeeping tables.
//! - [`applied`]: which transactions the store applied (read per group, written in it).
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

mod applied;
mod batch;
mod bootstrap;
mod connect;
mod dialect;
mod follow;
mod rows;
mod schema;
mod staging;
mod value;
mod workers;

use applied::{already_applied, record_applied, RECORD_CHUNK};

pub use bootstrap::{ChunkApplied, Unfinished};
pub use dialect::Dialect;
pub use workers::{read_bootstraps, read_progress, read_statuses, BootstrapState};

use crate::error::SinkError;
use crate::sink::callback::{Callbacks, StoreTx};
use crate::table::TableMode;
use crate::txn::{Staged, Transaction};
use kausal_bus::Op;
use schema::{TableInfo, Tables};
use sqlx::{AnyConnection, AnyPool};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

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

impl SqlStore {
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

/// Sequence numbers and generations are below 2^63 in practice; saturate rather than
/// wrap if one is not.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
