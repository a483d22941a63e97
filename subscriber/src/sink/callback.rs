//! Callbacks: user code that runs for each change, in causal order.
//!
//! A callback runs inside the store transaction that records its transaction as applied:
//! when it fails, nothing of the transaction is committed and it is retried with
//! backoff, then dead-lettered. When it succeeds and the process dies before the commit,
//! it runs again after the redelivery with the same [`Event::idempotency_key`]: give that
//! key to whatever the callback calls outside (an email API, a webhook) so the rare
//! second call is recognised there.

use crate::error::{ErrorClass, SinkError};
use crate::txn::{RowChange, Transaction};
use futures_util::future::BoxFuture;
use kausal_bus::{Context, Op};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

/// What a callback sees of one row change.
#[derive(Debug, Clone)]
pub struct Event<T> {
    pub op: Op,
    /// Destination table name (the subscription's `into`).
    pub table: String,
    /// Primary key, in destination column names.
    pub key: Map<String, Value>,
    /// The row after the change (insert, update).
    pub new: Option<T>,
    /// The row before the change, when the source logged it (Postgres `REPLICA
    /// IDENTITY FULL`); for a delete without it, `None`.
    pub old: Option<T>,
    /// Who and why, as the application attached it.
    pub context: Context,
    /// Commit time at the source, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    pub namespace: String,
    pub seq: u64,
    /// `<namespace>/<generation>/<seq>/<index of the change in the transaction>`: the same
    /// on every redelivery of this change.
    pub idempotency_key: String,
}

/// A callback's failure. `retry: true` asks for another attempt (with backoff).
#[derive(Debug, Clone)]
pub struct CallbackError {
    pub message: String,
    pub retry: bool,
}

impl CallbackError {
    /// A failure worth retrying (a remote service is down).
    pub fn transient(message: impl Into<String>) -> Self {
        CallbackError {
            message: message.into(),
            retry: true,
        }
    }

    /// A failure that will repeat: the transaction goes to the dead-letter queue.
    pub fn permanent(message: impl Into<String>) -> Self {
        CallbackError {
            message: message.into(),
            retry: false,
        }
    }
}

impl<E: std::fmt::Display> From<E> for CallbackError {
    fn from(e: E) -> Self {
        CallbackError::transient(e.to_string())
    }
}

type Handler = Arc<
    dyn Fn(&RowChange, &Transaction, usize) -> BoxFuture<'static, Result<(), SinkError>>
        + Send
        + Sync,
>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum On {
    Insert,
    Update,
    Delete,
    Any,
}

/// The registered callbacks of a subscriber, by destination table.
#[derive(Clone, Default)]
pub struct Callbacks {
    handlers: HashMap<String, Vec<(On, Handler)>>,
}

impl Callbacks {
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }

    fn add<T, F, Fut>(&mut self, table: &str, on: On, f: F)
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Event<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallbackError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let handler: Handler = Arc::new(move |change: &RowChange, tx: &Transaction, index| {
            let event = event::<T>(change, tx, index);
            let f = f.clone();
            let table = change.shape.name.clone();
            Box::pin(async move {
                let event = event?;
                f(event).await.map_err(|e| SinkError::Callback {
                    table,
                    message: e.message,
                    class: if e.retry {
                        ErrorClass::Transient
                    } else {
                        ErrorClass::Definite
                    },
                })
            })
        });
        self.handlers
            .entry(table.to_string())
            .or_default()
            .push((on, handler));
    }

    /// Runs `f` for every insert into `table` (destination name).
    pub fn on_insert<T, F, Fut>(&mut self, table: &str, f: F) -> &mut Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Event<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallbackError>> + Send + 'static,
    {
        self.add(table, On::Insert, f);
        self
    }

    pub fn on_update<T, F, Fut>(&mut self, table: &str, f: F) -> &mut Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Event<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallbackError>> + Send + 'static,
    {
        self.add(table, On::Update, f);
        self
    }

    pub fn on_delete<T, F, Fut>(&mut self, table: &str, f: F) -> &mut Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Event<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallbackError>> + Send + 'static,
    {
        self.add(table, On::Delete, f);
        self
    }

    /// Runs `f` for every change of `table`, truncates included (with no key or rows).
    pub fn on_change<T, F, Fut>(&mut self, table: &str, f: F) -> &mut Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Event<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallbackError>> + Send + 'static,
    {
        self.add(table, On::Any, f);
        self
    }

    /// Runs the callbacks of every change of `tx`, in order. The store calls this inside
    /// the database transaction that applies `tx`.
    pub async fn run(&self, tx: &Transaction) -> Result<(), SinkError> {
        if self.handlers.is_empty() {
            return Ok(());
        }
        for (index, change) in tx.changes.iter().enumerate() {
            let Some(handlers) = self.handlers.get(&change.shape.name) else {
                continue;
            };
            for (on, handler) in handlers {
                let wanted = match on {
                    On::Any => true,
                    On::Insert => change.op == Op::Insert,
                    On::Update => change.op == Op::Update,
                    On::Delete => change.op == Op::Delete,
                };
                if wanted {
                    handler(change, tx, index).await?;
                }
            }
        }
        Ok(())
    }
}

fn event<T: DeserializeOwned>(
    change: &RowChange,
    tx: &Transaction,
    index: usize,
) -> Result<Event<T>, SinkError> {
    let row = |m: &Option<Map<String, Value>>| -> Result<Option<T>, SinkError> {
        match m {
            None => Ok(None),
            Some(m) => serde_json::from_value(Value::Object(m.clone()))
                .map(Some)
                .map_err(|e| SinkError::Callback {
                    table: change.shape.name.clone(),
                    message: format!(
                        "the row does not fit the callback's type: {e} (check the struct \
                         against the subscribed columns)"
                    ),
                    class: ErrorClass::Definite,
                }),
        }
    };
    Ok(Event {
        op: change.op,
        table: change.shape.name.clone(),
        key: change.key.clone(),
        new: row(&change.new)?,
        old: row(&change.old)?,
        context: tx.context.clone(),
        commit_ts_us: tx.commit_ts_us,
        namespace: tx.id.namespace.to_string(),
        seq: tx.id.seq,
        idempotency_key: format!("{}/{index}", tx.idempotency_key()),
    })
}
