//! What the publisher reads from a MySQL / MariaDB server over plain SQL: settings and
//! privileges (checked before streaming), the current binlog position, and keys and
//! foreign keys of published tables from `information_schema`.

use crate::config::{MysqlSource, PublisherConfig, TableConfig};
use crate::error::SourceError;
use crate::source::change::TableMeta;
use crate::source::tls::{SourceTls, TlsMode};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, SslOpts};
use std::collections::HashMap;

fn q(context: &'static str) -> impl FnOnce(mysql_async::Error) -> SourceError {
    move |source| SourceError::MysqlQuery { context, source }
}

/// Quotes an identifier for SQL text.
pub fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// Connection settings of the source.
#[derive(Clone)]
pub struct ConnInfo {
    pub opts: Opts,
    /// `ssl-mode` / `ssl-ca` of the URL.
    pub tls: SourceTls,
    pub user: String,
    pub database: String,
}

impl ConnInfo {
    pub fn parse(src: &MysqlSource) -> Result<ConnInfo, SourceError> {
        let (url, tls) = SourceTls::take_mysql(&src.url).map_err(SourceError::TlsSettings)?;
        let opts = Opts::from_url(&url).map_err(|e| SourceError::MysqlUnreachable {
            endpoint: "<unparsable source.url>".into(),
            source: e.into(),
        })?;
        let mut builder = OptsBuilder::from_opts(opts)
            // The binlog stream stays open for days; pools and their TTLs do not apply.
            .stmt_cache_size(0usize)
            .tcp_keepalive(Some(std::time::Duration::from_secs(10)))
            .prefer_socket(false)
            .ssl_opts(ssl_opts(&tls));
        if let Some(password) = src.password()? {
            builder = builder.pass(Some(password));
        }
        let opts: Opts = builder.into();
        Ok(ConnInfo {
            user: opts.user().unwrap_or("root").to_string(),
            database: opts.db_name().unwrap_or_default().to_string(),
            opts,
            tls,
        })
    }

    pub fn endpoint(&self) -> String {
        format!(
            "{}:{}/{}",
            self.opts.ip_or_hostname(),
            self.opts.tcp_port(),
            self.database
        )
    }

    pub async fn connect(&self) -> Result<Conn, SourceError> {
        let connecting = Conn::new(self.opts.clone());
        let conn = tokio::time::timeout(std::time::Duration::from_secs(10), connecting)
            .await
            .map_err(|_| SourceError::MysqlUnreachable {
                endpoint: self.endpoint(),
                source: mysql_async::Error::Other("connect timed out after 10 s".into()),
            })?;
        match conn {
            Ok(mut conn) => {
                // Text values in information_schema and time zones as the tests expect.
                conn.query_drop("SET NAMES utf8mb4, time_zone = '+00:00'")
                    .await
                    .map_err(q("set session"))?;
                Ok(conn)
            }
            Err(mysql_async::Error::Server(e)) if e.code == 1045 || e.code == 1044 => {
                Err(SourceError::MysqlBadLogin {
                    endpoint: self.endpoint(),
                    user: self.user.clone(),
                    source: mysql_async::Error::Server(e),
                })
            }
            Err(source) => {
                let detail = kausal_bus::tls::describe(&source);
                if self.tls.enabled() && kausal_bus::tls::hint(&detail).is_some() {
                    return Err(SourceError::Tls {
                        endpoint: self.endpoint(),
                        detail,
                    });
                }
                Err(SourceError::MysqlUnreachable {
                    endpoint: self.endpoint(),
                    source,
                })
            }
        }
    }
}

/// The driver's TLS options for a mode: the CA file replaces the built-in roots, so a
/// certificate from any other CA is refused.
fn ssl_opts(tls: &SourceTls) -> Option<SslOpts> {
    kausal_bus::tls::install_crypto_provider();
    let roots = || {
        let path = tls.ca_file.clone().unwrap_or_default();
        vec![path.into()]
    };
    match tls.mode {
        TlsMode::Disable => None,
        TlsMode::Require => Some(
            SslOpts::default()
                .with_danger_accept_invalid_certs(true)
                .with_danger_skip_domain_validation(true),
        ),
        TlsMode::VerifyCa => Some(
            SslOpts::default()
                .with_root_certs(roots())
                .with_disable_built_in_roots(true)
                .with_danger_skip_domain_validation(true),
        ),
        TlsMode::VerifyFull => Some(
            SslOpts::default()
                .with_root_certs(roots())
                .with_disable_built_in_roots(true),
        ),
    }
}

/// `(database, table)` of a configured table: an unqualified name is in the URL's
/// database.
pub fn qualified(name: &str, database: &str) -> (String, String) {
    match name.split_once('.') {
        Some((d, t)) => (d.to_string(), t.to_string()),
        None => (database.to_string(), name.to_string()),
    }
}

pub fn table_qualified(t: &TableConfig, database: &str) -> (String, String) {
    qualified(&t.name, database)
}

/// What kind of server this is.
#[derive(Debug, Clone)]
pub struct Server {
    pub mariadb: bool,
    pub version: String,
}

async fn var(conn: &mut Conn, name: &str) -> Result<Option<String>, SourceError> {
    // An unknown variable is an error on both servers: treat it as unset.
    match conn
        .query_first::<Option<String>, _>(format!("SELECT @@GLOBAL.{name}"))
        .await
    {
        Ok(v) => Ok(v.flatten()),
        Err(mysql_async::Error::Server(e)) if e.code == 1193 => Ok(None),
        Err(e) => Err(q("read server settings")(e)),
    }
}

fn setting(
    setting: &'static str,
    found: Option<String>,
    want: &'static str,
    fix: &'static str,
) -> SourceError {
    SourceError::BinlogSetting {
        setting,
        found: found.unwrap_or_else(|| "(unset)".into()),
        want,
        fix,
    }
}

/// Checks the server settings and the user's privileges. One error per problem.
pub async fn check_server(conn: &mut Conn, user: &str) -> Result<Server, SourceError> {
    let version: String = conn
        .query_first("SELECT VERSION()")
        .await
        .map_err(q("read server version"))?
        .unwrap_or_default();
    let mariadb = version.to_ascii_lowercase().contains("mariadb");
    const RESTART: &str = "set it under [mysqld] in the server configuration (or run \
         scripts/setup.sh) and restart the server";
    let log_bin = var(conn, "log_bin").await?;
    if !matches!(log_bin.as_deref(), Some("1") | Some("ON")) {
        return Err(setting("log_bin", log_bin, "ON", RESTART));
    }
    let format = var(conn, "binlog_format").await?;
    if format.as_deref() != Some("ROW") {
        return Err(setting(
            "binlog_format",
            format,
            "ROW",
            "run `SET GLOBAL binlog_format = 'ROW';` and set it in the server configuration",
        ));
    }
    let image = var(conn, "binlog_row_image").await?;
    if image.as_deref() != Some("FULL") {
        return Err(setting(
            "binlog_row_image",
            image,
            "FULL",
            "run `SET GLOBAL binlog_row_image = 'FULL';` and set it in the server configuration",
        ));
    }
    // Column names, signedness, charsets and keys in every table-map event: the binlog
    // then describes each row as of the moment it was written, even across ALTER TABLE.
    let metadata = var(conn, "binlog_row_metadata").await?;
    if metadata.as_deref() != Some("FULL") {
        return Err(setting(
            "binlog_row_metadata",
            metadata,
            "FULL",
            "run `SET GLOBAL binlog_row_metadata = 'FULL';` and set it in the server \
             configuration (MySQL 8.0.1+ / MariaDB 10.5+)",
        ));
    }
    let server_id = var(conn, "server_id").await?;
    if matches!(server_id.as_deref(), None | Some("0")) {
        return Err(setting(
            "server_id",
            server_id,
            "a non-zero id",
            "a server with server_id = 0 refuses replicas; set server_id = 1 under [mysqld] \
             and restart the server",
        ));
    }
    if !mariadb {
        // Partial JSON updates cannot be turned into full row images.
        let options = var(conn, "binlog_row_value_options").await?;
        if options.as_deref().is_some_and(|o| !o.is_empty()) {
            return Err(setting(
                "binlog_row_value_options",
                options,
                "''",
                "run `SET GLOBAL binlog_row_value_options = '';` (partial JSON updates \
                 carry no full row image)",
            ));
        }
    }
    if !mariadb {
        // The publisher resumes by binlog file and offset on MySQL either way
        // (docs/mysql.md): GTIDs off is worth a word, not a refusal.
        let mode = var(conn, "gtid_mode").await?;
        if mode.as_deref() != Some("ON") {
            tracing::warn!(
                gtid_mode = mode.as_deref().unwrap_or("OFF"),
                "GTIDs are off; gtid_mode = ON is recommended (and needed once the \
                 publisher resumes by GTID set on MySQL)"
            );
        }
    }
    let grants: Vec<String> = conn
        .query("SHOW GRANTS FOR CURRENT_USER()")
        .await
        .map_err(q("read privileges"))?;
    let may_replicate = grants.iter().any(|g| {
        let g = g.to_ascii_uppercase();
        g.contains(" ON *.*") && (g.contains("ALL PRIVILEGES") || g.contains("REPLICATION SLAVE"))
    });
    if !may_replicate {
        return Err(SourceError::NoBinlogPrivilege {
            user: user.to_string(),
        });
    }
    Ok(Server { mariadb, version })
}

/// The server's current position: MariaDB's `gtid_binlog_pos`, else the binlog file and
/// offset. Formatted as a resume token (see [`super::position`]).
pub async fn current_position(conn: &mut Conn, server: &Server) -> Result<String, SourceError> {
    if server.mariadb {
        let pos = var(conn, "gtid_binlog_pos").await?.unwrap_or_default();
        if !pos.is_empty() {
            return Ok(format!("gtid:{pos}"));
        }
    }
    let status = match conn
        .query_first::<mysql_async::Row, _>("SHOW BINARY LOG STATUS")
        .await
    {
        Ok(row) => row,
        Err(_) => conn
            .query_first::<mysql_async::Row, _>("SHOW MASTER STATUS")
            .await
            .map_err(q("read the binlog position"))?,
    };
    let Some(row) = status else {
        return Err(setting("log_bin", None, "ON", "binary logging is off"));
    };
    let file: String = row.get(0).unwrap_or_default();
    let pos: u64 = row.get(1).unwrap_or(4);
    Ok(format!("file:{file}:{pos}"))
}

/// Columns of a table with the type names envelopes carry for them (see
/// `rows::published_type`, which names them from the binlog's column types), in order.
pub async fn column_types(
    conn: &mut Conn,
    database: &str,
    table: &str,
    meta: &TableMeta,
) -> Result<Vec<(String, String)>, SourceError> {
    let rows: Vec<(String, String, String, Option<String>)> = conn
        .exec(
            "SELECT COLUMN_NAME, LOWER(DATA_TYPE), LOWER(COLUMN_TYPE), CHARACTER_SET_NAME \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
             ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        .await
        .map_err(q("read column types"))?;
    Ok(rows
        .into_iter()
        .map(|(name, data_type, column_type, charset)| {
            let ty = if meta.bool_columns.contains(&name) {
                "bool"
            } else if meta.json_columns.contains(&name) {
                "json"
            } else {
                let unsigned = column_type.contains("unsigned");
                catalog_type_name(&data_type, unsigned, charset.is_none())
            };
            (name, ty.to_string())
        })
        .collect())
}

/// The published type name of an `information_schema` data type.
fn catalog_type_name(data_type: &str, unsigned: bool, binary: bool) -> &'static str {
    match data_type {
        "tinyint" | "year" => "int2",
        "smallint" if !unsigned => "int2",
        "smallint" | "mediumint" => "int4",
        "int" | "integer" if !unsigned => "int4",
        "int" | "integer" => "int8",
        "bigint" if !unsigned => "int8",
        "bigint" | "decimal" | "numeric" => "numeric",
        "float" => "float4",
        "double" | "real" => "float8",
        "date" => "date",
        "datetime" => "timestamp",
        "timestamp" => "timestamptz",
        "time" => "time",
        "bit" => "bit",
        "json" => "json",
        "geometry" | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring"
        | "multipolygon" | "geometrycollection" => "bytea",
        "enum" | "set" => "text",
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => "bytea",
        _ if binary && !data_type.contains("text") && !data_type.contains("char") => "bytea",
        _ => "text",
    }
}

/// Catalog facts of one table, `None` when it does not exist.
pub async fn table_meta(
    conn: &mut Conn,
    mariadb: bool,
    database: &str,
    table: &str,
) -> Result<Option<TableMeta>, SourceError> {
    let typed: Vec<(String, String)> = conn
        .exec(
            "SELECT COLUMN_NAME, LOWER(COLUMN_TYPE) FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        .await
        .map_err(q("read columns"))?;
    // `BOOLEAN` is `tinyint(1)`; the binlog only says tinyint.
    let bool_columns = typed
        .iter()
        .filter(|(_, t)| t == "tinyint(1)")
        .map(|(c, _)| c.clone())
        .collect();
    let columns: Vec<String> = typed.into_iter().map(|(c, _)| c).collect();
    if columns.is_empty() {
        return Ok(None);
    }
    let key: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
             ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        .await
        .map_err(q("read primary key"))?;
    let fk_rows: Vec<(String, String, String, String, String)> = conn
        .exec(
            "SELECT CONSTRAINT_NAME, COLUMN_NAME, REFERENCED_TABLE_SCHEMA, \
               REFERENCED_TABLE_NAME, REFERENCED_COLUMN_NAME \
             FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND REFERENCED_TABLE_NAME IS NOT NULL \
             ORDER BY CONSTRAINT_NAME, ORDINAL_POSITION",
            (database, table),
        )
        .await
        .map_err(q("read foreign keys"))?;
    // (constraint name, (local columns, referenced database, table, columns)).
    type ForeignKey = (Vec<String>, String, String, Vec<String>);
    let mut foreign_keys: Vec<(String, ForeignKey)> = Vec::new();
    for (name, col, rdb, rtable, rcol) in fk_rows {
        match foreign_keys.last_mut() {
            Some((n, fk)) if *n == name => {
                fk.0.push(col);
                fk.3.push(rcol);
            }
            _ => foreign_keys.push((name, (vec![col], rdb, rtable, vec![rcol]))),
        }
    }
    // MariaDB's JSON is LONGTEXT with a `json_valid(col)` check, and the binlog says
    // text: the check is the only trace (MySQL's JSON has a binlog type of its own).
    let json_columns = if mariadb {
        let clauses: Vec<String> = conn
            .exec(
                "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS \
                 WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?",
                (database, table),
            )
            .await
            .map_err(q("read check constraints"))?;
        clauses
            .iter()
            .filter_map(|c| {
                let inner = c.trim().strip_prefix("json_valid(")?.strip_suffix(')')?;
                Some(inner.trim().trim_matches('`').replace("``", "`"))
            })
            .filter(|c| columns.contains(c))
            .collect()
    } else {
        Vec::new()
    };
    Ok(Some(TableMeta {
        oid: 0,
        key,
        replica_identity: String::new(),
        foreign_keys: foreign_keys.into_iter().map(|(_, fk)| fk).collect(),
        columns,
        json_columns,
        bool_columns,
        // The binlog's row images carry generated columns like any other.
        generated_columns: Vec::new(),
    }))
}

/// Checks the published tables; returns each one's catalog facts by `(database, table)`.
pub async fn check_tables(
    conn: &mut Conn,
    server: &Server,
    cfg: &PublisherConfig,
    user: &str,
    database: &str,
) -> Result<HashMap<(String, String), TableMeta>, SourceError> {
    let mut out = HashMap::new();
    for t in &cfg.tables {
        let (db, table) = table_qualified(t, database);
        let display = format!("{db}.{table}");
        let meta = table_meta(conn, server.mariadb, &db, &table)
            .await?
            .ok_or_else(|| SourceError::MissingTable {
                table: display.clone(),
                database: db.clone(),
            })?;
        let probe = format!("SELECT 1 FROM {}.{} LIMIT 0", ident(&db), ident(&table));
        match conn.query_drop(probe).await {
            Ok(()) => {}
            Err(mysql_async::Error::Server(e)) if e.code == 1142 || e.code == 1143 => {
                return Err(SourceError::NoSelect {
                    table: display,
                    user: user.to_string(),
                })
            }
            Err(e) => return Err(q("check privileges")(e)),
        }
        if meta.key.is_empty() {
            return Err(SourceError::MysqlNoKey { table: display });
        }
        crate::source::check_columns(t, &meta, &display, |r| {
            let target = qualified(r, database);
            cfg.tables
                .iter()
                .any(|o| table_qualified(o, database) == target)
        })?;
        warn_about_cascades(conn, &db, &table).await?;
        out.insert((db, table), meta);
    }
    Ok(out)
}

/// InnoDB applies `ON DELETE/UPDATE CASCADE` and `SET NULL` inside the storage engine,
/// and those changes never reach the binlog: subscribers would keep rows the source no
/// longer has. Said loudly at start, once per foreign key.
async fn warn_about_cascades(conn: &mut Conn, db: &str, table: &str) -> Result<(), SourceError> {
    let rules: Vec<(String, String, String, String)> = conn
        .exec(
            "SELECT CONSTRAINT_NAME, REFERENCED_TABLE_NAME, DELETE_RULE, UPDATE_RULE \
             FROM information_schema.REFERENTIAL_CONSTRAINTS \
             WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ? \
               AND (DELETE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT') \
                 OR UPDATE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT'))",
            (db, table),
        )
        .await
        .map_err(q("read foreign key rules"))?;
    for (constraint, parent, on_delete, on_update) in rules {
        tracing::warn!(
            table = %format!("{db}.{table}"), constraint, parent, on_delete, on_update,
            "foreign key with a cascading action: MySQL/MariaDB do not write cascaded \
             changes to the binlog, so subscribers will not see them. Delete or update the \
             child rows in the application (as ORMs with dependent: destroy do), or make \
             the foreign key RESTRICT"
        );
    }
    Ok(())
}
