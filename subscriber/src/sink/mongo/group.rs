//! The writes of a group, buffered by `apply` and written by `flush` in a few bulk
//! commands: one read of the stored versions of everything the group touches, then per
//! collection one multi-statement `delete` and one multi-statement `update` (ordered
//! false: independent rows, so the server may run them as it likes), and one `update`
//! of the tombstones — instead of a read and one to three writes per row.
//!
//! Coalescing keeps the result of applying the changes one by one, in order (the
//! changes of one row arrive in version order; concurrent groups touch other rows):
//! a change not newer than what is stored for its row (document, tombstone, the table's
//! floor) or older than an earlier change of the group is skipped; a delete drops what
//! the group wrote to the row before; a replace replaces it; a merge (columns the source
//! did not log, unchanged TOAST) merges into what the group wrote, or into the stored
//! document. Each row then appears once per command, with the version of its last
//! change in the write's guard, so a racing newer write still wins.

use mongodb::bson::{doc, Bson, Document};
use std::collections::HashMap;

/// One row change, converted at `apply` (owned: the transaction is gone by `flush`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RowOp {
    /// Destination table.
    pub table: String,
    pub id: Bson,
    /// `_id` of the row's tombstone.
    pub tomb: String,
    /// Version text of the change.
    pub v: String,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Kind {
    Delete,
    /// The whole row (columns only: `_id` and version are added when written).
    Replace(Document),
    /// Columns to set on the stored document.
    Merge(Document),
}

/// What the group buffered, in order: runs of row changes, and truncates between them.
#[derive(Debug)]
pub(super) enum Item {
    Rows(Vec<RowOp>),
    Truncate { table: String, v: String },
}

/// The buffered writes of the process's groups.
#[derive(Debug, Default)]
pub(super) struct Buffer {
    pub items: Vec<Item>,
    pub rows: usize,
}

impl Buffer {
    pub fn push(&mut self, op: RowOp) {
        self.rows += 1;
        if let Some(Item::Rows(ops)) = self.items.last_mut() {
            ops.push(op);
        } else {
            self.items.push(Item::Rows(vec![op]));
        }
    }

    pub fn truncate(&mut self, table: String, v: String) {
        self.items.push(Item::Truncate { table, v });
    }
}

/// The net write of a run to one row.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Net {
    pub table: String,
    pub id: Bson,
    pub tomb: String,
    /// Delete the stored document and leave the tombstone at this version.
    pub delete: Option<String>,
    /// Write after the delete, if any: `Replace` or `Merge` columns.
    pub upsert: Option<Kind>,
    /// Version of the row's last change.
    pub v: String,
}

/// The newest stored version of each row (`(table, _id text)`: document, tombstone
/// and floor, whichever is newest).
pub(super) type StoredMax = HashMap<(String, String), String>;

/// An `_id` as text (its display form), to look it up: BSON values are not hashable.
pub(super) fn id_text(id: &Bson) -> String {
    id.to_string()
}

/// `ops` cut where the table changes, in order. Without a transaction a reader sees
/// each bulk command as it lands, and the commands of one run go collection by
/// collection: a message inserted after its user (and so depending on it) could land
/// first when an earlier change of the group touched `messages` (seen in the CI's
/// MongoDB test). Cut at every change of table, no change lands before one that came
/// before it in another collection; the rows of one table still go in bulk.
pub(super) fn table_runs(ops: Vec<RowOp>) -> Vec<Vec<RowOp>> {
    let mut runs: Vec<Vec<RowOp>> = Vec::new();
    for op in ops {
        match runs.last_mut() {
            Some(run) if run[0].table == op.table => run.push(op),
            _ => runs.push(vec![op]),
        }
    }
    runs
}

/// The net writes of a run, in the order the rows were first touched.
pub(super) fn coalesce(ops: Vec<RowOp>, stored: &StoredMax) -> Vec<Net> {
    let mut out: Vec<Net> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    for op in ops {
        let row = (op.table.clone(), id_text(&op.id));
        if stored
            .get(&row)
            .is_some_and(|s| s.as_str() >= op.v.as_str())
        {
            continue;
        }
        let i = match index.get(&row) {
            Some(&i) => {
                if op.v < out[i].v {
                    continue; // an older replay after a newer change
                }
                i
            }
            None => {
                out.push(Net {
                    table: op.table,
                    id: op.id,
                    tomb: op.tomb,
                    delete: None,
                    upsert: None,
                    v: op.v.clone(),
                });
                index.insert(row, out.len() - 1);
                out.len() - 1
            }
        };
        let net = &mut out[i];
        net.v = op.v.clone();
        match op.kind {
            Kind::Delete => {
                net.delete = Some(op.v);
                net.upsert = None;
            }
            Kind::Replace(row) => net.upsert = Some(Kind::Replace(row)),
            Kind::Merge(columns) => match &mut net.upsert {
                Some(Kind::Replace(row) | Kind::Merge(row)) => row.extend(columns),
                _ => net.upsert = Some(Kind::Merge(columns)),
            },
        }
    }
    out
}

/// The statements of a `delete` command removing `net`'s stored document, guarded.
pub(super) fn delete_statement(net: &Net, version_field: &str) -> Option<Document> {
    let v = net.delete.as_ref()?;
    // A replace after the delete replaces the document anyway.
    if matches!(net.upsert, Some(Kind::Replace(_))) {
        return None;
    }
    Some(doc! {"q": {"_id": net.id.clone(), version_field: {"$lte": v}}, "limit": 1})
}

/// The statement of an `update` command writing `net`'s tombstone, guarded.
pub(super) fn tombstone_statement(net: &Net) -> Option<Document> {
    let v = net.delete.as_ref()?;
    Some(doc! {
        "q": {"_id": &net.tomb, "v": {"$lte": v}},
        "u": {"$set": {"v": v}},
        "upsert": true,
    })
}

/// The statement of an `update` command writing `net`'s row, guarded: an existing
/// document with a newer version makes the upsert insert a duplicate `_id`, which
/// means "newer is there".
pub(super) fn upsert_statement(net: &Net, version_field: &str) -> Option<Document> {
    let q = doc! {"_id": net.id.clone(), version_field: {"$lte": &net.v}};
    let u = match net.upsert.as_ref()? {
        Kind::Replace(row) => {
            // `_id` in the document too: an upsert takes it from the filter's equality
            // on MongoDB, not on every server speaking its protocol.
            let mut d = doc! {"_id": net.id.clone()};
            d.extend(row.clone());
            d.insert(version_field, &net.v);
            d
        }
        Kind::Merge(columns) => {
            let mut set = columns.clone();
            set.insert(version_field, &net.v);
            doc! {"$set": set}
        }
        Kind::Delete => return None,
    };
    Some(doc! {"q": q, "u": u, "upsert": true})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: i64, v: u64, kind: Kind) -> RowOp {
        RowOp {
            table: "t".into(),
            id: Bson::Int64(id),
            tomb: format!("t|[{id}]"),
            v: format!("{v:04}"),
            kind,
        }
    }

    fn replace(name: &str) -> Kind {
        Kind::Replace(doc! {"name": name, "note": "x"})
    }

    #[test]
    fn the_last_change_of_a_row_wins_and_merges_keep_earlier_columns() {
        let ops = vec![
            op(1, 1, replace("a")),
            op(2, 1, replace("b")),
            op(1, 2, Kind::Merge(doc! {"name": "a2"})),
            op(2, 3, Kind::Delete),
        ];
        let net = coalesce(ops, &StoredMax::new());
        assert_eq!(net.len(), 2);
        assert_eq!(
            net[0].upsert,
            Some(Kind::Replace(doc! {"name": "a2", "note": "x"}))
        );
        assert_eq!(net[0].v, "0002");
        assert_eq!(net[1].delete.as_deref(), Some("0003"));
        assert_eq!(net[1].upsert, None);
        assert!(upsert_statement(&net[1], "_v").is_none());
        assert!(delete_statement(&net[1], "_v").is_some());
    }

    #[test]
    fn a_delete_then_insert_replaces_and_a_merge_after_a_delete_stays_a_merge() {
        let net = coalesce(
            vec![op(1, 1, Kind::Delete), op(1, 2, replace("new"))],
            &StoredMax::new(),
        );
        assert_eq!(net[0].delete.as_deref(), Some("0001"));
        assert!(
            delete_statement(&net[0], "_v").is_none(),
            "the replace covers it"
        );
        assert!(tombstone_statement(&net[0]).is_some());
        let net = coalesce(
            vec![op(1, 1, Kind::Delete), op(1, 2, Kind::Merge(doc! {"n": 1}))],
            &StoredMax::new(),
        );
        assert!(delete_statement(&net[0], "_v").is_some());
        assert_eq!(net[0].upsert, Some(Kind::Merge(doc! {"n": 1})));
    }

    #[test]
    fn changes_not_newer_than_the_store_or_the_group_are_skipped() {
        let stored = StoredMax::from([(("t".into(), id_text(&Bson::Int64(1))), "0005".into())]);
        let ops = vec![
            op(1, 4, replace("old")),
            op(1, 5, replace("replay")),
            op(1, 7, Kind::Merge(doc! {"name": "seven"})),
            op(2, 9, replace("nine")),
            op(2, 8, replace("older replay")),
        ];
        let net = coalesce(ops, &stored);
        assert_eq!(
            net[0].upsert,
            Some(Kind::Merge(doc! {"name": "seven"})),
            "merged into the stored document, not into the skipped replace"
        );
        assert_eq!(net[1].upsert, Some(replace("nine")));
        assert_eq!(net[1].v, "0009");
    }

    #[test]
    fn runs_are_cut_where_the_table_changes_and_keep_their_order() {
        let at = |table: &str, id: i64| RowOp {
            table: table.into(),
            ..op(id, 1, replace("x"))
        };
        let ops = vec![
            at("messages", 1),
            at("users", 118),
            at("messages", 2),
            at("messages", 3),
            at("users", 119),
        ];
        let runs: Vec<Vec<(String, Bson)>> = table_runs(ops)
            .into_iter()
            .map(|r| r.into_iter().map(|o| (o.table, o.id)).collect())
            .collect();
        let m = |id: i64| ("messages".to_string(), Bson::Int64(id));
        let u = |id: i64| ("users".to_string(), Bson::Int64(id));
        assert_eq!(
            runs,
            vec![vec![m(1)], vec![u(118)], vec![m(2), m(3)], vec![u(119)]]
        );
    }
}
