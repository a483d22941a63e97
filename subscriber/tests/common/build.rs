//! Builders of row changes and transactions, as the mapping would produce them.
#![allow(dead_code)]

use kausal_bus::{Context, Op};
use kausal_subscriber::config::TableMode;
use kausal_subscriber::txn::{RowChange, TableShape, Transaction, TxId};
use serde_json::{Map, Value};
use std::sync::Arc;

pub fn shape(
    name: &str,
    columns: &[(&str, &str)],
    key: &[&str],
    mode: TableMode,
) -> Arc<TableShape> {
    Arc::new(TableShape {
        name: name.to_string(),
        columns: columns
            .iter()
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .collect(),
        key: key.iter().map(|k| k.to_string()).collect(),
        mode,
    })
}

pub fn obj(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

pub fn key_of(shape: &TableShape, row: &Map<String, Value>) -> Map<String, Value> {
    shape
        .key
        .iter()
        .map(|k| (k.clone(), row[k].clone()))
        .collect()
}

pub fn change(op: Op, shape: &Arc<TableShape>, row: Value) -> RowChange {
    let row = obj(row);
    RowChange {
        op,
        source_table: shape.name.clone(),
        shape: shape.clone(),
        key: key_of(shape, &row),
        old_key: None,
        new: matches!(op, Op::Insert | Op::Update).then(|| row.clone()),
        old: None,
        unchanged: Vec::new(),
    }
}

pub fn insert(shape: &Arc<TableShape>, row: Value) -> RowChange {
    change(Op::Insert, shape, row)
}

pub fn update(shape: &Arc<TableShape>, row: Value, unchanged: &[&str]) -> RowChange {
    RowChange {
        unchanged: unchanged.iter().map(|u| u.to_string()).collect(),
        ..change(Op::Update, shape, row)
    }
}

pub fn delete(shape: &Arc<TableShape>, key: Value) -> RowChange {
    change(Op::Delete, shape, key)
}

pub fn truncate(shape: &Arc<TableShape>) -> RowChange {
    RowChange {
        op: Op::Truncate,
        source_table: shape.name.clone(),
        shape: shape.clone(),
        key: Map::new(),
        old_key: None,
        new: None,
        old: None,
        unchanged: Vec::new(),
    }
}

pub fn tx_in(
    namespace: &str,
    generation: u64,
    seq: u64,
    changes: Vec<RowChange>,
) -> Arc<Transaction> {
    Arc::new(Transaction {
        id: TxId {
            namespace: namespace.into(),
            generation,
            seq,
        },
        position: format!("0/{seq}"),
        commit_ts_us: 1_700_000_000_000_000 + seq as i64,
        txid: seq.to_string(),
        context: Context::default(),
        changes,
        deps: Vec::new(),
        tables: Vec::new(),
        parts: 1,
        staged: None,
        part: None,
    })
}

pub fn tx(seq: u64, changes: Vec<RowChange>) -> Arc<Transaction> {
    tx_in("app", 1, seq, changes)
}
