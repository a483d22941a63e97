//! Turns row changes in the shared vocabulary ([`super::change`]) into envelopes: column
//! allowlist and renames, value conversion, keys, dependencies, context, and splitting of
//! large transactions.
//!
//! Pure and synchronous: the stream loop resolves catalog facts (types, keys, foreign
//! keys) before handing a relation over, so the same input always gives the same
//! envelopes — which is what makes replays after a crash byte-identical.

use super::change::RowChange;
/// The vocabulary under the names callers outside this crate build changes with
/// (`kausal-testkit`); `Message` was its name while it lived in pgoutput's decoder.
pub use super::change::{Datum, OldKind, RowChange as Message};
use super::values::Conv;
use crate::error::SourceError;
use crate::tracker::Tracker;
use kausal_bus::deps::{session_key, KeyHasher};
use kausal_bus::{Change, Column, Context, Envelope, Op, TableSchema};
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap};

/// A part is also cut when its values reach this many bytes, so wide rows keep messages
/// (and subscriber memory) bounded too.
pub const MAX_PART_BYTES: usize = 4 * 1024 * 1024;

/// One column of a published relation.
#[derive(Debug, Clone)]
pub struct ColumnRt {
    /// Published name; `None` when the column is not published.
    pub out: Option<String>,
    pub conv: Conv,
}

/// Everything needed to turn one relation's tuples into changes.
#[derive(Debug, Clone)]
pub struct TableRt {
    pub published: String,
    pub columns: Vec<ColumnRt>,
    /// Relation column indices of the key, in key order.
    pub key: Vec<usize>,
    /// References: (relation column indices in the referenced key's order, published
    /// name of the referenced table).
    pub refs: Vec<(Vec<usize>, String)>,
    pub schema: TableSchema,
    pub fingerprint: u64,
}

/// Key hash of a row from its key values' text forms.
pub fn row_key(table: &str, values: &[&[u8]], space: u32) -> u32 {
    let mut h = KeyHasher::new("row");
    h.field(table.as_bytes());
    for v in values {
        h.field(v);
    }
    h.finish(space)
}

fn as_refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(|b| b.as_slice()).collect()
}

/// Key hash standing for a whole table: every change reads it, a truncate writes it, so
/// a truncate is ordered after all earlier changes of the table and before later ones.
pub use kausal_bus::deps::table_key;

struct Open {
    position: String,
    txid: String,
    commit_ts_us: i64,
}

pub struct Assembler {
    namespace: String,
    key_space: u32,
    max_part_changes: usize,
    pub tracker: Tracker,
    tables: HashMap<u32, TableRt>,
    /// Published table name → published key column names, for read hints.
    key_columns: HashMap<String, Vec<String>>,
    open: Option<Open>,
    part: u32,
    changes: Vec<Change>,
    part_bytes: usize,
    part_tables: BTreeSet<u32>,
    context: Context,
    /// Session keys and read hints seen before the first change of the transaction.
    pending_writes: Vec<u32>,
    pending_reads: Vec<u32>,
}

impl Assembler {
    pub fn new(
        namespace: &str,
        key_space: u32,
        max_part_changes: usize,
        tracker: Tracker,
        key_columns: HashMap<String, Vec<String>>,
    ) -> Self {
        Assembler {
            namespace: namespace.to_string(),
            key_space,
            max_part_changes,
            tracker,
            tables: HashMap::new(),
            key_columns,
            open: None,
            part: 0,
            changes: Vec::new(),
            part_bytes: 0,
            part_tables: BTreeSet::new(),
            context: Context::default(),
            pending_writes: Vec::new(),
            pending_reads: Vec::new(),
        }
    }

    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    pub fn knows(&self, oid: u32) -> bool {
        self.tables.contains_key(&oid)
    }

    pub fn relation(&mut self, oid: u32, table: TableRt) {
        self.tables.insert(oid, table);
    }

    /// A transaction begins: its position in the source's log (as envelopes show it),
    /// its id at the source, and its commit time in microseconds since the Unix epoch.
    pub fn begin_at(&mut self, position: String, txid: String, commit_ts_us: i64) {
        self.open = Some(Open {
            position,
            txid,
            commit_ts_us,
        });
        self.part = 0;
        self.context = Context::default();
        self.pending_writes.clear();
        self.pending_reads.clear();
    }

    /// A `pg_logical_emit_message(true, 'kausal', ...)` payload: context, sessions, hints.
    /// Malformed JSON is logged and ignored: the transaction itself still publishes.
    pub fn context_message(&mut self, content: &[u8]) {
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(content) else {
            tracing::warn!("ignoring a 'kausal' message that is not a JSON object");
            return;
        };
        let take_str = |obj: &mut Map<String, Value>, k: &str| match obj.remove(k) {
            Some(Value::String(s)) => Some(s),
            Some(other) => Some(other.to_string()),
            None => None,
        };
        if let Some(u) = take_str(&mut obj, "user") {
            self.context.user = Some(u);
        }
        if let Some(r) = take_str(&mut obj, "request_id") {
            self.context.request_id = Some(r);
        }
        if let Some(h) = take_str(&mut obj, "host") {
            self.context.host = Some(h);
        }
        let mut sessions = Vec::new();
        for k in ["session", "sessions"] {
            match obj.remove(k) {
                Some(Value::String(s)) => sessions.push(s),
                Some(Value::Array(a)) => sessions.extend(a.into_iter().map(|v| match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                })),
                Some(other) => sessions.push(other.to_string()),
                None => {}
            }
        }
        for s in sessions {
            self.pending_writes.push(session_key(&s, self.key_space));
            self.context.sessions.push(s);
        }
        if let Some(Value::Array(reads)) = obj.remove("reads") {
            for hint in reads {
                match self.hint_key(&hint) {
                    Some(k) => self.pending_reads.push(k),
                    None => tracing::warn!(
                        "ignoring a read hint: expected {{\"table\": <published table>, \
                         \"key\": {{<key column>: <value>}}}}"
                    ),
                }
            }
        }
        if let Some(Value::Object(extra)) = obj.remove("context") {
            self.context.extra.extend(extra);
        }
        self.context.extra.extend(obj);
        if self.tracker.in_transaction() {
            self.flush_pending();
        }
    }

    fn hint_key(&self, hint: &Value) -> Option<u32> {
        let table = hint.get("table")?.as_str()?;
        let key = hint.get("key")?.as_object()?;
        let cols = self.key_columns.get(table)?;
        let texts: Vec<String> = cols
            .iter()
            .map(|c| {
                key.get(c).map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Bool(true) => "t".into(),
                    Value::Bool(false) => "f".into(),
                    other => other.to_string(),
                })
            })
            .collect::<Option<_>>()?;
        let refs: Vec<&[u8]> = texts.iter().map(|s| s.as_bytes()).collect();
        Some(row_key(table, &refs, self.key_space))
    }

    fn flush_pending(&mut self) {
        for k in std::mem::take(&mut self.pending_writes) {
            self.tracker.write(k);
        }
        for k in std::mem::take(&mut self.pending_reads) {
            self.tracker.read(k);
        }
    }

    /// Adds a row change; returns a full part when the transaction must be split.
    pub fn change(&mut self, msg: RowChange<'_>) -> Result<Option<Envelope>, SourceError> {
        // A full part is cut only when another change follows, so the commit closes
        // the last full part instead of sending an empty one.
        let full = (self.changes.len() >= self.max_part_changes
            || self.part_bytes >= MAX_PART_BYTES)
            .then(|| self.cut(false));
        match msg {
            RowChange::Insert { rel, new } => self.row(rel, Op::Insert, None, Some(new))?,
            RowChange::Update { rel, old, new } => self.row(rel, Op::Update, old, Some(new))?,
            RowChange::Delete { rel, old } => self.row(rel, Op::Delete, Some(old), None)?,
            RowChange::Truncate { rels } => {
                for rel in rels {
                    let Some(t) = self.tables.get(&rel) else {
                        continue;
                    };
                    let published = t.published.clone();
                    self.start_change();
                    self.tracker.write(table_key(&published, self.key_space));
                    self.part_tables.insert(rel);
                    self.changes.push(Change {
                        op: Op::Truncate,
                        table: published,
                        key: Map::new(),
                        old_key: None,
                        new: None,
                        old: None,
                        unchanged: vec![],
                    });
                }
            }
        }
        Ok(full)
    }

    fn start_change(&mut self) {
        if !self.tracker.in_transaction() {
            self.tracker.seq();
            self.flush_pending();
        }
    }

    fn row(
        &mut self,
        rel: u32,
        op: Op,
        old: Option<(OldKind, Vec<Datum<'_>>)>,
        new: Option<Vec<Datum<'_>>>,
    ) -> Result<(), SourceError> {
        self.start_change();
        let space = self.key_space;
        let t = self
            .tables
            .get(&rel)
            .ok_or(SourceError::UnknownRelation { oid: rel })?;
        let key_of = |tuple: &[Datum<'_>]| -> Option<Vec<Vec<u8>>> {
            t.key
                .iter()
                .map(|&i| match tuple.get(i) {
                    Some(Datum::Text(b)) => Some(b.to_vec()),
                    _ => None,
                })
                .collect()
        };
        let key_map = |texts: &[Vec<u8>]| -> Map<String, Value> {
            t.key
                .iter()
                .zip(texts)
                .filter_map(|(&i, text)| {
                    let c = &t.columns[i];
                    c.out.clone().map(|name| (name, c.conv.convert(text)))
                })
                .collect()
        };
        let mut bytes = 0;
        let mut image =
            |tuple: &[Datum<'_>], fallback: Option<&[Datum<'_>]>, unchanged: &mut Vec<String>| {
                let mut m = Map::new();
                for (i, (d, c)) in tuple.iter().zip(&t.columns).enumerate() {
                    let Some(name) = &c.out else { continue };
                    let v = match d {
                        Datum::Null => Value::Null,
                        Datum::Text(b) => {
                            bytes += b.len();
                            c.conv.convert(b)
                        }
                        Datum::Unchanged => match fallback.and_then(|f| f.get(i)) {
                            Some(Datum::Text(b)) => {
                                bytes += b.len();
                                c.conv.convert(b)
                            }
                            Some(Datum::Null) => Value::Null,
                            _ => {
                                unchanged.push(name.clone());
                                continue;
                            }
                        },
                    };
                    m.insert(name.clone(), v);
                }
                m
            };
        let full_old = match &old {
            Some((OldKind::Full, tuple)) => Some(tuple.as_slice()),
            _ => None,
        };
        let mut unchanged = Vec::new();
        let new_image = new.as_deref().map(|n| image(n, full_old, &mut unchanged));
        let old_image = full_old.map(|o| image(o, None, &mut Vec::new()));
        let old_key = old.as_ref().and_then(|(_, o)| key_of(o));
        // An unchanged key column may come as an unchanged-TOAST marker: take the old key.
        let new_key = new
            .as_deref()
            .and_then(|n| key_of(n).or_else(|| old_key.clone()));
        // Reads through references, from the new row image.
        let mut reads: Vec<u32> = vec![table_key(&t.published, space)];
        if let Some(n) = &new {
            for (cols, target) in &t.refs {
                let vals: Option<Vec<&[u8]>> = cols
                    .iter()
                    .map(|&i| match n.get(i) {
                        Some(Datum::Text(b)) => Some(*b),
                        _ => None,
                    })
                    .collect();
                if let Some(vals) = vals {
                    reads.push(row_key(target, &vals, space));
                }
            }
        }
        let published = t.published.clone();
        let key_texts =
            new_key
                .clone()
                .or_else(|| old_key.clone())
                .ok_or_else(|| SourceError::KeyMissing {
                    table: published.clone(),
                })?;
        let key = key_map(&key_texts);
        let moved_from = match (&old_key, &new_key) {
            (Some(o), Some(n)) if o != n => Some(o.clone()),
            _ => None,
        };
        let change = Change {
            op,
            table: published.clone(),
            key,
            old_key: moved_from.as_ref().map(|o| key_map(o)),
            new: new_image,
            old: old_image,
            unchanged,
        };
        self.tracker
            .write(row_key(&published, &as_refs(&key_texts), space));
        if let Some(o) = &moved_from {
            self.tracker.write(row_key(&published, &as_refs(o), space));
        }
        for r in reads {
            self.tracker.read(r);
        }
        self.part_bytes += bytes;
        self.part_tables.insert(rel);
        self.changes.push(change);
        Ok(())
    }

    fn cut(&mut self, last: bool) -> Envelope {
        let open = self.open.as_ref();
        let mut schemas = Vec::new();
        for oid in std::mem::take(&mut self.part_tables) {
            if let Some(t) = self.tables.get(&oid) {
                let prev = self
                    .tracker
                    .state
                    .schemas
                    .insert(t.published.clone(), t.fingerprint);
                let mut s = t.schema.clone();
                s.changed = prev.is_some_and(|p| p != t.fingerprint);
                schemas.push(s);
            }
        }
        let envelope = Envelope {
            namespace: self.namespace.clone(),
            generation: self.tracker.state.generation,
            seq: self.tracker.seq(),
            part: self.part,
            parts: last.then_some(self.part + 1),
            position: open.map(|o| o.position.clone()).unwrap_or_default(),
            commit_ts_us: open.map(|o| o.commit_ts_us).unwrap_or_default(),
            txid: open.map(|o| o.txid.clone()).unwrap_or_default(),
            context: self.context.clone(),
            schemas,
            changes: std::mem::take(&mut self.changes),
            deps: self.tracker.take_part(),
            snapshot: None,
        };
        self.part += 1;
        self.part_bytes = 0;
        envelope
    }

    /// Ends the transaction; returns its last part if it published anything.
    pub fn commit(&mut self) -> Option<Envelope> {
        let out = self.tracker.in_transaction().then(|| self.cut(true));
        self.tracker.commit();
        self.open = None;
        self.changes.clear();
        self.part_tables.clear();
        self.part_bytes = 0;
        out
    }
}

/// A reference from a table's rows to another published table's key.
pub struct RefSpec<'a> {
    /// Local columns holding the referenced key.
    pub local: &'a [String],
    /// Referenced source table.
    pub target: (String, String),
    /// Referenced columns, in `local`'s order (declared foreign keys); `None` for
    /// configured references, whose columns follow the target's key order.
    pub target_columns: Option<&'a [String]>,
}

/// Resolves references into (local column indices in the referenced key's order,
/// published name of the referenced table). `index_of` finds a local column; `target`
/// gives a published table's published name and source key columns. References to
/// unpublished tables or that do not cover the target's key are dropped.
pub fn resolve_refs(
    specs: &[RefSpec<'_>],
    index_of: impl Fn(&str) -> Option<usize>,
    target: impl Fn(&(String, String)) -> Option<(String, Vec<String>)>,
) -> Vec<(Vec<usize>, String)> {
    let mut refs = Vec::new();
    for spec in specs {
        let Some((published, key)) = target(&spec.target) else {
            continue;
        };
        let ordered: Option<Vec<usize>> = match spec.target_columns {
            Some(rc) if rc.len() == spec.local.len() => key
                .iter()
                .map(|k| {
                    rc.iter()
                        .position(|c| c == k)
                        .and_then(|p| index_of(&spec.local[p]))
                })
                .collect(),
            Some(_) => None,
            None if spec.local.len() == key.len() => {
                spec.local.iter().map(|c| index_of(c)).collect()
            }
            None => None,
        };
        if let Some(ordered) = ordered.filter(|o| o.len() == key.len()) {
            refs.push((ordered, published));
        }
    }
    refs
}

/// Builds the published schema of a relation and its fingerprint.
pub fn schema_of(
    published: &str,
    columns: &[(String, String, bool)],
    key: &[String],
) -> (TableSchema, u64) {
    let schema = TableSchema {
        table: published.to_string(),
        columns: columns
            .iter()
            .filter(|(_, _, on)| *on)
            .map(|(name, ty, _)| Column {
                name: name.clone(),
                type_name: ty.clone(),
            })
            .collect(),
        key: key.to_vec(),
        changed: false,
    };
    let mut h = KeyHasher::new("schema");
    for c in &schema.columns {
        h.field(c.name.as_bytes()).field(c.type_name.as_bytes());
    }
    for k in key {
        h.field(k.as_bytes());
    }
    (schema, u64::from(h.finish(u32::MAX)))
}
