//! What the publisher reads from the Postgres catalog: server settings and privileges
//! (checked before streaming), keys, foreign keys and types of published tables, and the
//! publication and slot it owns.

use crate::config::{split_name, PublisherConfig};
use crate::error::SourceError;
use crate::source::change::TableMeta;
use crate::source::tls::SourceTls;
use crate::source::values::Conv;
use std::collections::HashMap;
use tokio_postgres::{Client, NoTls};

/// Session settings that make pgoutput's text values stable (see `values`).
pub const SESSION_OPTIONS: &str =
    "-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 -c extra_float_digits=3";

fn q(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    move |source| SourceError::Query { context, source }
}

/// Quotes an identifier for SQL text.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn qualified_ident(schema: &str, table: &str) -> String {
    format!("{}.{}", ident(schema), ident(table))
}

/// Parsed connection settings of the source.
#[derive(Clone)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
    /// `sslmode` / `sslrootcert` of the URL (both connections use them).
    pub tls: SourceTls,
}

impl ConnInfo {
    pub fn endpoint(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }

    pub fn parse(url: &str, password: Option<String>) -> Result<ConnInfo, SourceError> {
        let (url, tls) = SourceTls::take_postgres(url).map_err(SourceError::TlsSettings)?;
        let cfg: tokio_postgres::Config = url.parse().map_err(|e| SourceError::Unreachable {
            endpoint: "<unparsable source.url>".into(),
            source: Box::new(e),
        })?;
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "127.0.0.1".to_string(),
        };
        let url_password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        Ok(ConnInfo {
            host,
            port: cfg.get_ports().first().copied().unwrap_or(5432),
            user: cfg.get_user().unwrap_or("postgres").to_string(),
            password: password.or(url_password).unwrap_or_default(),
            database: cfg.get_dbname().unwrap_or("postgres").to_string(),
            tls,
        })
    }

    /// Opens a normal SQL connection (catalog queries, checks) and drives it in the
    /// background.
    pub async fn connect(&self) -> Result<Client, SourceError> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.database)
            .options(SESSION_OPTIONS)
            .application_name("kausal")
            .connect_timeout(std::time::Duration::from_secs(10));
        if !self.password.is_empty() {
            cfg.password(&self.password);
        }
        let connected = if self.tls.enabled() {
            let config =
                crate::source::tls::client_config(&self.tls).map_err(SourceError::TlsSettings)?;
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
            cfg.connect(tls).await.map(|(client, conn)| {
                tokio::spawn(async move {
                    if let Err(error) = conn.await {
                        tracing::debug!(error = %error, "catalog connection ended");
                    }
                });
                client
            })
        } else {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            cfg.connect(NoTls).await.map(|(client, conn)| {
                tokio::spawn(async move {
                    if let Err(error) = conn.await {
                        tracing::debug!(error = %error, "catalog connection ended");
                    }
                });
                client
            })
        };
        match connected {
            Ok(client) => Ok(client),
            Err(e) => {
                let code = e.code().map(|c| c.code().to_string());
                let endpoint = self.endpoint();
                match code.as_deref() {
                    Some("28P01") | Some("28000") => Err(SourceError::BadLogin {
                        endpoint,
                        user: self.user.clone(),
                        source: Box::new(e),
                    }),
                    _ if self.tls.enabled()
                        && kausal_bus::tls::hint(&kausal_bus::tls::describe(&e)).is_some() =>
                    {
                        Err(SourceError::Tls {
                            endpoint,
                            detail: kausal_bus::tls::describe(&e),
                        })
                    }
                    _ => Err(SourceError::Unreachable {
                        endpoint,
                        source: Box::new(e),
                    }),
                }
            }
        }
    }
}

pub async fn table_meta(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<TableMeta>, SourceError> {
    let Some(row) = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &table],
        )
        .await
        .map_err(q("look up table"))?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let identity: String = row.get(1);
    let key_rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1 AND (i.indisprimary OR (i.indisreplident AND NOT EXISTS \
               (SELECT 1 FROM pg_index p WHERE p.indrelid = $1 AND p.indisprimary))) \
             ORDER BY i.indisprimary DESC, array_position(i.indkey::int2[], a.attnum)",
            &[&oid],
        )
        .await
        .map_err(q("read primary key"))?;
    let fk_rows = client
        .query(
            "SELECT \
               (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(c.conkey) \
                  WITH ORDINALITY k(attnum, ord) JOIN pg_attribute a \
                  ON a.attrelid = c.conrelid AND a.attnum = k.attnum), \
               n2.nspname::text, c2.relname::text, \
               (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(c.confkey) \
                  WITH ORDINALITY k(attnum, ord) JOIN pg_attribute a \
                  ON a.attrelid = c.confrelid AND a.attnum = k.attnum) \
             FROM pg_constraint c JOIN pg_class c2 ON c2.oid = c.confrelid \
             JOIN pg_namespace n2 ON n2.oid = c2.relnamespace \
             WHERE c.contype = 'f' AND c.conrelid = $1 ORDER BY c.conname",
            &[&oid],
        )
        .await
        .map_err(q("read foreign keys"))?;
    let col_rows = client
        .query(
            "SELECT attname::text, attgenerated::text FROM pg_attribute WHERE attrelid = $1 \
             AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(q("read columns"))?;
    Ok(Some(TableMeta {
        oid,
        key: key_rows.iter().map(|r| r.get(0)).collect(),
        replica_identity: identity,
        foreign_keys: fk_rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect(),
        columns: col_rows.iter().map(|r| r.get(0)).collect(),
        json_columns: Vec::new(),
        bool_columns: Vec::new(),
        generated_columns: col_rows
            .iter()
            .filter(|r| r.get::<_, String>(1) == "s")
            .map(|r| r.get(0))
            .collect(),
    }))
}

/// Columns of table `oid` with the type names envelopes carry (`typname`), in order.
pub async fn column_types(client: &Client, oid: u32) -> Result<Vec<(String, String)>, SourceError> {
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(q("read column types"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Conversions and names of column types, looked up once per type.
#[derive(Default)]
pub struct TypeCache {
    types: HashMap<u32, (String, Conv)>,
}

impl TypeCache {
    pub async fn resolve(&mut self, client: &Client, oids: &[u32]) -> Result<(), SourceError> {
        let missing: Vec<u32> = oids
            .iter()
            .copied()
            .filter(|o| !self.types.contains_key(o))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        // A domain is published as the type it is defined over (a domain over a domain
        // as the base of the chain): its values are that type's.
        let rows = client
            .query(
                "WITH RECURSIVE d(oid, base) AS ( \
                   SELECT t.oid, t.oid FROM pg_type t WHERE t.oid = ANY($1) \
                   UNION ALL \
                   SELECT d.oid, b.typbasetype FROM d JOIN pg_type b ON b.oid = d.base \
                   WHERE b.typtype = 'd') \
                 SELECT d.oid, t.typname::text, t.typcategory::text, e.typname::text, \
                   e.typcategory::text \
                 FROM d JOIN pg_type t ON t.oid = d.base AND t.typtype <> 'd' \
                 LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'",
                &[&missing],
            )
            .await
            .map_err(q("read column types"))?;
        for r in rows {
            let oid: u32 = r.get(0);
            let name: String = r.get(1);
            let cat: String = r.get(2);
            let elem: Option<String> = r.get(3);
            let elem_cat: Option<String> = r.get(4);
            let elem_conv = elem.map(|e| {
                Conv::for_type(
                    &e,
                    elem_cat.unwrap_or_default().bytes().next().unwrap_or(b'U'),
                    None,
                )
            });
            let conv = Conv::for_type(&name, cat.bytes().next().unwrap_or(b'U'), elem_conv);
            self.types.insert(oid, (name, conv));
        }
        Ok(())
    }

    pub fn get(&self, oid: u32) -> (String, Conv) {
        self.types
            .get(&oid)
            .cloned()
            .unwrap_or_else(|| (format!("oid:{oid}"), Conv::Text))
    }
}

/// Checks the server and the published tables; returns each table's catalog facts by
/// `(schema, table)`. One error per problem, naming the setting and the fix.
pub async fn preflight(
    client: &Client,
    cfg: &PublisherConfig,
    user: &str,
    database: &str,
    slot: &str,
) -> Result<HashMap<(String, String), TableMeta>, SourceError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), \
               current_setting('max_replication_slots')::int8, \
               (SELECT count(*) FROM pg_replication_slots WHERE slot_name <> $1), \
               current_setting('max_wal_senders')::int8, \
               (SELECT count(*) FROM pg_stat_replication), \
               r.rolsuper, r.rolreplication \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[&slot],
        )
        .await
        .map_err(q("read server settings"))?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(SourceError::WalLevel { found: wal_level });
    }
    let (slots, used_slots): (i64, i64) = (row.get(1), row.get(2));
    if used_slots >= slots {
        return Err(SourceError::Limit {
            setting: "max_replication_slots",
            limit: slots,
            used: used_slots,
        });
    }
    let (senders, used_senders): (i64, i64) = (row.get(3), row.get(4));
    if used_senders >= senders {
        return Err(SourceError::Limit {
            setting: "max_wal_senders",
            limit: senders,
            used: used_senders,
        });
    }
    let (superuser, replication): (bool, bool) = (row.get(5), row.get(6));
    if !superuser && !replication {
        return Err(SourceError::NoReplicationPrivilege {
            user: user.to_string(),
        });
    }
    let mut out = HashMap::new();
    for t in &cfg.tables {
        let (schema, table) = t.qualified();
        let display = format!("{schema}.{table}");
        let meta = table_meta(client, &schema, &table).await?.ok_or_else(|| {
            SourceError::MissingTable {
                table: display.clone(),
                database: database.to_string(),
            }
        })?;
        let can_read: bool = client
            .query_one(
                "SELECT has_table_privilege($1::oid, 'SELECT')",
                &[&meta.oid],
            )
            .await
            .map_err(q("check privileges"))?
            .get(0);
        if !can_read {
            return Err(SourceError::NoSelect {
                table: qualified_ident(&schema, &table),
                user: user.to_string(),
            });
        }
        if meta.key.is_empty() {
            // FULL identity without a key would make every column the key: refuse, the
            // subscriber's idempotence needs a stable key.
            let identity = match meta.replica_identity.as_str() {
                "n" => "NOTHING",
                "f" => "FULL",
                "i" => "USING INDEX",
                _ => "DEFAULT",
            };
            return Err(SourceError::NoKey {
                table: display,
                identity: identity.to_string(),
            });
        }
        crate::source::check_columns(t, &meta, &display, |r| {
            let target = split_name(r);
            cfg.tables.iter().any(|o| o.qualified() == target)
        })?;
        if let Some(column) = meta
            .generated_columns
            .iter()
            .find(|c| t.columns.contains(c))
        {
            return Err(SourceError::GeneratedColumn {
                table: display,
                column: column.clone(),
            });
        }
        if !meta.generated_columns.is_empty() {
            // (Not `display` inside the macro: it names tracing's own `display` there.)
            let name = display.as_str();
            tracing::warn!(
                table = name,
                columns = ?meta.generated_columns,
                "stored generated columns are not published: Postgres does not send them to \
                 logical replication (before version 18); compute them in the read model"
            );
        }
        out.insert((schema, table), meta);
    }
    Ok(out)
}

/// Creates the publication, or makes its table list match the configuration.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    cfg: &PublisherConfig,
) -> Result<(), SourceError> {
    let mut wanted: Vec<(String, String)> = cfg.tables.iter().map(|t| t.qualified()).collect();
    wanted.sort();
    let list = wanted
        .iter()
        .map(|(s, t)| qualified_ident(s, t))
        .collect::<Vec<_>>()
        .join(", ");
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(q("look up publication"))?
        .is_some();
    if !exists {
        tracing::info!(publication = name, "creating publication");
        // Via the partition root: a partitioned table's changes come under its own
        // name (and relation), whichever partition holds the row, also partitions
        // created later; without it they would come under each partition's name.
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish_via_partition_root = true)",
                ident(name)
            ))
            .await
            .map_err(q("create publication"))?;
        return Ok(());
    }
    let via_root: bool = client
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(q("read publication"))?
        .get(0);
    if !via_root {
        // A publication created by an earlier version: partitioned tables published
        // under their partitions' names would not match the configuration.
        tracing::info!(
            publication = name,
            "publishing partitioned tables via their root"
        );
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                ident(name)
            ))
            .await
            .map_err(q("alter publication"))?;
    }
    let mut have: Vec<(String, String)> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
             WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(q("read publication"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    have.sort();
    if have != wanted {
        tracing::info!(publication = name, "updating publication tables");
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} SET TABLE {list}",
                ident(name)
            ))
            .await
            .map_err(q("alter publication"))?;
    }
    Ok(())
}

/// The slot's plugin and confirmed position, if it exists in this database.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<(String, u64)>, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, COALESCE(pg_wal_lsn_diff(confirmed_flush_lsn, '0/0'), 0)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await
        .map_err(q("look up replication slot"))?;
    Ok(row.map(|r| (r.get(0), r.get::<_, i64>(1) as u64)))
}

pub async fn create_slot(client: &Client, slot: &str) -> Result<u64, SourceError> {
    tracing::info!(slot, "creating replication slot");
    let row = client
        .query_one(
            "SELECT pg_wal_lsn_diff(lsn, '0/0')::int8 FROM \
             pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(q("create replication slot"))?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Published tables that no longer exist at the source (dropped or renamed behind the
/// publisher's back), as `schema.table`.
pub async fn missing_tables(
    client: &Client,
    cfg: &crate::config::PublisherConfig,
) -> Result<Vec<String>, SourceError> {
    let names: Vec<String> = cfg
        .tables
        .iter()
        .map(|t| {
            let (schema, table) = t.qualified();
            qualified_ident(&schema, &table)
        })
        .collect();
    let rows = client
        .query(
            "SELECT n FROM unnest($1::text[]) AS n WHERE to_regclass(n) IS NULL",
            &[&names],
        )
        .await
        .map_err(q("look up published tables"))?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0).replace('"', ""))
        .collect())
}

/// Bytes of WAL the slot holds back (what a stalled publisher costs the database).
pub async fn slot_lag_bytes(client: &Client, slot: &str) -> Result<Option<i64>, SourceError> {
    let row = client
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(q("read slot lag"))?;
    Ok(row.and_then(|r| r.get(0)))
}
