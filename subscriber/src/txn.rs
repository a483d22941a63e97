//! A source transaction as a subscriber sees it: all parts assembled, mapped onto the
//! subscribed tables and columns, with its merged dependency set.

use crate::config::{SubscriberConfig, TableMode, TableSubscription};
use crate::error::MappingError;
use crate::mask::Mask;
use kausal_bus::{Context, Dep, DepKind, Envelope, Op};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Identifies a transaction across redeliveries and publisher replays.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId {
    pub namespace: Arc<str>,
    pub generation: u64,
    pub seq: u64,
}

impl std::fmt::Display for TxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.generation, self.seq)
    }
}

/// The shape of a destination table, from the published schema and the subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct TableShape {
    /// Destination table name.
    pub name: String,
    /// Destination column name and the source type name (`int4`, `text`, …).
    pub columns: Vec<(String, String)>,
    /// Destination names of the key columns.
    pub key: Vec<String>,
    pub mode: TableMode,
}

/// One row change, in destination names.
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    pub op: Op,
    /// Published table name.
    pub source_table: String,
    pub shape: Arc<TableShape>,
    /// Key after the change (before it, for a delete). Empty for truncate.
    pub key: Map<String, Value>,
    /// Key before an update that changed it.
    pub old_key: Option<Map<String, Value>>,
    /// Subscribed columns after the change.
    pub new: Option<Map<String, Value>>,
    /// Subscribed columns before the change, when the source logged them.
    pub old: Option<Map<String, Value>>,
    /// Subscribed columns the source did not log (unchanged TOAST): keep what is stored.
    pub unchanged: Vec<String>,
}

/// A whole source transaction, ready for the causal gate and the sinks.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub id: TxId,
    pub position: String,
    pub commit_ts_us: i64,
    pub txid: String,
    pub context: Context,
    /// Changes to subscribed tables only; may be empty (the transaction is still counted).
    pub changes: Vec<RowChange>,
    /// One dependency per key (a read upgraded to a write in a later part counts as the
    /// write).
    pub deps: Vec<Dep>,
    /// Published names of every table the transaction changed, subscribed or not.
    pub tables: Vec<String>,
    /// Number of envelope parts it came in.
    pub parts: u32,
}

impl Transaction {
    /// Stable across redeliveries and replays: `<namespace>/<generation>/<seq>`. Give it
    /// to anything a callback does outside the store (an email API, a webhook).
    pub fn idempotency_key(&self) -> String {
        self.id.to_string()
    }
}

/// Turns published table changes into destination row changes.
#[derive(Debug, Clone)]
pub struct Mapping {
    tables: HashMap<(String, String), TableSubscription>,
    /// Destination shapes already built, per (namespace, table, published columns).
    shapes: HashMap<(String, String), (Vec<kausal_bus::Column>, Arc<TableShape>)>,
    /// The secret of `hash` masks (checked by `SubscriberConfig::validate`).
    salt: Vec<u8>,
}

impl Mapping {
    pub fn new(cfg: &SubscriberConfig) -> Self {
        Mapping {
            tables: cfg
                .tables
                .iter()
                .map(|t| ((t.namespace.clone(), t.name.clone()), t.clone()))
                .collect(),
            shapes: HashMap::new(),
            salt: cfg.mask_salt().ok().flatten().unwrap_or_default(),
        }
    }

    pub fn subscribes(&self, namespace: &str, table: &str) -> bool {
        self.tables
            .contains_key(&(namespace.to_string(), table.to_string()))
    }

    fn shape(
        &mut self,
        envelope: &Envelope,
        table: &str,
    ) -> Result<Option<Arc<TableShape>>, MappingError> {
        let id = (envelope.namespace.clone(), table.to_string());
        let Some(sub) = self.tables.get(&id) else {
            return Ok(None);
        };
        let schema = envelope
            .schemas
            .iter()
            .find(|s| s.table == table)
            .ok_or_else(|| MappingError::MissingSchema {
                namespace: envelope.namespace.clone(),
                seq: envelope.seq,
                table: table.to_string(),
            })?;
        if let Some((columns, shape)) = self.shapes.get(&id) {
            if *columns == schema.columns {
                return Ok(Some(shape.clone()));
            }
        }
        let published: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
        let wanted: Vec<&str> = match &sub.columns {
            None => published.clone(),
            Some(cols) => {
                for c in cols {
                    if !published.contains(&c.as_str()) {
                        return Err(MappingError::MissingColumn {
                            namespace: envelope.namespace.clone(),
                            table: table.to_string(),
                            column: c.clone(),
                            published: published.join(", "),
                        });
                    }
                }
                // Source order, key columns always included.
                published
                    .iter()
                    .copied()
                    .filter(|p| cols.iter().any(|c| c == p) || schema.key.iter().any(|k| k == p))
                    .collect()
            }
        };
        for (column, mask) in &sub.mask {
            if !published.contains(&column.as_str()) {
                return Err(MappingError::MissingColumn {
                    namespace: envelope.namespace.clone(),
                    table: table.to_string(),
                    column: column.clone(),
                    published: published.join(", "),
                });
            }
            if *mask == Mask::Redact && schema.key.contains(column) {
                return Err(MappingError::RedactedKey {
                    namespace: envelope.namespace.clone(),
                    table: table.to_string(),
                    column: column.clone(),
                });
            }
        }
        let dest = |name: &str| sub.rename.get(name).cloned().unwrap_or(name.to_string());
        let shape = Arc::new(TableShape {
            name: sub.into.clone().unwrap_or_else(|| table.to_string()),
            columns: schema
                .columns
                .iter()
                .filter(|c| wanted.contains(&c.name.as_str()))
                .map(|c| {
                    // A hash is text whatever the column held.
                    let hashed = sub.mask.get(&c.name) == Some(&Mask::Hash);
                    let ty = if hashed { "text" } else { c.type_name.as_str() };
                    (dest(&c.name), ty.to_string())
                })
                .collect(),
            key: schema.key.iter().map(|k| dest(k)).collect(),
            mode: sub.mode,
        });
        self.shapes
            .insert(id, (schema.columns.clone(), shape.clone()));
        Ok(Some(shape))
    }

    fn project(
        &self,
        namespace: &str,
        table: &str,
        row: &Map<String, Value>,
    ) -> Map<String, Value> {
        let sub = &self.tables[&(namespace.to_string(), table.to_string())];
        let shape = &self.shapes[&(namespace.to_string(), table.to_string())].1;
        let mut out = Map::new();
        for (name, value) in row {
            let dest = sub.rename.get(name).map(String::as_str).unwrap_or(name);
            if shape.columns.iter().any(|(c, _)| c == dest) {
                let mask = sub.mask.get(name).copied().unwrap_or_default();
                out.insert(
                    dest.to_string(),
                    crate::mask::apply(mask, value, &self.salt),
                );
            }
        }
        out
    }

    /// Builds the transaction from all of its parts (in part order).
    pub fn assemble(&mut self, parts: &[Envelope]) -> Result<Transaction, MappingError> {
        let first = &parts[0];
        let id = TxId {
            namespace: first.namespace.as_str().into(),
            generation: first.generation,
            seq: first.seq,
        };
        let mut deps: BTreeMap<u32, Dep> = BTreeMap::new();
        let mut tables: Vec<String> = Vec::new();
        let mut changes = Vec::new();
        for env in parts {
            for d in &env.deps {
                match deps.get(&d.k) {
                    Some(prev) if prev.kind == DepKind::Write => {}
                    _ => {
                        deps.insert(d.k, *d);
                    }
                }
            }
            for c in &env.changes {
                if !tables.contains(&c.table) {
                    tables.push(c.table.clone());
                }
                let Some(shape) = self.shape(env, &c.table)? else {
                    continue;
                };
                let ns = env.namespace.as_str();
                let unchanged = c
                    .unchanged
                    .iter()
                    .filter_map(|u| {
                        let sub = &self.tables[&(ns.to_string(), c.table.clone())];
                        let d = sub.rename.get(u).cloned().unwrap_or(u.clone());
                        shape.columns.iter().any(|(n, _)| *n == d).then_some(d)
                    })
                    .collect();
                changes.push(RowChange {
                    op: c.op,
                    source_table: c.table.clone(),
                    key: self.project(ns, &c.table, &c.key),
                    old_key: c.old_key.as_ref().map(|k| self.project(ns, &c.table, k)),
                    new: c.new.as_ref().map(|r| self.project(ns, &c.table, r)),
                    old: c.old.as_ref().map(|r| self.project(ns, &c.table, r)),
                    unchanged,
                    shape,
                });
            }
        }
        Ok(Transaction {
            position: first.position.clone(),
            commit_ts_us: first.commit_ts_us,
            txid: first.txid.clone(),
            context: first.context.clone(),
            parts: parts.len() as u32,
            id,
            changes,
            deps: deps.into_values().collect(),
            tables,
        })
    }
}
