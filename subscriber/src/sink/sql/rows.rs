//! A group's coalesced row writes (see [`super::batch`]) as set-based statements inside
//! the apply transaction: per table, one `DELETE … WHERE key IN (…)` and one multi-row
//! `INSERT … ON CONFLICT/DUPLICATE KEY UPDATE` per column set, split only to stay under
//! the databases' parameter limits.
//!
//! Why multi-row `VALUES` through sqlx `Any` and not `COPY` or `unnest` arrays: the
//! `Any` driver binds only scalars, and one statement form serves Postgres,
//! MySQL/MariaDB and SQLite with the same value conversion (each parameter cast to its
//! column's type on Postgres, as before). A group of 256 pgbench transactions is a
//! handful of statements either way: the round trips, not the statement form, were the
//! cost (docs/subscriber.md, "Set-based apply").

use super::batch::{Image, RowWrite, TableWrites};
use super::dialect::Dialect;
use super::schema::{TableInfo, SEQ_COLUMN};
use super::value::{Bound, Kind};
use crate::error::{SinkError, WriteError};
use crate::table::TableMode;
use serde_json::Value;
use sqlx::AnyConnection;
use sqlx::AssertSqlSafe;

/// Parameters per statement. SQLite's limit is 32,766 and Postgres's and MySQL's 65,535;
/// a few thousand keep statements quick to parse while a group stays a few statements.
const MAX_PARAMS: usize = 8_000;

/// Writes `table`'s coalesced rows, described by `info`: truncate, deletes, upserts.
pub async fn write(
    conn: &mut AnyConnection,
    dialect: Dialect,
    info: &TableInfo,
    table: &TableWrites<'_>,
) -> Result<(), SinkError> {
    let shape = table.shape;
    let name = dialect.quote(&shape.name);
    if table.truncate {
        // DELETE, not TRUNCATE: it must roll back with the rest of the group.
        let sql = format!("DELETE FROM {name}");
        run(conn, sql, Vec::new())
            .await
            .map_err(|source| write_error("truncate", table, &[], source))?;
    }
    let deletes: Vec<&RowWrite<'_>> = table.rows.iter().filter(|r| r.delete).collect();
    let per = (MAX_PARAMS / shape.key.len().max(1)).max(1);
    for chunk in deletes.chunks(per) {
        delete(conn, dialect, info, table, chunk).await?;
    }
    // Rows with the same columns share a statement; the common case is one set.
    let mut sets: Vec<(Vec<&str>, Vec<&RowWrite<'_>>)> = Vec::new();
    for row in &table.rows {
        let Some(image) = &row.upsert else { continue };
        let names: Vec<&str> = image.columns.iter().map(|(n, _, _)| *n).collect();
        match sets.iter_mut().find(|(n, _)| *n == names) {
            Some((_, rows)) => rows.push(row),
            None => sets.push((names, vec![row])),
        }
    }
    for (names, rows) in sets {
        if let Some(casts) = unnest_casts(dialect, info, shape, &names) {
            for chunk in rows.chunks(MAX_UNNEST_ROWS) {
                upsert_unnest(conn, info, table, &names, &casts, chunk).await?;
            }
            continue;
        }
        let width = names.len() + usize::from(shape.mode == TableMode::Mirror);
        for chunk in rows.chunks((MAX_PARAMS / width.max(1)).max(1)) {
            upsert(conn, dialect, info, table, &names, chunk).await?;
        }
    }
    Ok(())
}

/// Rows per statement of the Postgres array form: bounds the size of one statement.
const MAX_UNNEST_ROWS: usize = 10_000;

/// Postgres: the type each written column (and `_kausal_seq`) is cast to, when the rows
/// can go as one array per column (`unnest`): every column known to the catalog and none
/// an array itself (`unnest` would flatten it). `None`: use multi-row `VALUES`.
fn unnest_casts<'i>(
    dialect: Dialect,
    info: &'i TableInfo,
    shape: &crate::txn::TableShape,
    names: &[&str],
) -> Option<Vec<&'i str>> {
    if dialect != Dialect::Postgres {
        return None;
    }
    let mirror = shape.mode == TableMode::Mirror;
    names
        .iter()
        .copied()
        .chain(mirror.then_some(SEQ_COLUMN))
        .map(|name| {
            let column = info.columns.get(name)?;
            (column.kind != Kind::PgArray && !column.cast.is_empty())
                .then_some(column.cast.as_str())
        })
        .collect()
}

/// Postgres: `INSERT … SELECT * FROM unnest($1::t1[], $2::t2[], …) ON CONFLICT …`, each
/// parameter one array literal holding a column of every row. The text depends on the
/// table and its columns only: prepared once per connection, one round trip per
/// statement, and no plan for thousands of parameters.
async fn upsert_unnest(
    conn: &mut AnyConnection,
    info: &TableInfo,
    table: &TableWrites<'_>,
    names: &[&str],
    casts: &[&str],
    rows: &[&RowWrite<'_>],
) -> Result<(), SinkError> {
    let dialect = Dialect::Postgres;
    let shape = table.shape;
    let mirror = shape.mode == TableMode::Mirror;
    let mut arrays: Vec<String> = casts.iter().map(|_| String::from("{")).collect();
    for (i, row) in rows.iter().enumerate() {
        let Some(Image { columns }) = &row.upsert else {
            continue;
        };
        for (array, (name, value, ty)) in arrays.iter_mut().zip(columns) {
            if i > 0 {
                array.push(',');
            }
            let kind = info.columns.get(*name).map_or(Kind::Other, |c| c.kind);
            Bound::for_column(value, kind, matches!(*ty, "json" | "jsonb")).push_pg_element(array);
        }
        if mirror {
            let array = arrays.last_mut().expect("one array per column");
            if i > 0 {
                array.push(',');
            }
            array.push_str(&row.seq.to_string());
        }
    }
    let params: Vec<String> = casts
        .iter()
        .enumerate()
        .map(|(i, cast)| format!("CAST(${} AS {cast}[])", i + 1))
        .collect();
    let (columns, key, set) = upsert_target(dialect, shape, names);
    let source = format!("SELECT * FROM unnest({})", params.join(", "));
    let sql = dialect.upsert_from(&dialect.quote(&shape.name), &columns, &source, &key, &set);
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for mut array in arrays {
        array.push('}');
        query = query.bind(array);
    }
    query
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(|source| write_error("upsert", table, rows, source))
}

struct Statement<'i> {
    dialect: Dialect,
    info: &'i TableInfo,
    binds: Vec<Bound>,
}

impl Statement<'_> {
    /// Adds a parameter for column `name` and returns its placeholder expression.
    fn param(&mut self, name: &str, value: &Value, source_type: &str) -> String {
        let column = self.info.columns.get(name);
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

async fn delete(
    conn: &mut AnyConnection,
    dialect: Dialect,
    info: &TableInfo,
    table: &TableWrites<'_>,
    rows: &[&RowWrite<'_>],
) -> Result<(), SinkError> {
    let shape = table.shape;
    let mut statement = Statement {
        dialect,
        info,
        binds: Vec::with_capacity(rows.len() * shape.key.len()),
    };
    let types: Vec<&str> = shape
        .key
        .iter()
        .map(|k| {
            shape
                .columns
                .iter()
                .find(|(c, _)| c == k)
                .map_or("", |(_, t)| t.as_str())
        })
        .collect();
    let condition = if let [key] = shape.key.as_slice() {
        let list: Vec<String> = rows
            .iter()
            .map(|r| statement.param(key, r.key[0], types[0]))
            .collect();
        format!("{} IN ({})", dialect.quote(key), list.join(", "))
    } else {
        // Row-value IN lists differ between the three databases; an OR of key matches
        // uses the primary key index on each of them.
        let matches: Vec<String> = rows
            .iter()
            .map(|r| {
                let terms: Vec<String> = shape
                    .key
                    .iter()
                    .zip(&r.key)
                    .zip(&types)
                    .map(|((k, v), t)| {
                        format!("{} = {}", dialect.quote(k), statement.param(k, v, t))
                    })
                    .collect();
                format!("({})", terms.join(" AND "))
            })
            .collect();
        matches.join(" OR ")
    };
    let sql = format!(
        "DELETE FROM {} WHERE {condition}",
        dialect.quote(&shape.name)
    );
    run(conn, sql, statement.binds)
        .await
        .map_err(|source| write_error("delete", table, rows, source))
}

async fn upsert(
    conn: &mut AnyConnection,
    dialect: Dialect,
    info: &TableInfo,
    table: &TableWrites<'_>,
    names: &[&str],
    rows: &[&RowWrite<'_>],
) -> Result<(), SinkError> {
    let shape = table.shape;
    let mirror = shape.mode == TableMode::Mirror;
    let mut statement = Statement {
        dialect,
        info,
        binds: Vec::with_capacity(rows.len() * (names.len() + 1)),
    };
    let mut values = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(Image { columns }) = &row.upsert else {
            continue;
        };
        let mut exprs: Vec<String> = columns
            .iter()
            .map(|(name, value, ty)| statement.param(name, value, ty))
            .collect();
        if mirror {
            let seq = Value::from(i64::try_from(row.seq).unwrap_or(i64::MAX));
            exprs.push(statement.param(SEQ_COLUMN, &seq, "int8"));
        }
        values.push(exprs);
    }
    let (columns, key, set) = upsert_target(dialect, shape, names);
    let sql = dialect.upsert(&dialect.quote(&shape.name), &columns, &values, &key, &set);
    run(conn, sql, statement.binds)
        .await
        .map_err(|source| write_error("upsert", table, rows, source))
}

/// The quoted columns written (`_kausal_seq` last for a mirror), the key, and the
/// columns an existing row gets updated.
fn upsert_target(
    dialect: Dialect,
    shape: &crate::txn::TableShape,
    names: &[&str],
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut columns: Vec<String> = names.iter().map(|n| dialect.quote(n)).collect();
    let mut set: Vec<String> = names
        .iter()
        .filter(|n| !shape.key.iter().any(|k| k == *n))
        .map(|n| dialect.quote(n))
        .collect();
    if shape.mode == TableMode::Mirror {
        columns.push(dialect.quote(SEQ_COLUMN));
        set.push(dialect.quote(SEQ_COLUMN));
    }
    let key = shape.key.iter().map(|k| dialect.quote(k)).collect();
    (columns, key, set)
}

/// The error of a statement over `rows`: names the table, the transactions and, where
/// the database says it, the column.
fn write_error(
    operation: &'static str,
    table: &TableWrites<'_>,
    rows: &[&RowWrite<'_>],
    source: sqlx::Error,
) -> SinkError {
    let mut seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let seqs = match seqs.as_slice() {
        [] => "a truncate".to_string(),
        [one] => format!("seq {one}"),
        [first, .., last] => format!("seqs {first}..{last}, {} transactions", seqs.len()),
    };
    SinkError::Write(Box::new(WriteError {
        operation,
        table: table.shape.name.clone(),
        seqs,
        column: column_of(&source),
        source,
    }))
}

/// The column a database error names: Postgres reports it for some errors (not-null
/// violations); MySQL/MariaDB and SQLite write it into the message (``… for column `c`
/// at row 3``, `Column 'c' cannot be null`, `NOT NULL constraint failed: t.c`).
fn column_of(error: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return pg.column().map(str::to_string);
    }
    let message = db.message();
    let after = |marker: &str| {
        message
            .find(marker)
            .map(|i| &message[i + marker.len()..])
            .and_then(|rest| rest.split_whitespace().next())
    };
    let name = after("for column ")
        .or_else(|| after("Column "))
        .or_else(|| after("constraint failed: "))?;
    // `db`.`table`.`column`, 'column' or table.column: the last part, unquoted.
    let last = name.trim_end_matches(',').rsplit('.').next()?;
    let last = last.trim_matches(|c| c == '`' || c == '\'' || c == '"');
    (!last.is_empty()).then(|| last.to_string())
}

async fn run(conn: &mut AnyConnection, sql: String, binds: Vec<Bound>) -> Result<(), sqlx::Error> {
    // Not cached: the text changes with the number of rows, and would push the
    // bookkeeping statements out of the per-connection statement cache.
    let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
    for bound in binds {
        query = bound.bind(query);
    }
    query.execute(conn).await.map(|_| ())
}
