//! One row change written to its destination table, inside the apply transaction.

use super::dialect::Dialect;
use super::schema::{TableInfo, SEQ_COLUMN};
use super::value::{Bound, Kind};
use crate::config::TableMode;
use crate::error::SinkError;
use crate::txn::RowChange;
use kausal_bus::Op;
use serde_json::{Map, Value};
use sqlx::AnyConnection;
use sqlx::AssertSqlSafe;

/// Writes `change` (of the transaction numbered `seq`) to its table, described by `info`.
/// Statements are built per (table, operation, column set); sqlx prepares and caches
/// them per connection by their text.
pub async fn write(
    conn: &mut AnyConnection,
    dialect: Dialect,
    info: &TableInfo,
    change: &RowChange,
    seq: u64,
) -> Result<(), SinkError> {
    let table = dialect.quote(&change.shape.name);
    match change.op {
        Op::Truncate => {
            // DELETE, not TRUNCATE: it must roll back with the rest of the group.
            let sql = format!("DELETE FROM {table}");
            run(conn, sql, Vec::new(), "truncate table").await
        }
        Op::Delete => delete(conn, dialect, info, change, &change.key).await,
        Op::Insert | Op::Update => {
            if let (Op::Update, Some(old_key)) = (change.op, &change.old_key) {
                if *old_key != change.key {
                    delete(conn, dialect, info, change, old_key).await?;
                }
            }
            upsert(conn, dialect, info, change, seq).await
        }
    }
}

struct Statement {
    dialect: Dialect,
    binds: Vec<Bound>,
}

impl Statement {
    /// Adds a parameter for column `name` and returns its placeholder expression.
    fn param(&mut self, info: &TableInfo, name: &str, value: &Value, source_type: &str) -> String {
        let column = info.columns.get(name);
        let kind = column.map_or(Kind::Other, |c| c.kind);
        let json_source = matches!(source_type, "json" | "jsonb");
        self.binds.push(Bound::for_column(value, kind, json_source));
        let placeholder = self.dialect.placeholder(self.binds.len());
        match (self.dialect, column) {
            // Postgres does not convert text parameters to timestamptz, numeric, jsonb …
            // implicitly: cast each to its column's type.
            (Dialect::Postgres, Some(c)) => format!("CAST({placeholder} AS {})", c.cast),
            _ => placeholder,
        }
    }
}

fn source_type<'a>(change: &'a RowChange, column: &str) -> &'a str {
    change
        .shape
        .columns
        .iter()
        .find(|(c, _)| c == column)
        .map_or("", |(_, t)| t.as_str())
}

async fn delete(
    conn: &mut AnyConnection,
    dialect: Dialect,
    info: &TableInfo,
    change: &RowChange,
    key: &Map<String, Value>,
) -> Result<(), SinkError> {
    let mut statement = Statement {
        dialect,
        binds: Vec::new(),
    };
    let mut conditions = Vec::new();
    for name in &change.shape.key {
        let value = key_value(change, key, None, name)?;
        let expr = statement.param(info, name, value, source_type(change, name));
        conditions.push(format!("{} = {expr}", dialect.quote(name)));
    }
    let sql = format!(
        "DELETE FROM {} WHERE {}",
        dialect.quote(&change.shape.name),
        conditions.join(" AND ")
    );
    run(conn, sql, statement.binds, "delete row").await
}

async fn upsert(
    conn: &mut AnyConnection,
    dialect: Dialect,
    info: &TableInfo,
    change: &RowChange,
    seq: u64,
) -> Result<(), SinkError> {
    let shape = &change.shape;
    let Some(new) = &change.new else {
        return Err(SinkError::Rejected {
            table: shape.name.clone(),
            reason: format!("{:?} of a row without its new image", change.op),
        });
    };
    let mut statement = Statement {
        dialect,
        binds: Vec::new(),
    };
    let (mut columns, mut values, mut set) = (Vec::new(), Vec::new(), Vec::new());
    for (name, ty) in &shape.columns {
        let is_key = shape.key.contains(name);
        let value = if is_key {
            key_value(change, &change.key, Some(new), name)?
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
        let quoted = dialect.quote(name);
        values.push(statement.param(info, name, value, ty));
        if !is_key {
            set.push(quoted.clone());
        }
        columns.push(quoted);
    }
    if shape.mode == TableMode::Mirror {
        let quoted = dialect.quote(SEQ_COLUMN);
        let seq = Value::from(i64::try_from(seq).unwrap_or(i64::MAX));
        values.push(statement.param(info, SEQ_COLUMN, &seq, "int8"));
        set.push(quoted.clone());
        columns.push(quoted);
    }
    let key: Vec<String> = shape.key.iter().map(|k| dialect.quote(k)).collect();
    let sql = dialect.upsert(&dialect.quote(&shape.name), &columns, &values, &key, &set);
    run(conn, sql, statement.binds, "upsert row").await
}

/// The value of key column `name`: from the key map, else from the row image.
fn key_value<'a>(
    change: &RowChange,
    key: &'a Map<String, Value>,
    row: Option<&'a Map<String, Value>>,
    name: &str,
) -> Result<&'a Value, SinkError> {
    key.get(name)
        .or_else(|| row.and_then(|r| r.get(name)))
        .ok_or_else(|| SinkError::Rejected {
            table: change.shape.name.clone(),
            reason: format!(
                "{:?} without a value for key column `{name}` (published by {})",
                change.op, change.source_table
            ),
        })
}

async fn run(
    conn: &mut AnyConnection,
    sql: String,
    binds: Vec<Bound>,
    operation: &'static str,
) -> Result<(), SinkError> {
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for bound in binds {
        query = bound.bind(query);
    }
    query
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(|source| SinkError::Store { operation, source })
}
