//! Where applied transactions go.
//!
//! - [`sql`]: the store: a SQL database (Postgres, MySQL/MariaDB, SQLite) holding the
//!   read model and Kausal's bookkeeping, one source transaction (or a group of
//!   independent ones) per database transaction.
//! - [`callback`]: user code, run inside the store transaction of the change it sees,
//!   in causal order.
//! - [`redis`]: a cache beside the store: rows as Redis hashes or JSON strings, written
//!   with a version guard.
//! - `search` (feature `search`): a tantivy full-text index of one table.
//! - `mongo` (feature `mongo`): MongoDB documents, one collection per table.
//!
//! Sinks beside the store implement [`Sink`]; the store applies them inside its
//! transaction, after the rows and before the callbacks.

pub mod callback;
// Test-only crash points, compiled in only for the fault tests (`failpoints`).
#[cfg(feature = "failpoints")]
pub mod fault;
#[cfg(feature = "mongo")]
pub mod mongo;
pub mod redis;
#[cfg(feature = "search")]
pub mod search;
pub mod sql;

pub use callback::{CallbackError, Callbacks, Event, StoreConn, StoreTx};
pub use sql::SqlStore;

use crate::error::SinkError;
use crate::txn::Transaction;
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// A read model beside the SQL store: a cache, a search index, a document store.
///
/// Contract: `apply` writes the changes of `tx` with the row version
/// `(tx.id.generation, tx.id.seq)`, and is **idempotent per row version**: a change whose
/// version is not newer than what the sink holds for its row (live or deleted) is
/// skipped. A delete leaves the row's version behind (a tombstone), so an older write
/// replayed later cannot bring the row back. Where the sink can, all changes of `tx`
/// become visible together.
///
/// The store calls `apply` for each transaction it applies, in causal order, inside its
/// own database transaction and before its commit. A crash or error between the two
/// makes the runtime apply the transaction again, which the version guard turns into a
/// no-op; a retried group may replay an older transaction after a newer one, which the
/// guard skips. Errors carry their class: transient ones retry the group.
pub trait Sink: Send + Sync {
    /// Names the sink in logs and errors.
    fn name(&self) -> &str;
    fn apply<'a>(&'a self, tx: &'a Transaction) -> SinkFuture<'a>;

    /// Makes everything applied so far durable (and visible), once per group, just
    /// before the store commits. Default: nothing to do (each `apply` is durable).
    fn flush(&self) -> SinkFuture<'_> {
        Box::pin(async { Ok(()) })
    }

    /// Forgets what was applied since the last `flush`, where the sink can: the store
    /// rolled the group back. Default: nothing (the version guard covers the retry).
    fn abort(&self) -> SinkFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// The sinks of a subscriber app, applied in configuration order. Cheap to clone.
#[derive(Clone, Default)]
pub struct Sinks(Arc<Vec<Arc<dyn Sink>>>);

impl Sinks {
    pub fn new(sinks: Vec<Arc<dyn Sink>>) -> Sinks {
        Sinks(Arc::new(sinks))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub async fn apply(&self, tx: &Transaction) -> Result<(), SinkError> {
        for sink in self.0.iter() {
            sink.apply(tx).await?;
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), SinkError> {
        for sink in self.0.iter() {
            sink.flush().await?;
        }
        Ok(())
    }

    /// Aborts every sink's unflushed work; failures are logged (the store already
    /// rolled back, and the version guards cover the retry).
    pub async fn abort(&self) {
        for sink in self.0.iter() {
            if let Err(error) = sink.abort().await {
                tracing::warn!(sink = sink.name(), error = %error, "aborting a sink failed");
            }
        }
    }
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|s| s.name().to_string()))
            .finish()
    }
}

/// A sink's failure to connect: a certificate problem (`tls` connections only) is
/// definite — it stays until the configuration changes — anything else transient.
pub(crate) fn connect_failed(
    sink: &str,
    tls: bool,
    error: &(dyn std::error::Error + 'static),
    server: &str,
) -> SinkError {
    let detail = kausal_bus::tls::describe(error);
    match kausal_bus::tls::hint(&detail) {
        Some(_) if tls => SinkError::External {
            sink: sink.to_string(),
            message: format!("TLS failed: {detail}"),
            class: crate::error::ErrorClass::Definite,
            source: None,
        },
        _ => SinkError::External {
            sink: sink.to_string(),
            message: format!("cannot connect: {error}; is {server} running and sink.url right?"),
            class: crate::error::ErrorClass::Transient,
            source: None,
        },
    }
}

/// A sink beside the store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum SinkConfig {
    /// A Redis cache: rows as hashes or JSON strings (see `sink::redis`).
    Redis(redis::RedisSinkConfig),
    /// A tantivy full-text index of one table (feature `search`; see `sink::search`).
    #[cfg(feature = "search")]
    Search(search::SearchSinkConfig),
    /// MongoDB documents, one collection per table (feature `mongo`; see `sink::mongo`).
    #[cfg(feature = "mongo")]
    Mongo(mongo::MongoSinkConfig),
}

impl SinkConfig {
    /// Connects to (or opens) the sink this configures.
    pub async fn open(&self) -> Result<Arc<dyn Sink>, SinkError> {
        Ok(match self {
            SinkConfig::Redis(r) => Arc::new(redis::RedisSink::connect(r).await?),
            #[cfg(feature = "search")]
            SinkConfig::Search(s) => Arc::new(search::SearchSink::open(s)?),
            #[cfg(feature = "mongo")]
            SinkConfig::Mongo(m) => Arc::new(mongo::MongoSink::connect(m).await?),
        })
    }
}
