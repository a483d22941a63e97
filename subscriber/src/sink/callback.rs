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
    /// The store transaction the callback runs in: read the read model through it to
    /// see this transaction's rows and those of every transaction applied before it in
    /// the same store transaction (`callbacks.chain`).
    pub store: StoreTx,
}

type Held = Option<sqlx::Transaction<'static, sqlx::Any>>;

/// The store transaction a callback runs in, shared with the store while it applies a
/// group. A connection of the callback's own sees committed rows only: what the
/// transaction depends on when groups are not chained, but not the rows of its own
/// transaction, nor (with `callbacks.chain`) those of the transactions chained before
/// it. Reads through this handle see all of them.
#[derive(Clone)]
pub struct StoreTx(Arc<tokio::sync::Mutex<Held>>);

impl std::fmt::Debug for StoreTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreTx")
    }
}

impl StoreTx {
    pub(crate) fn new(tx: sqlx::Transaction<'static, sqlx::Any>) -> StoreTx {
        StoreTx(Arc::new(tokio::sync::Mutex::new(Some(tx))))
    }

    /// The store's connection inside the transaction: `&mut *conn` is an sqlx executor.
    /// Hold it only while your statements run (the store waits for it to write the
    /// next rows), and only while the callback runs: afterwards the transaction has
    /// ended and this fails.
    ///
    /// ```no_run
    /// # async fn read(event: &kausal_subscriber::Event<serde_json::Value>, user_id: i64) -> Result<(), kausal_subscriber::CallbackError> {
    /// let mut conn = event.store.conn().await?;
    /// let user: Option<(String,)> = sqlx::query_as("SELECT email FROM users WHERE id = $1")
    ///     .bind(user_id)
    ///     .fetch_optional(&mut *conn)
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn conn(&self) -> Result<StoreConn<'_>, CallbackError> {
        let held = self.0.lock().await;
        if held.is_none() {
            return Err(CallbackError::permanent(
                "the store transaction of this event has ended: read through event.store \
                 only while the callback runs",
            ));
        }
        Ok(StoreConn(held))
    }

    /// The connection, for the store itself.
    pub(crate) async fn held(&self) -> Result<StoreConn<'_>, SinkError> {
        let held = self.0.lock().await;
        if held.is_none() {
            return Err(SinkError::Store {
                operation: "use the store transaction",
                source: sqlx::Error::PoolClosed,
            });
        }
        Ok(StoreConn(held))
    }

    /// Ends the sharing: the transaction, for its commit or rollback.
    pub(crate) async fn take(&self) -> Held {
        self.0.lock().await.take()
    }
}

/// The store's connection, locked inside its transaction ([`StoreTx::conn`]).
pub struct StoreConn<'a>(tokio::sync::MutexGuard<'a, Held>);

impl std::ops::Deref for StoreConn<'_> {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &sqlx::AnyConnection {
        // Checked when locked, and only `take` (which needs the lock) empties it.
        self.0.as_deref().expect("a StoreConn holds a transaction")
    }
}

impl std::ops::DerefMut for StoreConn<'_> {
    fn deref_mut(&mut self) -> &mut sqlx::AnyConnection {
        self.0
            .as_deref_mut()
            .expect("a StoreConn holds a transaction")
    }
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
    dyn Fn(&RowChange, &Transaction, usize, &StoreTx) -> BoxFuture<'static, Result<(), SinkError>>
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

impl On {
    fn wants(self, op: Op) -> bool {
        match self {
            On::Any => true,
            On::Insert => op == Op::Insert,
            On::Update => op == Op::Update,
            On::Delete => op == Op::Delete,
        }
    }
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

    /// Whether any callback runs for a change of `tx`.
    pub(crate) fn wants(&self, tx: &Transaction) -> bool {
        !self.handlers.is_empty()
            && tx.changes.iter().any(|c| {
                self.handlers
                    .get(&c.shape.name)
                    .is_some_and(|hs| hs.iter().any(|(on, _)| on.wants(c.op)))
            })
    }

    fn add<T, F, Fut>(&mut self, table: &str, on: On, f: F)
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Event<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallbackError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let handler: Handler = Arc::new(
            move |change: &RowChange, tx: &Transaction, index, store: &StoreTx| {
                let event = event::<T>(change, tx, index, store);
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
            },
        );
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
    /// the database transaction `store` that applies `tx`, whose connection it does not
    /// hold meanwhile.
    pub async fn run(&self, tx: &Transaction, store: &StoreTx) -> Result<(), SinkError> {
        self.run_from(tx, 0, store).await
    }

    /// As [`Callbacks::run`], for a view of one part of a split transaction whose first
    /// change is change `first` of the whole transaction (events keep their index, so
    /// their idempotency keys do not depend on how the transaction was split).
    pub async fn run_from(
        &self,
        tx: &Transaction,
        first: usize,
        store: &StoreTx,
    ) -> Result<(), SinkError> {
        if self.handlers.is_empty() {
            return Ok(());
        }
        for (index, change) in (first..).zip(&tx.changes) {
            let Some(handlers) = self.handlers.get(&change.shape.name) else {
                continue;
            };
            for (on, handler) in handlers {
                if on.wants(change.op) {
                    handler(change, tx, index, store).await?;
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
    store: &StoreTx,
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
        store: store.clone(),
    })
}
