//! The row changes of a whole group, coalesced per (table, key) in apply order, so the
//! store gets a few set-based statements per group instead of one per row.
//!
//! Coalescing keeps the result of applying the changes one by one, in order:
//! - an upsert after an upsert of the same key merges the two images (the later one
//!   wins per column; a column the later one did not carry — unchanged TOAST, or absent
//!   from the image — keeps the earlier value, which is what the store would hold);
//! - a delete after an upsert drops the upsert;
//! - an upsert after a delete keeps the delete and writes the new image after it (the
//!   row is replaced, not merged with what the store held);
//! - a key change is a delete of the old key and an upsert of the new one;
//! - a truncate forgets everything of its table before it and empties the table first.
//!
//! Each key then appears once per table, so the statements of one table commute: a
//! table's truncate, then its deletes, then its upserts. Tables are written in the
//! order the group first touched them.

use crate::error::SinkError;
use crate::txn::{RowChange, TableShape};
use kausal_bus::Op;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// What one group writes, table by table.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    pub tables: Vec<TableWrites<'a>>,
    /// Row versions to record in tables being bootstrapped.
    pub versions: super::bootstrap::Versions,
    index: HashMap<&'a str, usize>,
}

/// What one group writes to one destination table.
#[derive(Debug)]
pub struct TableWrites<'a> {
    /// The latest shape of the table seen in the group (key columns, mode).
    pub shape: &'a TableShape,
    /// Empty the table before the rows below.
    pub truncate: bool,
    /// One entry per key, in the order the group first touched it.
    pub rows: Vec<RowWrite<'a>>,
    by_key: HashMap<String, usize>,
}

/// The net effect of the group on one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowWrite<'a> {
    /// Key values, in the order of the shape's key columns.
    pub key: Vec<&'a Value>,
    /// Delete the stored row (before the upsert, if there is one).
    pub delete: bool,
    /// The image to write.
    pub upsert: Option<Image<'a>>,
    /// The seq of the last change of the row.
    pub seq: u64,
}

/// Columns to write: (destination name, value, source type), key columns included.
#[derive(Debug, Clone, PartialEq)]
pub struct Image<'a> {
    pub columns: Vec<(&'a str, &'a Value, &'a str)>,
}

impl<'a> Batch<'a> {
    /// Adds `change` of the transaction numbered `seq`, after everything added before.
    pub fn add(&mut self, change: &'a RowChange, seq: u64) -> Result<(), SinkError> {
        let shape: &'a TableShape = &change.shape;
        let i = match self.index.get(shape.name.as_str()) {
            Some(&i) => i,
            None => {
                self.tables.push(TableWrites {
                    shape,
                    truncate: false,
                    rows: Vec::new(),
                    by_key: HashMap::new(),
                });
                self.index.insert(&shape.name, self.tables.len() - 1);
                self.tables.len() - 1
            }
        };
        let table = &mut self.tables[i];
        table.shape = shape;
        match change.op {
            Op::Truncate => {
                table.truncate = true;
                table.rows.clear();
                table.by_key.clear();
            }
            Op::Delete => {
                let key = key_values(change, &change.key, None)?;
                table.delete(key, seq);
            }
            Op::Insert | Op::Update => {
                let Some(new) = &change.new else {
                    return Err(SinkError::Rejected {
                        table: shape.name.clone(),
                        reason: format!(
                            "{:?} of a row without its new image (seq {seq})",
                            change.op
                        ),
                    });
                };
                if let (Op::Update, Some(old_key)) = (change.op, &change.old_key) {
                    if *old_key != change.key {
                        let old = key_values(change, old_key, None)?;
                        table.delete(old, seq);
                    }
                }
                let key = key_values(change, &change.key, Some(new))?;
                let mut columns = Vec::with_capacity(shape.columns.len());
                for (name, ty) in &shape.columns {
                    let value = if let Some(k) = shape.key.iter().position(|k| k == name) {
                        key[k]
                    } else if change.unchanged.contains(name) {
                        // Not logged by the source (unchanged TOAST): keep what is stored.
                        continue;
                    } else {
                        match new.get(name) {
                            Some(value) => value,
                            // Absent from the image: leave the stored value alone as well.
                            None => continue,
                        }
                    };
                    columns.push((name.as_str(), value, ty.as_str()));
                }
                table.upsert(key, Image { columns }, seq);
            }
        }
        Ok(())
    }
}

impl<'a> TableWrites<'a> {
    fn entry(&mut self, key: Vec<&'a Value>) -> (&mut RowWrite<'a>, bool) {
        let text = key_text(&key);
        match self.by_key.get(&text) {
            Some(&i) => (&mut self.rows[i], true),
            None => {
                self.by_key.insert(text, self.rows.len());
                self.rows.push(RowWrite {
                    key,
                    delete: false,
                    upsert: None,
                    seq: 0,
                });
                (self.rows.last_mut().expect("just pushed"), false)
            }
        }
    }

    fn delete(&mut self, key: Vec<&'a Value>, seq: u64) {
        let (row, _) = self.entry(key);
        row.delete = true;
        row.upsert = None;
        row.seq = seq;
    }

    fn upsert(&mut self, key: Vec<&'a Value>, image: Image<'a>, seq: u64) {
        let (row, _) = self.entry(key);
        row.seq = seq;
        match &mut row.upsert {
            Some(before) => {
                for (name, value, ty) in image.columns {
                    match before.columns.iter_mut().find(|(n, _, _)| *n == name) {
                        Some(column) => *column = (name, value, ty),
                        None => before.columns.push((name, value, ty)),
                    }
                }
            }
            None => row.upsert = Some(image),
        }
    }
}

/// The values of the key columns of `change`'s table: from `key`, else from the row
/// image.
fn key_values<'a>(
    change: &'a RowChange,
    key: &'a Map<String, Value>,
    row: Option<&'a Map<String, Value>>,
) -> Result<Vec<&'a Value>, SinkError> {
    change
        .shape
        .key
        .iter()
        .map(|name| {
            key.get(name)
                .or_else(|| row.and_then(|r| r.get(name)))
                .ok_or_else(|| SinkError::Rejected {
                    table: change.shape.name.clone(),
                    reason: format!(
                        "{:?} without a value for key column `{name}` (published by {})",
                        change.op, change.source_table
                    ),
                })
        })
        .collect()
}

fn key_text(key: &[&Value]) -> String {
    let mut out = String::new();
    for value in key {
        // Infallible for JSON values; the separator cannot occur inside JSON text.
        out.push_str(&value.to_string());
        out.push('\u{1}');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::TableMode;
    use serde_json::json;
    use std::sync::Arc;

    fn shape() -> Arc<TableShape> {
        Arc::new(TableShape {
            name: "t".into(),
            columns: vec![
                ("id".into(), "int4".into()),
                ("a".into(), "text".into()),
                ("b".into(), "text".into()),
            ],
            key: vec!["id".into()],
            mode: TableMode::Mirror,
        })
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn change(op: Op, row: Value, unchanged: &[&str]) -> RowChange {
        let row = obj(row);
        RowChange {
            op,
            source_table: "t".into(),
            shape: shape(),
            key: row
                .iter()
                .filter(|(k, _)| *k == "id")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            old_key: None,
            new: matches!(op, Op::Insert | Op::Update).then(|| row.clone()),
            old: None,
            unchanged: unchanged.iter().map(|u| u.to_string()).collect(),
        }
    }

    fn image(row: &RowWrite<'_>) -> Option<Value> {
        row.upsert.as_ref().map(|i| {
            Value::Object(
                i.columns
                    .iter()
                    .map(|(n, v, _)| (n.to_string(), (*v).clone()))
                    .collect(),
            )
        })
    }

    #[test]
    fn later_images_win_per_column_and_unchanged_columns_keep_the_earlier_value() {
        let changes = [
            change(Op::Insert, json!({"id": 1, "a": "x", "b": "big"}), &[]),
            change(Op::Update, json!({"id": 1, "a": "y"}), &["b"]),
            change(Op::Insert, json!({"id": 2, "a": "z", "b": "w"}), &[]),
        ];
        let mut batch = Batch::default();
        for (i, c) in changes.iter().enumerate() {
            batch.add(c, 10 + i as u64).unwrap();
        }
        let rows = &batch.tables[0].rows;
        assert_eq!(rows.len(), 2);
        assert_eq!(
            image(&rows[0]),
            Some(json!({"id": 1, "a": "y", "b": "big"}))
        );
        assert_eq!((rows[0].delete, rows[0].seq), (false, 11));
        assert_eq!(image(&rows[1]), Some(json!({"id": 2, "a": "z", "b": "w"})));
    }

    #[test]
    fn delete_then_insert_replaces_and_insert_then_delete_deletes() {
        let changes = [
            change(Op::Delete, json!({"id": 1}), &[]),
            change(Op::Insert, json!({"id": 1, "a": "again"}), &[]),
            change(Op::Insert, json!({"id": 2, "a": "gone"}), &[]),
            change(Op::Delete, json!({"id": 2}), &[]),
        ];
        let mut batch = Batch::default();
        for (i, c) in changes.iter().enumerate() {
            batch.add(c, i as u64 + 1).unwrap();
        }
        let rows = &batch.tables[0].rows;
        assert!(rows[0].delete);
        assert_eq!(image(&rows[0]), Some(json!({"id": 1, "a": "again"})));
        assert!(rows[1].delete);
        assert_eq!(image(&rows[1]), None);
    }

    #[test]
    fn a_key_change_deletes_the_old_key_and_a_truncate_forgets_what_came_before() {
        let mut moved = change(Op::Update, json!({"id": 2, "a": "m"}), &[]);
        moved.old_key = Some(obj(json!({"id": 1})));
        let mut truncate = change(Op::Truncate, json!({}), &[]);
        truncate.new = None;
        let after = change(Op::Insert, json!({"id": 3, "a": "n"}), &[]);
        let mut batch = Batch::default();
        batch.add(&moved, 1).unwrap();
        let rows = &batch.tables[0].rows;
        assert_eq!((rows[0].delete, image(&rows[0])), (true, None));
        assert_eq!(image(&rows[1]), Some(json!({"id": 2, "a": "m"})));
        batch.add(&truncate, 2).unwrap();
        batch.add(&after, 3).unwrap();
        let table = &batch.tables[0];
        assert!(table.truncate);
        assert_eq!(table.rows.len(), 1);
        assert_eq!(image(&table.rows[0]), Some(json!({"id": 3, "a": "n"})));
    }

    #[test]
    fn an_update_without_its_key_is_rejected_with_the_column() {
        let c = change(Op::Update, json!({"a": "no key"}), &[]);
        let error = Batch::default().add(&c, 1).unwrap_err();
        assert!(error.to_string().contains("key column `id`"), "{error}");
    }
}
