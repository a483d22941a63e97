//! The MongoDB sink (feature `mongo`): subscribed rows as documents, one collection per
//! destination table (`<prefix><table>`), keyed by the primary key.
//!
//! Documents: `_id` is the key value (a sub-document of the key columns in key order
//! when the key has several), the other fields are the row's columns (JSON columns as
//! embedded documents, integers as 64-bit integers, integers beyond that as strings,
//! timestamps, numerics and dates as the text the publisher sends), and `_kausal_v`
//! holds the row's version `<generation>:<seq>`, both zero-padded to 20 digits so that
//! comparing the strings compares the versions.
//!
//! Versions: a delete leaves a tombstone `{_id: "<collection>|<key JSON>", v}` in the
//! `kausal_tombstones` collection, a truncate a floor `{_id: "<collection>|*", v}`.
//! A change is written only when its version is newer than the row's document, its
//! tombstone and its table's floor: read first (one query per collection per group),
//! then written with the version in the filter (`_kausal_v <= v`, upsert: a transaction
//! may change a row twice), so a concurrent newer write turns the upsert into a
//! duplicate-key error, read as "skip". Re-applying a transaction therefore changes
//! nothing.
//!
//! Bulk writes: `apply` only buffers; the group's writes go at `flush`, just before the
//! store commits, as a few multi-statement commands ([`group`]). A buffer past
//! [`SEND_AT`] rows is written at the next transaction boundary (a split transaction,
//! applied part by part, goes in pieces).
//!
//! Atomicity: on a replica set or sharded cluster (the server's `hello` says so) each
//! flush is one MongoDB transaction: readers see all of a source transaction's changes
//! or none. A standalone server has no transactions: the writes go command by command,
//! each statement guarded, and a crash in the middle is finished by the replay.

mod group;
mod values;

pub use values::{to_bson, version_text};

use super::{Sink, SinkFuture};
use crate::error::{ErrorClass, SinkError};
use crate::txn::{RowChange, Transaction};
use group::{Buffer, Item, Kind, RowOp, StoredMax};
use kausal_bus::Op;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR};
use mongodb::{Client, ClientSession, Collection, Database};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// The driver, for code that reads what the sink wrote.
pub use mongodb;

/// The field holding a document's version.
pub const VERSION_FIELD: &str = "_kausal_v";
/// The collection holding tombstones and truncate floors.
pub const TOMBSTONES: &str = "kausal_tombstones";
/// MongoDB's duplicate-key error: an upsert whose guard failed met a newer document.
const DUPLICATE_KEY: i32 = 11000;
/// Buffered rows past which the buffer is written at the next transaction boundary.
const SEND_AT: usize = 10_000;
/// Statements per command (the server takes up to 100,000 and 48 MB per message).
const STATEMENTS: usize = 1_000;

/// `[[sink]] kind = "mongo"`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSinkConfig {
    /// `mongodb://host:27017/?replicaSet=rs0`.
    pub url: String,
    /// Database holding the collections.
    pub database: String,
    /// Collection name prefix: a table's documents are in `<prefix><table>`.
    #[serde(default)]
    pub prefix: String,
    /// Destination tables written; default: every subscribed table.
    #[serde(default)]
    pub tables: Option<Vec<String>>,
    /// `auto` (default): one MongoDB transaction per source transaction where the
    /// server supports them (replica set, sharded cluster); `off`: guarded writes one by
    /// one even there.
    #[serde(default)]
    pub transactions: Transactions,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transactions {
    #[default]
    Auto,
    Off,
}

impl std::fmt::Debug for MongoSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoSinkConfig")
            .field("url", &kausal_bus::amqp::redact_url(&self.url))
            .field("database", &self.database)
            .field("prefix", &self.prefix)
            .field("tables", &self.tables)
            .field("transactions", &self.transactions)
            .finish()
    }
}

pub struct MongoSink {
    name: String,
    /// Shared by the process's appliers (see [`Sink::flush`] below).
    buffer: std::sync::Mutex<Buffer>,
    db: Database,
    client: Client,
    prefix: String,
    tables: Option<HashSet<String>>,
    transactions: bool,
}

impl MongoSink {
    /// Connects and asks the server whether it runs transactions.
    pub async fn connect(cfg: &MongoSinkConfig) -> Result<MongoSink, SinkError> {
        let endpoint = kausal_bus::amqp::redact_url(&cfg.url);
        let name = format!("mongo {endpoint} ({})", cfg.database);
        // TLS is on by the URL's options; a certificate error can only come from TLS.
        let failed = |e: mongodb::error::Error| super::connect_failed(&name, true, &e, "MongoDB");
        crate::tls::check_mongo_url(&cfg.url).map_err(|e| SinkError::External {
            sink: name.clone(),
            message: e.to_string(),
            class: ErrorClass::Definite,
            source: None,
        })?;
        let client = Client::with_uri_str(&cfg.url).await.map_err(failed)?;
        let db = client.database(&cfg.database);
        let hello = db.run_command(doc! {"hello": 1}).await.map_err(failed)?;
        let clustered =
            hello.get_str("setName").is_ok() || hello.get_str("msg").is_ok_and(|m| m == "isdbgrid");
        let transactions = clustered && cfg.transactions == Transactions::Auto;
        tracing::info!(sink = %name, transactions, "mongo sink connected");
        Ok(MongoSink {
            name,
            buffer: std::sync::Mutex::new(Buffer::default()),
            db,
            client,
            prefix: cfg.prefix.clone(),
            tables: cfg.tables.as_ref().map(|t| t.iter().cloned().collect()),
            transactions,
        })
    }

    /// Whether each source transaction is one MongoDB transaction.
    pub fn uses_transactions(&self) -> bool {
        self.transactions
    }

    /// The collection of a destination table.
    pub fn collection(&self, table: &str) -> Collection<Document> {
        self.db.collection(&format!("{}{table}", self.prefix))
    }

    /// The `_id` of a row: its key value, or a sub-document of the key columns.
    pub fn id(key_columns: &[String], key: &Map<String, Value>) -> Bson {
        if let [only] = key_columns {
            return to_bson(key.get(only).unwrap_or(&Value::Null));
        }
        let mut d = Document::new();
        for c in key_columns {
            d.insert(c.clone(), to_bson(key.get(c).unwrap_or(&Value::Null)));
        }
        Bson::Document(d)
    }

    fn tombstone_id(
        &self,
        table: &str,
        key_columns: &[String],
        key: &Map<String, Value>,
    ) -> String {
        let values: Vec<&Value> = key_columns
            .iter()
            .map(|c| key.get(c).unwrap_or(&Value::Null))
            .collect();
        format!(
            "{}{table}|{}",
            self.prefix,
            serde_json::to_string(&values).unwrap_or_default()
        )
    }

    fn floor_id(&self, table: &str) -> String {
        format!("{}{table}|*", self.prefix)
    }

    fn wanted(&self, change: &RowChange) -> bool {
        self.tables
            .as_ref()
            .is_none_or(|t| t.contains(&change.shape.name))
    }

    fn error(&self, e: mongodb::error::Error) -> SinkError {
        let transient = e.contains_label(TRANSIENT_TRANSACTION_ERROR)
            || e.contains_label("RetryableWriteError")
            || matches!(
                *e.kind,
                ErrorKind::Io(_)
                    | ErrorKind::ServerSelection { .. }
                    | ErrorKind::ConnectionPoolCleared { .. }
            );
        SinkError::External {
            sink: self.name.clone(),
            message: e.to_string(),
            class: if transient {
                ErrorClass::Transient
            } else {
                ErrorClass::Definite
            },
            source: Some(Box::new(e)),
        }
    }

    /// Converts the changes of `tx` this sink writes into the buffer.
    fn convert(&self, tx: &Transaction, buffer: &mut Buffer) {
        let v = version_text(tx.id.generation, tx.id.seq, tx.part);
        for change in tx.changes.iter().filter(|c| self.wanted(c)) {
            let table = &change.shape.name;
            let op = |key: &Map<String, Value>, kind: Kind| RowOp {
                table: table.clone(),
                id: Self::id(&change.shape.key, key),
                tomb: self.tombstone_id(table, &change.shape.key, key),
                v: v.clone(),
                kind,
            };
            match change.op {
                Op::Truncate => buffer.truncate(table.clone(), v.clone()),
                Op::Delete => buffer.push(op(&change.key, Kind::Delete)),
                Op::Insert | Op::Update => {
                    if let Some(old) = change.old_key.as_ref().filter(|o| **o != change.key) {
                        buffer.push(op(old, Kind::Delete));
                    }
                    let mut columns = Document::new();
                    for (column, value) in change.new.iter().flatten() {
                        columns.insert(column.clone(), to_bson(value));
                    }
                    // Columns the source did not log (unchanged TOAST) are merged into
                    // the stored document; otherwise it is replaced whole, so a column
                    // set to NULL or dropped does not linger.
                    let kind = if change.unchanged.is_empty() {
                        Kind::Replace(columns)
                    } else {
                        Kind::Merge(columns)
                    };
                    buffer.push(op(&change.key, kind));
                }
            }
        }
    }

    /// Writes and empties the buffer, in one MongoDB transaction where the server has
    /// them.
    async fn send(&self) -> Result<(), SinkError> {
        let items = {
            let mut buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *buffer).items
        };
        if items.is_empty() {
            return Ok(());
        }
        if !self.transactions {
            return self.write(items, &mut None).await;
        }
        let mut session = Some(
            self.client
                .start_session()
                .await
                .map_err(|e| self.error(e))?,
        );
        let result = async {
            if let Some(s) = session.as_mut() {
                s.start_transaction().await.map_err(|e| self.error(e))?;
            }
            self.write(items, &mut session).await?;
            if let Some(s) = session.as_mut() {
                s.commit_transaction().await.map_err(|e| self.error(e))?;
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            if let Some(s) = session.as_mut() {
                // Fails when the transaction already ended; nothing to undo then.
                let _ = s.abort_transaction().await;
            }
        }
        result
    }

    /// Writes buffered items in order, inside `session`'s transaction when there is one.
    async fn write(
        &self,
        items: Vec<Item>,
        session: &mut Option<ClientSession>,
    ) -> Result<(), SinkError> {
        for item in items {
            match item {
                // In a transaction the reader sees the whole flush at once.
                Item::Rows(ops) if session.is_some() => self.write_rows(ops, session).await?,
                Item::Rows(ops) => {
                    for run in group::table_runs(ops) {
                        self.write_rows(run, session).await?;
                    }
                }
                Item::Truncate { table, v } => {
                    let floor = doc! {"_id": self.floor_id(&table)};
                    let set = doc! {"$set": {"v": &v}};
                    let tombstones = self.db.collection::<Document>(TOMBSTONES);
                    guarded_upsert(&tombstones, floor, "v", &v, set, session)
                        .await
                        .map_err(|e| self.error(e))?;
                    let filter = doc! {VERSION_FIELD: {"$lte": &v}};
                    let coll = self.collection(&table);
                    match session.as_mut() {
                        Some(s) => coll.delete_many(filter).session(s).await,
                        None => coll.delete_many(filter).await,
                    }
                    .map_err(|e| self.error(e))?;
                }
            }
        }
        Ok(())
    }

    /// Writes a run of row changes: the stored versions read once, the net writes per
    /// row in bulk commands (tombstones, then each collection's deletes, then upserts).
    async fn write_rows(
        &self,
        ops: Vec<RowOp>,
        session: &mut Option<ClientSession>,
    ) -> Result<(), SinkError> {
        let stored = self
            .stored_versions(&ops, session)
            .await
            .map_err(|e| self.error(e))?;
        let net = group::coalesce(ops, &stored);
        let tombs: Vec<Document> = net.iter().filter_map(group::tombstone_statement).collect();
        self.command("update", TOMBSTONES, "updates", tombs, session)
            .await?;
        let mut tables: Vec<&str> = Vec::new();
        for n in &net {
            if !tables.contains(&n.table.as_str()) {
                tables.push(&n.table);
            }
        }
        for table in tables {
            let rows = net.iter().filter(|n| n.table == table);
            let deletes = rows
                .clone()
                .filter_map(|n| group::delete_statement(n, VERSION_FIELD))
                .collect();
            let upserts = rows
                .filter_map(|n| group::upsert_statement(n, VERSION_FIELD))
                .collect();
            let coll = format!("{}{table}", self.prefix);
            self.command("delete", &coll, "deletes", deletes, session)
                .await?;
            self.command("update", &coll, "updates", upserts, session)
                .await?;
        }
        Ok(())
    }

    /// Runs `kind` (`update`/`delete`) on `coll` with `statements`, in commands of at
    /// most [`STATEMENTS`]; write errors other than a guard's duplicate key fail it.
    async fn command(
        &self,
        kind: &str,
        coll: &str,
        field: &str,
        statements: Vec<Document>,
        session: &mut Option<ClientSession>,
    ) -> Result<(), SinkError> {
        for chunk in statements.chunks(STATEMENTS) {
            let command = doc! {kind: coll, field: chunk.to_vec(), "ordered": false};
            let reply = match session.as_mut() {
                Some(s) => self.db.run_command(command).session(s).await,
                None => self.db.run_command(command).await,
            }
            .map_err(|e| self.error(e))?;
            for e in reply.get_array("writeErrors").into_iter().flatten() {
                let Bson::Document(e) = e else { continue };
                let code = e.get_i32("code").unwrap_or_default();
                if code == DUPLICATE_KEY {
                    continue; // the guard met a newer document
                }
                return Err(SinkError::External {
                    sink: self.name.clone(),
                    message: format!(
                        "{kind} in collection {coll} failed (code {code}): {}",
                        e.get_str("errmsg").unwrap_or_default()
                    ),
                    class: ErrorClass::Definite,
                    source: None,
                });
            }
            if let Ok(e) = reply.get_document("writeConcernError") {
                return Err(SinkError::External {
                    sink: self.name.clone(),
                    message: format!("{kind} in collection {coll}: write concern: {e}"),
                    class: ErrorClass::Transient,
                    source: None,
                });
            }
        }
        Ok(())
    }

    /// The newest stored version of every row `ops` touch, of its document, its
    /// tombstone and its table's floor. One query for the markers and one per
    /// collection touched.
    async fn stored_versions(
        &self,
        ops: &[RowOp],
        session: &mut Option<ClientSession>,
    ) -> Result<StoredMax, mongodb::error::Error> {
        let mut ids: HashMap<&str, Vec<Bson>> = HashMap::new();
        let mut markers: Vec<Bson> = Vec::new();
        let mut tables: HashSet<&str> = HashSet::new();
        for op in ops {
            if tables.insert(&op.table) {
                markers.push(Bson::String(self.floor_id(&op.table)));
            }
            ids.entry(&op.table).or_default().push(op.id.clone());
            markers.push(Bson::String(op.tomb.clone()));
        }
        let tombstones = self.db.collection(TOMBSTONES);
        let marker: HashMap<String, String> = find_versions(&tombstones, markers, "v", session)
            .await?
            .into_iter()
            .filter_map(|(id, v)| match id {
                Bson::String(id) => Some((id, v)),
                _ => None,
            })
            .collect();
        let mut docs: HashMap<(String, String), String> = HashMap::new();
        for (table, ids) in ids {
            let coll = self.collection(table);
            for (id, v) in find_versions(&coll, ids, VERSION_FIELD, session).await? {
                docs.insert((table.to_string(), group::id_text(&id)), v);
            }
        }
        let mut out = StoredMax::new();
        for op in ops {
            let row = (op.table.clone(), group::id_text(&op.id));
            let newest = [
                docs.get(&row),
                marker.get(&op.tomb),
                marker.get(&self.floor_id(&op.table)),
            ]
            .into_iter()
            .flatten()
            .max();
            if let Some(v) = newest {
                out.insert(row, v.clone());
            }
        }
        Ok(out)
    }
}

impl Sink for MongoSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn apply<'a>(&'a self, tx: &'a Transaction) -> SinkFuture<'a> {
        Box::pin(async move {
            if !tx.changes.iter().any(|c| self.wanted(c)) {
                return Ok(());
            }
            // Past the bound, what is buffered goes before this transaction.
            let full = self.buffer.lock().map_or(true, |b| b.rows >= SEND_AT);
            if full {
                self.send().await?;
            }
            let mut buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
            self.convert(tx, &mut buffer);
            Ok(())
        })
    }

    fn flush(&self) -> SinkFuture<'_> {
        Box::pin(self.send())
    }

    // No `abort`: the buffer is shared by the process's appliers, and dropping it would
    // lose another group's writes before its store commits. A rolled back group's
    // writes go with the next flush (as they went at once before the buffer); its retry
    // writes the same versions, which change nothing.
}

/// `(_id, version)` of the documents of `coll` among `ids` (in chunks).
async fn find_versions(
    coll: &Collection<Document>,
    ids: Vec<Bson>,
    field: &str,
    session: &mut Option<ClientSession>,
) -> Result<Vec<(Bson, String)>, mongodb::error::Error> {
    let mut out = Vec::new();
    for chunk in ids.chunks(1000) {
        let filter = doc! {"_id": {"$in": chunk.to_vec()}};
        let projection = doc! {field: 1};
        let docs: Vec<Document> = match session.as_mut() {
            Some(s) => {
                let mut cursor = coll
                    .find(filter)
                    .projection(projection)
                    .session(&mut *s)
                    .await?;
                let mut docs = Vec::new();
                while let Some(d) = cursor.next(s).await {
                    docs.push(d?);
                }
                docs
            }
            None => {
                use futures_util::TryStreamExt;
                coll.find(filter)
                    .projection(projection)
                    .await?
                    .try_collect()
                    .await?
            }
        };
        for d in docs {
            if let (Some(id), Ok(v)) = (d.get("_id"), d.get_str(field)) {
                out.push((id.clone(), v.to_string()));
            }
        }
    }
    Ok(out)
}

/// Is `e` the duplicate-key error of an upsert whose version guard did not match?
fn duplicate_key(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == DUPLICATE_KEY)
}

/// `update_one(filter + {field <= v}, update, upsert)`: an existing document with a newer
/// version makes the upsert insert a duplicate `_id`, which means "newer is there".
async fn guarded_upsert(
    coll: &Collection<Document>,
    mut filter: Document,
    field: &str,
    v: &str,
    update: Document,
    session: &mut Option<ClientSession>,
) -> Result<(), mongodb::error::Error> {
    filter.insert(field, doc! {"$lte": v});
    let done = match session.as_mut() {
        Some(s) => {
            coll.update_one(filter, update)
                .upsert(true)
                .session(s)
                .await
        }
        None => coll.update_one(filter, update).upsert(true).await,
    };
    match done {
        Err(e) if duplicate_key(&e) => Ok(()),
        other => other.map(|_| ()),
    }
}
