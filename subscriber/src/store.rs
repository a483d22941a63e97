//! What the runtime needs from the store it applies to, as small traits: the worker
//! loop holds an `Arc<dyn Store>` and never a concrete database. [`SqlStore`] is the one
//! implementation today (the read model and the bookkeeping in one SQL database);
//! MongoDB, the search index and the Redis cache are [`crate::sink::Sink`]s applied
//! inside its transactions.
//!
//! Futures are boxed: the runtime calls these once per group or per tick, never per
//! row, so the allocation does not show, and a trait object keeps the runtime free of
//! a type parameter.

use crate::error::SinkError;
use crate::sink::sql::{ChunkApplied, Unfinished};
use crate::sink::{Callbacks, SqlStore};
use crate::status::WorkerStatus;
use crate::txn::{Transaction, TxId};
use kausal_bus::{Envelope, Snapshot};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SinkError>> + Send + 'a>>;

/// Applying transactions and recording that they were applied.
///
/// Contract: `apply_group` applies the group atomically — every transaction's rows, its
/// callbacks and the record that it was applied commit together or not at all — and
/// answers, per transaction, whether it applied it (`false`: found applied already, so
/// a redelivery changes nothing). `progress` answers what the record holds: the
/// compacted watermark and the seqs applied above it; `compact` may forget seqs at or
/// below `through` once every one of them is applied.
pub trait Apply: Send + Sync {
    fn apply_group<'a>(
        &'a self,
        group: &'a [Arc<Transaction>],
        callbacks: &'a Callbacks,
    ) -> StoreFuture<'a, Vec<bool>>;
    fn progress<'a>(
        &'a self,
        namespace: &'a str,
        generation: u64,
    ) -> StoreFuture<'a, (u64, Vec<u64>)>;
    fn compact<'a>(
        &'a self,
        namespace: &'a str,
        generation: u64,
        through: u64,
    ) -> StoreFuture<'a, ()>;
}

/// Parts of split transactions, kept until all are there, whichever worker got them.
///
/// Contract: `stage_part` keeps a part (idempotent) and answers the number of parts
/// once the transaction is complete; a complete transaction's parts stay readable
/// (`staged_part`, `staged_complete`) until it is applied or `unstage`d.
pub trait Staging: Send + Sync {
    fn stage_part<'a>(&'a self, envelope: &'a Envelope) -> StoreFuture<'a, Option<u32>>;
    fn staged_part<'a>(&'a self, id: &'a TxId, part: u32) -> StoreFuture<'a, Option<Envelope>>;
    fn staged_complete(&self) -> StoreFuture<'_, Vec<(TxId, u32)>>;
    fn unstage<'a>(&'a self, namespace: &'a str, generation: u64, seq: u64) -> StoreFuture<'a, ()>;
}

/// What the store has followed of a stream: whether it ever applied anything (of a
/// generation, of another generation) or joined a running stream.
pub trait Followed: Send + Sync {
    fn has_followed(&self) -> StoreFuture<'_, bool>;
    fn has_followed_generation<'a>(
        &'a self,
        namespace: &'a str,
        generation: u64,
    ) -> StoreFuture<'a, bool>;
    fn has_joined<'a>(&'a self, namespace: &'a str, generation: u64) -> StoreFuture<'a, bool>;
    fn has_other_generations<'a>(
        &'a self,
        namespace: &'a str,
        generation: u64,
    ) -> StoreFuture<'a, bool>;
}

/// Bootstrap bookkeeping: which tables are being filled, under which request, how far.
///
/// Contract: `apply_chunk` writes a chunk's rows only where the stream has not written a
/// newer version, and counts them against the table's bootstrap; `finish_bootstraps`
/// ends those whose chunks are all below the applied-through `through`.
pub trait Bootstraps: Send + Sync {
    fn begin_bootstrap<'a>(
        &'a self,
        namespace: &'a str,
        tables: &'a [String],
        request: &'a str,
        resume: bool,
    ) -> StoreFuture<'a, ()>;
    fn bootstrapped_tables(&self) -> StoreFuture<'_, HashSet<(String, String)>>;
    fn chunk_is_current<'a>(
        &'a self,
        namespace: &'a str,
        snapshot: &'a Snapshot,
    ) -> StoreFuture<'a, bool>;
    fn apply_chunk<'a>(
        &'a self,
        tx: Transaction,
        snapshot: &'a Snapshot,
    ) -> StoreFuture<'a, ChunkApplied>;
    fn finish_bootstraps<'a>(
        &'a self,
        namespace: &'a str,
        generation: u64,
        through: u64,
    ) -> StoreFuture<'a, ()>;
    fn finishing_bootstraps(&self) -> StoreFuture<'_, HashSet<(String, u64)>>;
    fn unfinished_bootstraps(&self) -> StoreFuture<'_, Vec<Unfinished>>;
}

/// The live status of the app's workers, where `kausal status` reads it.
pub trait Statuses: Send + Sync {
    fn write_status<'a>(&'a self, status: &'a WorkerStatus) -> StoreFuture<'a, ()>;
    fn remove_status<'a>(&'a self, worker: &'a str) -> StoreFuture<'a, ()>;
}

/// Everything a worker needs of its store.
pub trait Store: Apply + Staging + Followed + Bootstraps + Statuses {}

impl<T: Apply + Staging + Followed + Bootstraps + Statuses> Store for T {}

impl Apply for SqlStore {
    fn apply_group<'a>(
        &'a self,
        group: &'a [Arc<Transaction>],
        callbacks: &'a Callbacks,
    ) -> StoreFuture<'a, Vec<bool>> {
        Box::pin(SqlStore::apply_group(self, group, callbacks))
    }
    fn progress<'a>(
        &'a self,
        namespace: &'a str,
        generation: u64,
    ) -> StoreFuture<'a, (u64, Vec<u64>)> {
        Box::pin(SqlStore::progress(self, namespace, generation))
    }
    fn compact<'a>(
        &'a self,
        namespace: &'a str,
        generation: u64,
        through: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::compact(self, namespace, generation, through))
    }
}

impl Staging for SqlStore {
    fn stage_part<'a>(&'a self, envelope: &'a Envelope) -> StoreFuture<'a, Option<u32>> {
        Box::pin(SqlStore::stage_part(self, envelope))
    }
    fn staged_part<'a>(&'a self, id: &'a TxId, part: u32) -> StoreFuture<'a, Option<Envelope>> {
        Box::pin(SqlStore::staged_part(self, id, part))
    }
    fn staged_complete(&self) -> StoreFuture<'_, Vec<(TxId, u32)>> {
        Box::pin(SqlStore::staged_complete(self))
    }
    fn unstage<'a>(&'a self, namespace: &'a str, generation: u64, seq: u64) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::unstage(self, namespace, generation, seq))
    }
}

impl Followed for SqlStore {
    fn has_followed(&self) -> StoreFuture<'_, bool> {
        Box::pin(SqlStore::has_followed(self))
    }
    fn has_followed_generation<'a>(
        &'a self,
        namespace: &'a str,
        generation: u64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(SqlStore::has_followed_generation(
            self, namespace, generation,
        ))
    }
    fn has_joined<'a>(&'a self, namespace: &'a str, generation: u64) -> StoreFuture<'a, bool> {
        Box::pin(SqlStore::has_joined(self, namespace, generation))
    }
    fn has_other_generations<'a>(
        &'a self,
        namespace: &'a str,
        generation: u64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(SqlStore::has_other_generations(self, namespace, generation))
    }
}

impl Bootstraps for SqlStore {
    fn begin_bootstrap<'a>(
        &'a self,
        namespace: &'a str,
        tables: &'a [String],
        request: &'a str,
        resume: bool,
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::begin_bootstrap(
            self, namespace, tables, request, resume,
        ))
    }
    fn bootstrapped_tables(&self) -> StoreFuture<'_, HashSet<(String, String)>> {
        Box::pin(SqlStore::bootstrapped_tables(self))
    }
    fn chunk_is_current<'a>(
        &'a self,
        namespace: &'a str,
        snapshot: &'a Snapshot,
    ) -> StoreFuture<'a, bool> {
        Box::pin(SqlStore::chunk_is_current(self, namespace, snapshot))
    }
    fn apply_chunk<'a>(
        &'a self,
        tx: Transaction,
        snapshot: &'a Snapshot,
    ) -> StoreFuture<'a, ChunkApplied> {
        Box::pin(SqlStore::apply_chunk(self, tx, snapshot))
    }
    fn finish_bootstraps<'a>(
        &'a self,
        namespace: &'a str,
        generation: u64,
        through: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::finish_bootstraps(
            self, namespace, generation, through,
        ))
    }
    fn finishing_bootstraps(&self) -> StoreFuture<'_, HashSet<(String, u64)>> {
        Box::pin(SqlStore::finishing_bootstraps(self))
    }
    fn unfinished_bootstraps(&self) -> StoreFuture<'_, Vec<Unfinished>> {
        Box::pin(SqlStore::unfinished_bootstraps(self))
    }
}

impl Statuses for SqlStore {
    fn write_status<'a>(&'a self, status: &'a WorkerStatus) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::write_status(self, status))
    }
    fn remove_status<'a>(&'a self, worker: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(SqlStore::remove_status(self, worker))
    }
}
