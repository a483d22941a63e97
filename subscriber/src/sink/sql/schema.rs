//! Destination tables at first sight: mirrored tables are created and widened, mapped
//! tables are checked. What the catalog says about each is cached per store.

use super::dialect::Dialect;
use super::value::Kind;
use crate::error::SinkError;
use crate::table::{is_identifier, TableMode};
use crate::txn::TableShape;
use sqlx::AnyPool;
use sqlx::{AssertSqlSafe, Row};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::Mutex;

/// The bookkeeping column of mirrored tables: the seq of the last change of the row.
pub const SEQ_COLUMN: &str = "_kausal_seq";

/// One destination column, as the catalog describes it.
#[derive(Debug, Clone)]
pub struct Column {
    pub kind: Kind,
    /// Postgres: the type parameters are cast to (quoted `schema.type`); empty elsewhere.
    pub cast: String,
}

/// A destination table known to exist with (at least) the columns of the shapes seen.
#[derive(Debug)]
pub struct TableInfo {
    pub columns: HashMap<String, Column>,
}

/// Tables seen by one store, by destination name.
#[derive(Debug, Default)]
pub struct Tables {
    // A tokio mutex held across the DDL: two groups meeting a new table at once create
    // it once, and the common path (already known) is one uncontended lock.
    known: Mutex<HashMap<String, Arc<TableInfo>>>,
}

impl Tables {
    /// Forgets what is known, so the next use reads the catalog again (after an error
    /// that may come from a table changed behind our back).
    pub async fn forget(&self) {
        self.known.lock().await.clear();
    }

    /// Makes sure the table of `shape` exists with its columns; returns what the catalog
    /// says about it. Runs outside the apply transaction: MySQL commits implicitly on DDL.
    pub async fn ensure(
        &self,
        pool: &AnyPool,
        dialect: Dialect,
        shape: &TableShape,
    ) -> Result<Arc<TableInfo>, SinkError> {
        check_names(shape)?;
        let mut known = self.known.lock().await;
        if let Some(info) = known.get(&shape.name) {
            let complete = shape.columns.iter().all(|(c, ty)| {
                info.columns.get(c).is_some_and(|col| {
                    shape.mode != TableMode::Mirror
                        || shape.key.contains(c)
                        || widened(dialect, col.kind, ty).is_none()
                })
            });
            if complete {
                return Ok(info.clone());
            }
        }
        let info = match shape.mode {
            TableMode::Mirror => mirror(pool, dialect, shape).await?,
            TableMode::Map => map(pool, dialect, shape).await?,
            TableMode::None => Arc::new(TableInfo {
                columns: HashMap::new(),
            }),
        };
        known.insert(shape.name.clone(), info.clone());
        Ok(info)
    }
}

fn check_names(shape: &TableShape) -> Result<(), SinkError> {
    let reject = |what: &str, name: &str| SinkError::Rejected {
        table: shape.name.clone(),
        reason: format!(
            "{what} `{name}` is not a plain SQL identifier (letters, digits and `_`, not \
             starting with a digit, at most 63 characters); rename it in the subscription"
        ),
    };
    if !is_identifier(&shape.name) {
        return Err(reject("table name", &shape.name));
    }
    for name in shape.columns.iter().map(|(c, _)| c).chain(&shape.key) {
        if !is_identifier(name) {
            return Err(reject("column name", name));
        }
    }
    if shape.key.is_empty() && shape.mode != TableMode::None {
        return Err(SinkError::Rejected {
            table: shape.name.clone(),
            reason: "the source table has no primary key, so rows cannot be upserted or \
                     deleted by key; give it one, or subscribe with mode = \"none\""
                .into(),
        });
    }
    Ok(())
}

async fn mirror(
    pool: &AnyPool,
    dialect: Dialect,
    shape: &TableShape,
) -> Result<Arc<TableInfo>, SinkError> {
    let table = dialect.quote(&shape.name);
    let mut wanted: Vec<(&str, &str)> = shape
        .columns
        .iter()
        .map(|(name, ty)| {
            let is_key = shape.key.contains(name);
            (name.as_str(), dialect.mirror_type(ty, is_key))
        })
        .collect();
    wanted.push((SEQ_COLUMN, "BIGINT"));
    let mut columns = match read_columns(pool, dialect, &shape.name).await? {
        Some(columns) => columns,
        None => {
            let defs: Vec<String> = wanted
                .iter()
                .map(|(name, ty)| format!("{} {ty}", dialect.quote(name)))
                .collect();
            let key: Vec<String> = shape.key.iter().map(|k| dialect.quote(k)).collect();
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {table} ({}, PRIMARY KEY ({})){}",
                defs.join(", "),
                key.join(", "),
                dialect.table_options()
            );
            // Workers starting together may all find it missing.
            super::connect::create_tables(pool, dialect, &[sql])
                .await
                .map_err(|source| SinkError::Store {
                    operation: "create mirrored table",
                    source,
                })?;
            tracing::debug!(table = %shape.name, "mirrored table created (unless another worker just did)");
            read_columns(pool, dialect, &shape.name)
                .await?
                .unwrap_or_default()
        }
    };
    // A column whose type changed at the source into one the mirrored column cannot
    // hold (an integer column that now holds text or fractions) is widened; the
    // converse needs nothing (text holds numbers). Keys keep their type.
    let mut widen = Vec::new();
    for (name, ty) in &shape.columns {
        let Some(col) = columns.get(name) else {
            continue;
        };
        if shape.key.contains(name) {
            continue;
        }
        if let Some(to) = widened(dialect, col.kind, ty) {
            widen.push((name.clone(), to));
        }
    }
    for (name, to) in &widen {
        let column = dialect.quote(name);
        let sql = match dialect {
            Dialect::Postgres => {
                format!("ALTER TABLE {table} ALTER COLUMN {column} TYPE {to} USING {column}::{to}")
            }
            Dialect::MySql => format!("ALTER TABLE {table} MODIFY COLUMN {column} {to}"),
            Dialect::Sqlite => continue,
        };
        execute(pool, sql, "widen mirrored column").await?;
        tracing::warn!(table = %shape.name, column = %name, to = %to,
            "a column's type changed at the source: widened the mirrored column");
    }
    if !widen.is_empty() {
        columns = read_columns(pool, dialect, &shape.name)
            .await?
            .unwrap_or_default();
    }
    let missing: Vec<&(&str, &str)> = wanted
        .iter()
        .filter(|(name, _)| !columns.contains_key(*name))
        .collect();
    if !missing.is_empty() {
        for (name, ty) in &missing {
            let sql = format!(
                "ALTER TABLE {table} ADD COLUMN {} {ty}",
                dialect.quote(name)
            );
            // Another worker may have added it first: the catalog read below decides.
            if let Err(error) = execute(pool, sql, "add mirrored column").await {
                tracing::debug!(table = %shape.name, column = %name, error = %error, "add column failed");
            } else {
                tracing::info!(table = %shape.name, column = %name, "added mirrored column");
            }
        }
        columns = read_columns(pool, dialect, &shape.name)
            .await?
            .unwrap_or_default();
        if let Some((name, _)) = missing.iter().find(|(n, _)| !columns.contains_key(*n)) {
            return Err(SinkError::Rejected {
                table: shape.name.clone(),
                reason: format!(
                    "could not add column `{name}` to the mirrored table; check that the \
                     store user may ALTER it"
                ),
            });
        }
    }
    Ok(Arc::new(TableInfo { columns }))
}

/// The type a mirrored column of `kind` must become to hold values of `source_type`,
/// if it cannot hold them as it is. SQLite stores any value in any column.
fn widened(dialect: Dialect, kind: Kind, source_type: &str) -> Option<&'static str> {
    if dialect == Dialect::Sqlite {
        return None;
    }
    match (kind, Dialect::mirror_class(source_type)) {
        (Kind::Int, "float") => Some(dialect.mirror_type(source_type, false)),
        (Kind::Int | Kind::Float | Kind::Bool, "text") => {
            Some(dialect.mirror_type(source_type, false))
        }
        _ => None,
    }
}

async fn map(
    pool: &AnyPool,
    dialect: Dialect,
    shape: &TableShape,
) -> Result<Arc<TableInfo>, SinkError> {
    let Some(columns) = read_columns(pool, dialect, &shape.name).await? else {
        return Err(SinkError::Rejected {
            table: shape.name.clone(),
            reason: format!(
                "table `{}` does not exist in the store; in mode = \"map\" rows go into a \
                 table the application creates: create it with the subscribed columns \
                 ({}), or use mode = \"mirror\"",
                shape.name,
                shape
                    .columns
                    .iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    };
    let missing: Vec<&str> = shape
        .columns
        .iter()
        .map(|(c, _)| c.as_str())
        .filter(|c| !columns.contains_key(*c))
        .collect();
    if !missing.is_empty() {
        return Err(SinkError::Rejected {
            table: shape.name.clone(),
            reason: format!(
                "table `{}` has no column {}; add {} to the table, or drop {} from the \
                 subscription's `columns` (or `rename` {} to an existing column)",
                shape.name,
                list(&missing),
                if missing.len() == 1 { "it" } else { "them" },
                if missing.len() == 1 { "it" } else { "them" },
                if missing.len() == 1 { "it" } else { "them" },
            ),
        });
    }
    let key: BTreeSet<&str> = shape.key.iter().map(String::as_str).collect();
    let uniques = unique_keys(pool, dialect, &shape.name).await?;
    if !uniques
        .iter()
        .any(|u| u.iter().map(String::as_str).collect::<BTreeSet<_>>() == key)
    {
        return Err(SinkError::Rejected {
            table: shape.name.clone(),
            reason: format!(
                "table `{}` has no primary key or unique index on exactly ({}), which rows \
                 are upserted by; add one (e.g. ALTER TABLE {} ADD PRIMARY KEY ({}))",
                shape.name,
                shape.key.join(", "),
                shape.name,
                shape.key.join(", ")
            ),
        });
    }
    Ok(Arc::new(TableInfo { columns }))
}

fn list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn execute(pool: &AnyPool, sql: String, operation: &'static str) -> Result<(), SinkError> {
    sqlx::query(AssertSqlSafe(sql))
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(|source| SinkError::Store { operation, source })
}

/// The columns of `table` in the current schema (database), or `None` when there is no
/// such table.
async fn read_columns(
    pool: &AnyPool,
    dialect: Dialect,
    table: &str,
) -> Result<Option<HashMap<String, Column>>, SinkError> {
    // Catalog columns are cast to text: their own types (Postgres domains, MySQL
    // binary-collated strings) are not all decodable through `Any`.
    let sql = match dialect {
        Dialect::Postgres => {
            "SELECT column_name::text, data_type::text, udt_schema::text, udt_name::text \
             FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1"
        }
        Dialect::MySql => {
            "SELECT CAST(column_name AS CHAR), CAST(data_type AS CHAR), '', '' \
             FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ?"
        }
        Dialect::Sqlite => "SELECT name, type, '', '' FROM pragma_table_info(?)",
    };
    let rows = sqlx::query(sql)
        .bind(table)
        .fetch_all(pool)
        .await
        .map_err(|source| SinkError::Store {
            operation: "read table columns",
            source,
        })?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut columns = HashMap::new();
    for row in rows {
        let get = |i: usize| -> Result<String, SinkError> {
            row.try_get::<String, _>(i)
                .map_err(|source| SinkError::Store {
                    operation: "read table columns",
                    source,
                })
        };
        let (name, data_type) = (get(0)?, get(1)?);
        let cast = match dialect {
            Dialect::Postgres => format!("{}.{}", dialect.quote(&get(2)?), dialect.quote(&get(3)?)),
            Dialect::MySql | Dialect::Sqlite => String::new(),
        };
        let kind = Kind::of(dialect, &data_type);
        columns.insert(name, Column { kind, cast });
    }
    Ok(Some(columns))
}

/// The column sets of the primary key and unique indexes of `table` (partial and
/// expression indexes left out: an upsert cannot use them).
async fn unique_keys(
    pool: &AnyPool,
    dialect: Dialect,
    table: &str,
) -> Result<Vec<Vec<String>>, SinkError> {
    let sql = match dialect {
        Dialect::Postgres => {
            "SELECT i.indexrelid::oid::bigint::text, a.attname::text \
             FROM pg_index i JOIN pg_attribute a \
               ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = to_regclass(quote_ident($1)) AND i.indisunique \
               AND i.indpred IS NULL AND i.indexprs IS NULL"
        }
        Dialect::MySql => {
            "SELECT CAST(index_name AS CHAR), CAST(column_name AS CHAR) \
             FROM information_schema.statistics \
             WHERE table_schema = DATABASE() AND table_name = ? AND non_unique = 0"
        }
        // The primary key shows up as an index unless it is the rowid (INTEGER PRIMARY
        // KEY): read it from table_info as well.
        Dialect::Sqlite => {
            "SELECT il.name, ii.name FROM pragma_index_list(?1) AS il, \
               pragma_index_info(il.name) AS ii \
             WHERE il.\"unique\" = 1 AND il.partial = 0 \
             UNION ALL SELECT '', name FROM pragma_table_info(?1) WHERE pk > 0"
        }
    };
    let rows = sqlx::query(sql)
        .bind(table)
        .fetch_all(pool)
        .await
        .map_err(|source| SinkError::Store {
            operation: "read table keys",
            source,
        })?;
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    for row in rows {
        let (index, column) = row
            .try_get::<String, _>(0)
            .and_then(|i| Ok((i, row.try_get::<String, _>(1)?)))
            .map_err(|source| SinkError::Store {
                operation: "read table keys",
                source,
            })?;
        keys.entry(index).or_default().push(column);
    }
    Ok(keys.into_values().collect())
}
