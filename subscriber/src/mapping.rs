//! From published changes to destination rows: which tables and columns an app
//! subscribes to, under which names, masked how; split transactions folded part by part.

use crate::config::{SubscriberConfig, TableSubscription};
use crate::error::MappingError;
use crate::mask::Mask;
use crate::txn::{Remap, RowChange, Staged, TableShape, Transaction, TxId};
use kausal_bus::{Context, Dep, DepKind, Envelope};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

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
        let mut fold = Fold::default();
        for env in parts {
            self.fold(&mut fold, env)?;
        }
        Ok(fold.finish(parts.len() as u32, None))
    }

    /// Adds one part of a split transaction read part by part (in part order) to
    /// `staged`, keeping what the gate needs (dependencies, tables, shapes) and dropping
    /// its changes: they stay in the store's staging table until the transaction is
    /// applied. A part that does not fit the subscription fails here, before anything
    /// is applied.
    pub fn stage(&mut self, staged: &mut StagedFold, env: &Envelope) -> Result<(), MappingError> {
        self.fold(&mut staged.fold, env)?;
        for change in staged.fold.changes.drain(..) {
            staged.changes += 1;
            if !staged.shapes.iter().any(|s| Arc::ptr_eq(s, &change.shape)) {
                staged.shapes.push(change.shape);
            }
        }
        staged.parts += 1;
        Ok(())
    }

    /// The split transaction `staged` folded, without its changes: [`Transaction::staged`]
    /// maps them again part by part when it is applied.
    pub fn finish_staged(&self, staged: StagedFold) -> Transaction {
        let parts = staged.parts;
        let detail = Staged {
            parts,
            shapes: staged.shapes,
            changes: staged.changes,
            mapping: std::sync::Mutex::new(Box::new(self.clone())),
        };
        staged.fold.finish(parts, Some(Arc::new(detail)))
    }

    fn fold(&mut self, fold: &mut Fold, env: &Envelope) -> Result<(), MappingError> {
        if fold.head.is_none() {
            fold.head = Some(Head {
                id: TxId {
                    namespace: env.namespace.as_str().into(),
                    generation: env.generation,
                    seq: env.seq,
                },
                position: env.position.clone(),
                commit_ts_us: env.commit_ts_us,
                txid: env.txid.clone(),
                context: env.context.clone(),
            });
        }
        for d in &env.deps {
            match fold.deps.get(&d.k) {
                Some(prev) if prev.kind == DepKind::Write => {}
                _ => {
                    fold.deps.insert(d.k, *d);
                }
            }
        }
        for c in &env.changes {
            if !fold.tables.contains(&c.table) {
                fold.tables.push(c.table.clone());
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
            fold.changes.push(RowChange {
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
        Ok(())
    }
}

/// Parts folded into one transaction so far.
#[derive(Default)]
struct Fold {
    /// The fields every part shares, from the first.
    head: Option<Head>,
    deps: BTreeMap<u32, Dep>,
    tables: Vec<String>,
    changes: Vec<RowChange>,
}

impl Fold {
    fn finish(self, parts: u32, staged: Option<Arc<Staged>>) -> Transaction {
        let first = self.head.unwrap_or_else(|| Head {
            id: TxId {
                namespace: "".into(),
                generation: 0,
                seq: 0,
            },
            position: String::new(),
            commit_ts_us: 0,
            txid: String::new(),
            context: Context::default(),
        });
        Transaction {
            id: first.id,
            position: first.position,
            commit_ts_us: first.commit_ts_us,
            txid: first.txid,
            context: first.context,
            parts,
            changes: self.changes,
            deps: self.deps.into_values().collect(),
            tables: self.tables,
            staged,
            part: None,
        }
    }
}

struct Head {
    id: TxId,
    position: String,
    commit_ts_us: i64,
    txid: String,
    context: Context,
}

/// A split transaction being read part by part ([`Mapping::stage`]).
#[derive(Default)]
pub struct StagedFold {
    fold: Fold,
    parts: u32,
    shapes: Vec<Arc<TableShape>>,
    changes: usize,
}

impl Remap for Mapping {
    fn assemble(&mut self, envelopes: &[Envelope]) -> Result<Transaction, MappingError> {
        Mapping::assemble(self, envelopes)
    }
}
