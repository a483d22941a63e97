//! Kausal's test kit: realistic envelopes for a subscriber's tests, built from the
//! publisher's contract (`kausal contract export`), and the real subscriber runtime to
//! run them through — in-process, no broker, no publisher, no source database.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use kausal_testkit::TestKit;
//! use serde_json::json;
//!
//! let mut kit = TestKit::from_file("shop.contract.json")?;
//! let cfg = kausal_subscriber::SubscriberConfig::new("mailer", "amqp://unused", "sqlite://t.db")
//!     .subscribe("shop", "users", &[]);
//! let worker = kit.start(kit.subscriber(cfg));
//! let user = kit.insert("users", json!({"id": 1, "name": "Ada", "email": "ada@example.com"}))?;
//! let rename = kit.update("users", json!({"id": 1, "name": "Ada L."}))?;
//! kit.send(&[rename, user]); // out of order: the subscriber still applies the insert first
//! kit.settle(std::time::Duration::from_secs(10)).await?;
//! worker.stop().await?;
//! # Ok(()) }
//! ```
//!
//! The envelopes are the publisher's own: the kit feeds the publisher's assembler with
//! the row changes a Postgres source would decode (values as Postgres prints them), so
//! dependencies (rows written, rows referenced through the contract's references,
//! sessions, read hints), sequence numbers and value formats are exactly a publisher's.

mod text;

use kausal_bus::amqp::MemoryQueue;
use kausal_bus::contract::Contract;
use kausal_bus::deps::DEFAULT_KEY_SPACE;
use kausal_bus::Envelope;
use kausal_publisher::source::assemble::{
    schema_of, Assembler, ColumnRt, Datum, Message, OldKind, TableRt,
};
use kausal_publisher::source::values::Conv;
use kausal_publisher::tracker::{Tracker, TrackerState};
use kausal_subscriber::{Subscriber, SubscriberError};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::watch;

/// What went wrong building or running envelopes; the message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("cannot read the contract {path}: {reason}")]
    Contract { path: String, reason: String },
    #[error("table `{table}` is not in the contract (it publishes: {published})")]
    UnknownTable { table: String, published: String },
    #[error("table `{table}` has no column `{column}` in the contract (columns: {columns})")]
    UnknownColumn {
        table: String,
        column: String,
        columns: String,
    },
    #[error("{table}: {reason}")]
    BadRow { table: String, reason: String },
    #[error("the subscriber did not apply everything within {0:?} ({1} messages left)")]
    NotSettled(Duration, usize),
    #[error("the subscriber dead-lettered {count} message(s); first reason: {reason}")]
    DeadLettered { count: usize, reason: String },
    #[error("the subscriber stopped: {0}")]
    Subscriber(Box<SubscriberError>),
}

struct KitTable {
    oid: u32,
    columns: Vec<(String, Conv)>,
    key: Vec<String>,
}

/// Builds a publisher's envelopes from its contract and delivers them to subscribers
/// started with [`TestKit::subscriber`].
pub struct TestKit {
    namespace: String,
    asm: Assembler,
    tables: HashMap<String, KitTable>,
    /// Rows as the source holds them after the transactions built so far, so an update
    /// of a few columns produces the full new row, as Postgres logs it.
    rows: HashMap<(String, String), Map<String, Value>>,
    queue: MemoryQueue,
    transactions: u64,
}

/// The publisher generation of a kit's envelopes (one kit, one generation).
const GENERATION: u64 = 1;

fn conv_for(type_name: &str) -> Conv {
    match type_name.strip_prefix('_') {
        // Postgres names array types after their element: `_int4` is `int4[]`.
        Some(elem) => Conv::for_type(type_name, b'A', Some(Conv::for_type(elem, 0, None))),
        None => Conv::for_type(type_name, 0, None),
    }
}

impl TestKit {
    /// A kit for the publisher described by `contract`.
    pub fn new(contract: &Contract) -> TestKit {
        let mut tables = HashMap::new();
        let mut relations = Vec::new();
        for (i, t) in contract.tables.iter().enumerate() {
            let oid = 16_384 + i as u32;
            let index = |name: &str| t.columns.iter().position(|c| c.name == name);
            let refs = t
                .references
                .iter()
                .filter_map(|r| {
                    let cols: Option<Vec<usize>> = r.columns.iter().map(|c| index(c)).collect();
                    Some((cols?, r.table.clone()))
                })
                .collect();
            let described: Vec<(String, String, bool)> = t
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.type_name.clone(), true))
                .collect();
            let (schema, fingerprint) = schema_of(&t.name, &described, &t.key);
            let columns: Vec<(String, Conv)> = t
                .columns
                .iter()
                .map(|c| (c.name.clone(), conv_for(&c.type_name)))
                .collect();
            relations.push((
                oid,
                TableRt {
                    published: t.name.clone(),
                    columns: columns
                        .iter()
                        .map(|(name, conv)| ColumnRt {
                            out: Some(name.clone()),
                            conv: conv.clone(),
                        })
                        .collect(),
                    key: t.key.iter().filter_map(|k| index(k)).collect(),
                    refs,
                    schema,
                    fingerprint,
                },
            ));
            tables.insert(
                t.name.clone(),
                KitTable {
                    oid,
                    columns,
                    key: t.key.clone(),
                },
            );
        }
        // Read hints name rows by their key columns.
        let key_columns = contract
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.key.clone()))
            .collect();
        let tracker = Tracker::new(TrackerState::new(GENERATION, DEFAULT_KEY_SPACE));
        let mut asm = Assembler::new(
            &contract.namespace,
            DEFAULT_KEY_SPACE,
            usize::MAX,
            tracker,
            key_columns,
        );
        for (oid, rt) in relations {
            asm.relation(oid, rt);
        }
        TestKit {
            namespace: contract.namespace.clone(),
            asm,
            tables,
            rows: HashMap::new(),
            queue: MemoryQueue::new(),
            transactions: 0,
        }
    }

    /// A kit from a contract file written by `kausal contract export`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<TestKit, KitError> {
        let path = path.as_ref();
        let bad = |reason: String| KitError::Contract {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let contract = Contract::parse(&text).map_err(|e| bad(e.to_string()))?;
        Ok(TestKit::new(&contract))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The in-process queue subscribers of this kit consume.
    pub fn queue(&self) -> MemoryQueue {
        self.queue.clone()
    }

    /// A subscriber with `cfg` that consumes this kit's envelopes instead of RabbitMQ;
    /// store, sinks, gate and callbacks are the real ones. Register callbacks on it,
    /// then [`TestKit::start`] it.
    ///
    /// `[signing] keys` of `cfg` are set aside: signatures guard what crosses a broker,
    /// and the kit's envelopes go from the kit to the subscriber in this process — a
    /// production config with keys works here unchanged.
    pub fn subscriber(&self, mut cfg: kausal_subscriber::SubscriberConfig) -> Subscriber {
        cfg.signing = Default::default();
        let mut subscriber = Subscriber::new(cfg);
        subscriber.consume_from(self.queue.clone());
        subscriber
    }

    /// Runs `subscriber` on a task of its own until [`Running::stop`].
    pub fn start(&self, subscriber: Subscriber) -> Running {
        let (stop, rx) = watch::channel(false);
        Running {
            stop,
            task: tokio::spawn(subscriber.run(rx)),
        }
    }

    /// Starts a transaction of several changes (and its context).
    pub fn tx(&mut self) -> Tx<'_> {
        Tx {
            kit: self,
            ops: Vec::new(),
            context: Map::new(),
        }
    }

    /// A transaction inserting `row` (every column the row leaves out is NULL).
    pub fn insert(&mut self, table: &str, row: Value) -> Result<Envelope, KitError> {
        self.tx().insert(table, row).commit()
    }

    /// A transaction updating the row with `row`'s key: the columns given change, the
    /// others keep the values of earlier transactions of this kit (NULL if none).
    pub fn update(&mut self, table: &str, row: Value) -> Result<Envelope, KitError> {
        self.tx().update(table, row).commit()
    }

    /// A transaction deleting the row with `key` (an object of the key columns).
    pub fn delete(&mut self, table: &str, key: Value) -> Result<Envelope, KitError> {
        self.tx().delete(table, key).commit()
    }

    /// Delivers `envelopes` as one message, in this order (any order is fine: the
    /// subscriber orders them causally).
    pub fn send(&self, envelopes: &[Envelope]) {
        self.queue.publish(kausal_bus::encode(envelopes));
    }

    /// Waits until the subscriber applied (acked) every message sent; an error if one
    /// was dead-lettered or time ran out.
    pub async fn settle(&self, timeout: Duration) -> Result<(), KitError> {
        if !self.queue.wait_settled(timeout).await {
            return Err(KitError::NotSettled(timeout, self.queue.unsettled()));
        }
        let dead = self.queue.dead_letters();
        match dead.first() {
            None => Ok(()),
            Some((_, reason)) => Err(KitError::DeadLettered {
                count: dead.len(),
                reason: reason.clone(),
            }),
        }
    }

    fn table(&self, name: &str) -> Result<&KitTable, KitError> {
        self.tables.get(name).ok_or_else(|| {
            let mut names: Vec<&str> = self.tables.keys().map(String::as_str).collect();
            names.sort();
            KitError::UnknownTable {
                table: name.to_string(),
                published: names.join(", "),
            }
        })
    }
}

/// A subscriber started by [`TestKit::start`].
pub struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), SubscriberError>>,
}

impl Running {
    /// Stops it (finishing what is in flight) and returns how it ended.
    pub async fn stop(self) -> Result<(), KitError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result.map_err(|e| KitError::Subscriber(Box::new(e))),
            Err(e) => Err(KitError::BadRow {
                table: String::new(),
                reason: format!("the subscriber task panicked: {e}"),
            }),
        }
    }
}

enum RowOp {
    Insert(String, Value),
    Update(String, Value),
    Delete(String, Value),
}

/// One transaction being built: changes in order, then [`Tx::commit`].
pub struct Tx<'a> {
    kit: &'a mut TestKit,
    ops: Vec<RowOp>,
    context: Map<String, Value>,
}

impl Tx<'_> {
    pub fn insert(mut self, table: &str, row: Value) -> Self {
        self.ops.push(RowOp::Insert(table.to_string(), row));
        self
    }

    pub fn update(mut self, table: &str, row: Value) -> Self {
        self.ops.push(RowOp::Update(table.to_string(), row));
        self
    }

    pub fn delete(mut self, table: &str, key: Value) -> Self {
        self.ops.push(RowOp::Delete(table.to_string(), key));
        self
    }

    /// The user the application acted for (context, as `kausal.context`).
    pub fn user(mut self, user: &str) -> Self {
        self.context
            .insert("user".into(), Value::String(user.into()));
        self
    }

    /// A session: transactions of one session are applied in order.
    pub fn session(mut self, session: &str) -> Self {
        let sessions = self
            .context
            .entry("sessions")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = sessions {
            list.push(Value::String(session.into()));
        }
        self
    }

    /// A read hint: the transaction read the row of `table` with `key`.
    pub fn reads(mut self, table: &str, key: Value) -> Self {
        let reads = self
            .context
            .entry("reads")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = reads {
            list.push(serde_json::json!({"table": table, "key": key}));
        }
        self
    }

    /// The transaction's envelope, as the publisher would publish it.
    pub fn commit(self) -> Result<Envelope, KitError> {
        let Tx { kit, ops, context } = self;
        // Check everything first: a failed commit leaves the kit as it was.
        let mut planned = Vec::with_capacity(ops.len());
        let mut rows = kit.rows.clone();
        for op in &ops {
            planned.push(plan(kit, &mut rows, op)?);
        }
        kit.transactions += 1;
        let n = kit.transactions;
        kit.asm.begin_at(
            format!("kit:{n}"),
            n.to_string(),
            1_700_000_000_000_000 + n as i64,
        );
        if !context.is_empty() {
            kit.asm
                .context_message(Value::Object(context).to_string().as_bytes());
        }
        let mut parts = Vec::new();
        for p in &planned {
            let msg = match p {
                Planned::Insert(oid, new) => Message::Insert {
                    rel: *oid,
                    new: datums(new),
                },
                Planned::Update(oid, new) => Message::Update {
                    rel: *oid,
                    old: None,
                    new: datums(new),
                },
                Planned::Delete(oid, old) => Message::Delete {
                    rel: *oid,
                    old: (OldKind::Key, datums(old)),
                },
            };
            let part = kit.asm.change(msg).map_err(|e| KitError::BadRow {
                table: String::new(),
                reason: e.to_string(),
            })?;
            parts.extend(part);
        }
        parts.extend(kit.asm.commit());
        kit.rows = rows;
        // Transactions are never split here (no part limit): one envelope.
        parts.pop().ok_or_else(|| KitError::BadRow {
            table: String::new(),
            reason: "a transaction needs at least one change".into(),
        })
    }
}

fn datums(texts: &[Option<String>]) -> Vec<Datum<'_>> {
    texts
        .iter()
        .map(|t| {
            t.as_deref()
                .map_or(Datum::Null, |s| Datum::Text(s.as_bytes()))
        })
        .collect()
}

enum Planned {
    Insert(u32, Vec<Option<String>>),
    Update(u32, Vec<Option<String>>),
    Delete(u32, Vec<Option<String>>),
}

/// Checks one change against the contract and turns it into column texts, updating
/// the kit's view of the rows.
fn plan(
    kit: &TestKit,
    rows: &mut HashMap<(String, String), Map<String, Value>>,
    op: &RowOp,
) -> Result<Planned, KitError> {
    let (RowOp::Insert(table, value) | RowOp::Update(table, value) | RowOp::Delete(table, value)) =
        op;
    let t = kit.table(table)?;
    let bad = |reason: String| KitError::BadRow {
        table: table.clone(),
        reason,
    };
    let Value::Object(given) = value else {
        return Err(bad(format!(
            "a row is a JSON object of columns, not {value}"
        )));
    };
    for name in given.keys() {
        if !t.columns.iter().any(|(c, _)| c == name) {
            let columns: Vec<&str> = t.columns.iter().map(|(c, _)| c.as_str()).collect();
            return Err(KitError::UnknownColumn {
                table: table.clone(),
                column: name.clone(),
                columns: columns.join(", "),
            });
        }
    }
    let mut key = Map::new();
    for k in &t.key {
        match given.get(k) {
            Some(v) if !v.is_null() => key.insert(k.clone(), v.clone()),
            _ => return Err(bad(format!("key column `{k}` is missing"))),
        };
    }
    let id = (table.clone(), Value::Object(key).to_string());
    let row = match op {
        RowOp::Insert(..) => given.clone(),
        RowOp::Update(..) => {
            let mut merged = rows.get(&id).cloned().unwrap_or_default();
            merged.extend(given.clone());
            merged
        }
        RowOp::Delete(..) => {
            rows.remove(&id);
            given.clone()
        }
    };
    let mut texts = Vec::with_capacity(t.columns.len());
    for (name, conv) in &t.columns {
        let is_key = t.key.contains(name);
        let value = match op {
            RowOp::Delete(..) if !is_key => &Value::Null,
            _ => row.get(name).unwrap_or(&Value::Null),
        };
        texts.push(text::text_of(conv, value).map_err(|e| bad(format!("column `{name}`: {e}")))?);
    }
    Ok(match op {
        RowOp::Insert(..) => {
            rows.insert(id, row);
            Planned::Insert(t.oid, texts)
        }
        RowOp::Update(..) => {
            rows.insert(id, row);
            Planned::Update(t.oid, texts)
        }
        RowOp::Delete(..) => Planned::Delete(t.oid, texts),
    })
}
