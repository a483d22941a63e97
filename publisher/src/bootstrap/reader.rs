//! Reading a table's rows in key order, as the stream would publish them.

use super::windows::PgSnapshot;
use super::Rows;
use crate::config::TableConfig;
use crate::error::SourceError;
use crate::source::postgres::catalog::{self, TypeCache};
use crate::source::values::Conv;
use kausal_bus::{Column, TableSchema};
use serde_json::{Map, Value};

/// How to read one table's rows as the stream would publish them.
pub(super) struct Reader {
    sql: String,
    /// Published name and conversion of each selected column, key columns first.
    columns: Vec<(String, Conv)>,
    /// Published names of the key columns (the first `key_len` selected ones).
    key_len: usize,
    pub(super) schema: TableSchema,
    pub(super) estimated_rows: u64,
}

impl Reader {
    pub(super) async fn new(
        client: &tokio_postgres::Client,
        t: &TableConfig,
    ) -> Result<Reader, SourceError> {
        let (schema_name, table) = t.qualified();
        let display = format!("{schema_name}.{table}");
        let meta = catalog::table_meta(client, &schema_name, &table)
            .await?
            .ok_or_else(|| SourceError::Bootstrap {
                table: display.clone(),
                reason: "the table does not exist".into(),
            })?;
        let rows = client
            .query(
                // Not the stored generated columns: the stream does not carry them.
                "SELECT a.attname::text, a.atttypid FROM pg_attribute a WHERE a.attrelid = $1 \
                 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                 ORDER BY a.attnum",
                &[&meta.oid],
            )
            .await
            .map_err(|source| SourceError::Query {
                context: "read columns for a bootstrap",
                source,
            })?;
        let cols: Vec<(String, u32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut types = TypeCache::default();
        let oids: Vec<u32> = cols.iter().map(|(_, o)| *o).collect();
        types.resolve(client, &oids).await?;
        // Key columns first (in key order), then the other published columns.
        let mut selected: Vec<(String, u32)> = Vec::new();
        for k in &meta.key {
            if let Some(c) = cols.iter().find(|(n, _)| n == k) {
                selected.push(c.clone());
            }
        }
        for c in &cols {
            if t.publishes(&c.0) && !meta.key.contains(&c.0) {
                selected.push(c.clone());
            }
        }
        let ident = catalog::ident;
        // Qualified with the table's alias: in ORDER BY a bare name would mean the
        // selected `::text` column of the same name, and sort as text.
        let key_list: Vec<String> = meta.key.iter().map(|k| format!("t.{}", ident(k))).collect();
        let params: Vec<String> = meta
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let oid = cols.iter().find(|(n, _)| n == k).map_or(25, |c| c.1);
                format!("CAST(${}::text AS {})", i + 1, types.get(oid).0)
            })
            .collect();
        let select: Vec<String> = selected
            .iter()
            // The type's output function, as pgoutput sends values: a `::text` cast
            // differs for some types (bool gives `true`, inet adds `/32`).
            .map(|(n, _)| {
                let c = format!("t.{}", ident(n));
                format!("CASE WHEN {c} IS NULL THEN NULL ELSE format('%s', {c}) END")
            })
            .collect();
        let from = format!("{} AS t", catalog::qualified_ident(&schema_name, &table));
        let order = key_list.join(", ");
        // `$n` is the limit; the key parameters come first (absent on the first chunk).
        let n = meta.key.len() + 1;
        let sql = format!(
            "SELECT {} FROM {from} WHERE NOT ${}::bool OR ({order}) > ({}) \
             ORDER BY {order} LIMIT ${n}::int8",
            select.join(", "),
            n + 1,
            params.join(", ")
        );
        let columns = selected
            .iter()
            .map(|(name, oid)| (t.published_column(name), types.get(*oid).1))
            .collect();
        let schema = TableSchema {
            table: t.published_name(),
            columns: cols
                .iter()
                .filter(|(n, _)| t.publishes(n) || meta.key.contains(n))
                .map(|(n, oid)| Column {
                    name: t.published_column(n),
                    type_name: types.get(*oid).0,
                })
                .collect(),
            key: meta.key.iter().map(|k| t.published_column(k)).collect(),
            changed: false,
        };
        let estimated: f32 = client
            .query_one(
                "SELECT reltuples FROM pg_class WHERE oid = $1",
                &[&meta.oid],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0.0);
        Ok(Reader {
            sql,
            columns,
            key_len: meta.key.len(),
            schema,
            estimated_rows: estimated.max(0.0) as u64,
        })
    }

    /// Up to `limit` rows after `after` in key order, as (key, row) in published names,
    /// and the snapshot they were read in. One short REPEATABLE READ transaction: the
    /// snapshot is taken by its first statement and the rows are read in it, so the
    /// stream can tell which of the transactions it decoded the rows do not show.
    pub(super) async fn read(
        &self,
        client: &tokio_postgres::Client,
        after: Option<&Map<String, Value>>,
        limit: usize,
    ) -> Result<(Rows, PgSnapshot), SourceError> {
        let query = |source| SourceError::Query {
            context: "read a bootstrap chunk",
            source,
        };
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(query)?;
        let read = self.read_in_transaction(client, after, limit).await;
        let end = if read.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = client.batch_execute(end).await.map_err(query);
        let read = read?;
        ended?;
        Ok(read)
    }

    async fn read_in_transaction(
        &self,
        client: &tokio_postgres::Client,
        after: Option<&Map<String, Value>>,
        limit: usize,
    ) -> Result<(Rows, PgSnapshot), SourceError> {
        let text: String = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(|source| SourceError::Query {
                context: "take a bootstrap snapshot",
                source,
            })?
            .get(0);
        let snapshot = PgSnapshot::parse(&text).ok_or_else(|| SourceError::Bootstrap {
            table: self.schema.table.clone(),
            reason: format!("unexpected snapshot from pg_current_snapshot(): {text}"),
        })?;
        let key_texts: Vec<Option<String>> = self.columns[..self.key_len]
            .iter()
            .map(|(name, _)| {
                after.and_then(|a| a.get(name)).map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            })
            .collect();
        let limit = limit as i64;
        let has_after = after.is_some();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        for k in &key_texts {
            params.push(k);
        }
        params.push(&limit);
        params.push(&has_after);
        let rows = client
            .query(self.sql.as_str(), &params)
            .await
            .map_err(|source| SourceError::Query {
                context: "read a bootstrap chunk",
                source,
            })?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut key = Map::new();
            let mut values = Map::new();
            for (i, (name, conv)) in self.columns.iter().enumerate() {
                let text: Option<String> = row.get(i);
                let value = text.map_or(Value::Null, |t| conv.convert(t.as_bytes()));
                if i < self.key_len {
                    key.insert(name.clone(), value.clone());
                }
                values.insert(name.clone(), value);
            }
            out.push((key, values));
        }
        Ok((out, snapshot))
    }
}
