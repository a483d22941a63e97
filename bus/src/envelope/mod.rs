//! The wire format: what one AMQP message carries.
//!
//! A message body is a 4-byte header — the magic `KSL` and the major format version —
//! followed by a JSON document holding one or more [`Envelope`]s (one per source
//! transaction, or per part of a split transaction). The header lets a decoder reject a
//! newer major version or foreign bytes before parsing anything; JSON keeps the payload
//! readable with standard tools and lets minor versions add fields that older
//! subscribers ignore. See `docs/wire-format.md` for an annotated example.
//!
//! This module holds the types; [`codec`] turns them into bytes and back (format 2 by
//! default, format 1 on request, both decoded). It is pure: no I/O, no clocks.
//! Decoding never panics on any input.

mod codec;

pub use codec::{decode, encode, encode_as, BatchWriter, FORMAT_MAJOR, MAGIC};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One source transaction (or one part of a large one), as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The publisher namespace (also the first segment of the routing key).
    pub namespace: String,
    /// Changes whenever the publisher lost its checkpoint and restarted its counters and
    /// sequence numbers; subscribers reset their state for this namespace on a new one.
    pub generation: u64,
    /// Gap-free, starting at 1 in each generation. All parts of a split transaction
    /// share the sequence number.
    pub seq: u64,
    /// Zero-based index of this part within the transaction.
    #[serde(default)]
    pub part: u32,
    /// Set on the final part only: the number of parts of this transaction. Unsplit
    /// transactions have `part = 0, parts = Some(1)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<u32>,
    /// Where this transaction ends in the source log, e.g. `pg:0/16B3748` or
    /// `mysql:0-1-42`. Opaque to subscribers; useful to operators.
    pub position: String,
    /// Commit time at the source, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    /// Transaction id at the source (Postgres xid, MySQL GTID or similar).
    pub txid: String,
    /// Who and why, as the application attached it.
    #[serde(default, skip_serializing_if = "Context::is_empty")]
    pub context: Context,
    /// Tables whose published schema this envelope carries: always the first time a
    /// table appears after a publisher start, and whenever it changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schemas: Vec<TableSchema>,
    /// The row changes of this part, in source order.
    #[serde(default)]
    pub changes: Vec<Change>,
    /// Dependencies of this part; see `docs/wire-format.md` for the rule.
    #[serde(default)]
    pub deps: Vec<Dep>,
    /// Set on a bootstrap chunk: current rows of one table, sent to the queue of the
    /// subscriber that asked only (see `docs/bootstrap.md`). It is no transaction of the
    /// stream: `seq` is the version of its rows (the last transaction published before
    /// it), its changes are inserts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Snapshot>,
}

/// What a bootstrap chunk belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The request, as the subscriber named it.
    pub request: String,
    /// Published table name.
    pub table: String,
    /// Chunk number within the table, from 0.
    pub chunk: u64,
    /// Key of the last row of this chunk (in key order): where the next one starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_key: Option<Map<String, Value>>,
    /// Set on the table's last chunk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
    /// The source's estimate of the table's rows, for progress reports.
    #[serde(default)]
    pub estimated_rows: u64,
    /// The stream's last sequence number before the request's first low watermark: a
    /// subscriber that has applied nothing of the stream joins it after this one (every
    /// later transaction reached its queue, every earlier one is in the chunks). Absent
    /// from publishers before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_after: Option<u64>,
}

impl Envelope {
    /// True when this is the last (or only) part of its transaction.
    pub fn is_last_part(&self) -> bool {
        self.parts.is_some()
    }
}

/// Application context, from `pg_logical_emit_message(true, 'kausal', '<json>')` or the
/// MySQL equivalent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Context {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Session names the application tagged this transaction with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<String>,
    /// Free-form application context, passed through untouched.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

impl Context {
    pub fn is_empty(&self) -> bool {
        self.user.is_none()
            && self.request_id.is_none()
            && self.host.is_none()
            && self.sessions.is_empty()
            && self.extra.is_empty()
    }
}

/// The published shape of one table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableSchema {
    pub table: String,
    /// Published columns in source order: `(name, source type name)`.
    pub columns: Vec<Column>,
    /// Names of the primary key columns (always published).
    pub key: Vec<String>,
    /// True when the columns differ from what this publisher announced before for the
    /// table (DDL happened at the source).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub changed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// Source type, e.g. `int4`, `text`, `numeric`, `_int4` (array), `timestamptz`.
    #[serde(rename = "type")]
    pub type_name: String,
}

/// Kinds of row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// The whole table was emptied; `key` and row images are absent.
    Truncate,
}

/// One row change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub op: Op,
    /// Published table name.
    pub table: String,
    /// Primary key of the row after the change (before it, for deletes).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub key: Map<String, Value>,
    /// Primary key before the change, only when an update changed the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_key: Option<Map<String, Value>>,
    /// Published columns after the change (insert, update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Map<String, Value>>,
    /// Published columns before the change, when the source logs them
    /// (Postgres `REPLICA IDENTITY FULL`, MySQL `binlog_row_image=FULL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Map<String, Value>>,
    /// Columns left out of `new` because the source did not log them (unchanged
    /// out-of-line TOAST values): the subscriber keeps its stored value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged: Vec<String>,
}

/// Read or write dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DepKind {
    #[serde(rename = "r")]
    Read,
    #[serde(rename = "w")]
    Write,
}

/// A dependency on a hashed key: see `docs/wire-format.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dep {
    /// Hashed key (FNV-1a, modulo the publisher's key space).
    pub k: u32,
    /// Version: for a write, this transaction's operation number on `k`; for a read,
    /// the operation number of the last write to `k` it observed.
    pub v: u64,
    pub kind: DepKind,
    /// Sequence number of the latest earlier transaction this dependency waits for
    /// (0: none). Lets a subscriber without counters wait on its applied-through mark.
    pub after: u64,
}

/// Errors decoding a message body.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {len} bytes, too short for a Kausal header")]
    Truncated { len: usize },
    #[error("not a Kausal message (bad magic bytes)")]
    NotKausal,
    #[error(
        "message uses wire format version {found}, this subscriber reads up to {supported}: \
         upgrade the subscriber"
    )]
    NewerVersion { found: u8, supported: u8 },
    #[error("malformed Kausal message body")]
    Malformed(#[source] serde_json::Error),
    #[error("message holds no envelopes")]
    Empty,
    #[error("envelope {seq} refers to table schema {index}, the message has {tables}")]
    UnknownSchema {
        seq: u64,
        index: usize,
        tables: usize,
    },
}
