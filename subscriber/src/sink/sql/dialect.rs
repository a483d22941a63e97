//! The SQL text that differs between Postgres, MySQL/MariaDB and SQLite: identifier
//! quoting, placeholders, column types, upserts and the bookkeeping tables.

/// Which database the store talks to. One code path (sqlx `Any`) serves all three; only
/// the generated SQL text differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

impl Dialect {
    /// The dialect of a store URL, from its scheme.
    pub fn from_url(url: &str) -> Option<Dialect> {
        let scheme = url.split_once(':')?.0.to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            "mysql" | "mariadb" => Some(Dialect::MySql),
            "sqlite" => Some(Dialect::Sqlite),
            _ => None,
        }
    }

    /// Quotes an identifier. Callers pass only names checked by
    /// [`crate::table::is_identifier`] or read from the catalog; quotes are doubled
    /// anyway so a catalog name cannot end the quoting.
    pub fn quote(self, name: &str) -> String {
        match self {
            Dialect::MySql => format!("`{}`", name.replace('`', "``")),
            Dialect::Postgres | Dialect::Sqlite => format!("\"{}\"", name.replace('"', "\"\"")),
        }
    }

    /// The placeholder of the `n`th (1-based) bound parameter.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Postgres => format!("${n}"),
            Dialect::MySql | Dialect::Sqlite => "?".to_string(),
        }
    }

    /// The class of a published source type in a mirrored table: `int`, `float`,
    /// `bool` or `text`.
    pub fn mirror_class(source_type: &str) -> &'static str {
        match source_type {
            "int2" | "int4" | "int8" | "oid" | "xid" | "smallint" | "integer" | "int"
            | "bigint" | "tinyint" | "mediumint" => "int",
            "float4" | "float8" | "real" | "double" | "float" | "double precision" => "float",
            "bool" | "boolean" => "bool",
            _ => "text",
        }
    }

    /// The column type a mirrored table gets for a published source type.
    pub fn mirror_type(self, source_type: &str, is_key: bool) -> &'static str {
        let class = Self::mirror_class(source_type);
        match (self, class) {
            (_, "int") => "BIGINT",
            (Dialect::Postgres, "float") => "DOUBLE PRECISION",
            (Dialect::MySql, "float") => "DOUBLE",
            (Dialect::Sqlite, "float") => "REAL",
            (_, "bool") => "BOOLEAN",
            // MySQL cannot index LONGTEXT without a prefix length; binary collation keeps
            // keys case-sensitive as they are at the source.
            (Dialect::MySql, _) if is_key => "VARCHAR(255) COLLATE utf8mb4_bin",
            (Dialect::MySql, _) => "LONGTEXT",
            _ => "TEXT",
        }
    }

    /// Suffix of a `CREATE TABLE` statement.
    pub fn table_options(self) -> &'static str {
        match self {
            Dialect::MySql => " DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            Dialect::Postgres | Dialect::Sqlite => "",
        }
    }

    /// `CREATE TABLE IF NOT EXISTS` statements for Kausal's bookkeeping tables.
    pub fn bookkeeping_ddl(self) -> [String; 6] {
        let ns = match self {
            Dialect::MySql => "VARCHAR(200)",
            Dialect::Postgres | Dialect::Sqlite => "TEXT",
        };
        let body = match self {
            Dialect::MySql => "LONGTEXT",
            Dialect::Postgres | Dialect::Sqlite => "TEXT",
        };
        let options = self.table_options();
        let through = self.quote("through");
        [
            format!(
                "CREATE TABLE IF NOT EXISTS kausal_applied (namespace {ns} NOT NULL, \
                 generation BIGINT NOT NULL, seq BIGINT NOT NULL, \
                 PRIMARY KEY (namespace, generation, seq)){options}"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS kausal_progress (namespace {ns} NOT NULL, \
                 generation BIGINT NOT NULL, {through} BIGINT NOT NULL, \
                 PRIMARY KEY (namespace, generation)){options}"
            ),
            // Parts of split transactions until all are there; `total` is set on the last
            // part only, `body` is the envelope as JSON.
            format!(
                "CREATE TABLE IF NOT EXISTS kausal_parts (namespace {ns} NOT NULL, \
                 generation BIGINT NOT NULL, seq BIGINT NOT NULL, part BIGINT NOT NULL, \
                 total BIGINT NULL, body {body} NOT NULL, \
                 PRIMARY KEY (namespace, generation, seq, part)){options}"
            ),
            // Bootstraps of this store, one row per table (published name); see
            // `sql::bootstrap`.
            format!(
                "CREATE TABLE IF NOT EXISTS kausal_bootstrap (namespace {ns} NOT NULL, \
                 tbl {ns} NOT NULL, request {ns} NOT NULL, last_key {body} NULL, \
                 done INT NOT NULL, rows_applied BIGINT NOT NULL, \
                 generation BIGINT NOT NULL, done_seq BIGINT NOT NULL, \
                 PRIMARY KEY (namespace, tbl)){options}"
            ),
            // Row versions of tables being bootstrapped (`k` = key as JSON; '' = the
            // table's truncate floor).
            format!(
                "CREATE TABLE IF NOT EXISTS kausal_rowv (namespace {ns} NOT NULL, \
                 tbl {ns} NOT NULL, k {key} NOT NULL, seq BIGINT NOT NULL, \
                 PRIMARY KEY (namespace, tbl, k)){options}",
                key = match self {
                    // InnoDB keys hold 3072 bytes: 200 + 200 + 350 characters of utf8mb4.
                    Dialect::MySql => "VARCHAR(350)",
                    Dialect::Postgres | Dialect::Sqlite => "TEXT",
                }
            ),
            // Each running worker's live status (JSON, see `crate::status`), for
            // `kausal status`; `updated_ms` tells a running worker from a gone one.
            format!(
                "CREATE TABLE IF NOT EXISTS kausal_workers (worker {ns} NOT NULL, \
                 updated_ms BIGINT NOT NULL, body {body} NOT NULL, \
                 PRIMARY KEY (worker)){options}"
            ),
        ]
    }

    /// Stages one part unless it is already staged. Parameters: namespace, generation,
    /// seq, part, total, body.
    pub fn stage_part(self) -> String {
        let values: Vec<String> = (1..=6).map(|n| self.placeholder(n)).collect();
        let insert = format!(
            "INSERT INTO kausal_parts (namespace, generation, seq, part, total, body) \
             VALUES ({})",
            values.join(", ")
        );
        match self {
            // Not `INSERT IGNORE`: it would also turn a too-long namespace into a silently
            // truncated one. Only a duplicate key is meant to be a no-op.
            Dialect::MySql => format!("{insert} ON DUPLICATE KEY UPDATE part = part"),
            Dialect::Postgres | Dialect::Sqlite => {
                format!("{insert} ON CONFLICT (namespace, generation, seq, part) DO NOTHING")
            }
        }
    }

    /// Raises `kausal_progress.through` to `$3` unless it is already higher.
    pub fn raise_progress(self) -> String {
        let t = self.quote("through");
        let (p1, p2, p3) = (
            self.placeholder(1),
            self.placeholder(2),
            self.placeholder(3),
        );
        let insert = format!(
            "INSERT INTO kausal_progress (namespace, generation, {t}) VALUES ({p1}, {p2}, {p3})"
        );
        match self {
            Dialect::MySql => {
                format!("{insert} ON DUPLICATE KEY UPDATE {t} = GREATEST({t}, VALUES({t}))")
            }
            Dialect::Postgres | Dialect::Sqlite => format!(
                "{insert} ON CONFLICT (namespace, generation) DO UPDATE SET {t} = \
                 CASE WHEN kausal_progress.{t} > excluded.{t} THEN kausal_progress.{t} \
                 ELSE excluded.{t} END"
            ),
        }
    }

    /// Records one transaction as applied, unless the compacted watermark already covers
    /// it (a compaction that committed since this group read the watermark). Parameters:
    /// namespace, generation, seq.
    pub fn record_applied(self, rows: usize) -> String {
        let t = self.quote("through");
        // The rows as a UNION ALL of SELECTs: one form that Postgres, MySQL/MariaDB and
        // SQLite all accept, with named columns for the guard below.
        let rows: Vec<String> = (0..rows)
            .map(|i| {
                let (a, b, c) = (
                    self.placeholder(3 * i + 1),
                    self.placeholder(3 * i + 2),
                    self.placeholder(3 * i + 3),
                );
                if i == 0 {
                    format!("SELECT {a} AS n, {b} AS g, {c} AS s")
                } else {
                    format!("SELECT {a}, {b}, {c}")
                }
            })
            .collect();
        format!(
            "INSERT INTO kausal_applied (namespace, generation, seq) SELECT v.n, v.g, v.s \
             FROM ({}) v WHERE NOT EXISTS (SELECT 1 FROM kausal_progress p \
             WHERE p.namespace = v.n AND p.generation = v.g AND p.{t} >= v.s)",
            rows.join(" UNION ALL ")
        )
    }

    /// Postgres: [`Dialect::record_applied`] with the rows as three array parameters
    /// (namespaces, generations, seqs).
    pub fn record_applied_arrays(self) -> String {
        let t = self.quote("through");
        format!(
            "INSERT INTO kausal_applied (namespace, generation, seq) SELECT v.n, v.g, v.s \
             FROM unnest(CAST($1 AS text[]), CAST($2 AS int8[]), CAST($3 AS int8[])) AS v(n, g, s) \
             WHERE NOT EXISTS (SELECT 1 FROM kausal_progress p \
             WHERE p.namespace = v.n AND p.generation = v.g AND p.{t} >= v.s)"
        )
    }

    /// A multi-row `INSERT … ON CONFLICT/DUPLICATE KEY UPDATE` of `columns` (already
    /// quoted and in bind order; `rows` holds each row's placeholder expressions),
    /// updating `set` (quoted, a subset of `columns`) where `key` (quoted) exists. The
    /// rows must have distinct keys (Postgres refuses to update a row twice).
    pub fn upsert(
        self,
        table: &str,
        columns: &[String],
        rows: &[Vec<String>],
        key: &[String],
        set: &[String],
    ) -> String {
        let rows: Vec<String> = rows.iter().map(|r| format!("({})", r.join(", "))).collect();
        let values = format!("VALUES {}", rows.join(", "));
        self.upsert_from(table, columns, &values, key, set)
    }

    /// `INSERT INTO table (columns) <source> ON CONFLICT/DUPLICATE KEY UPDATE …`, where
    /// `source` is `VALUES …` or a `SELECT` giving the columns in order.
    pub fn upsert_from(
        self,
        table: &str,
        columns: &[String],
        source: &str,
        key: &[String],
        set: &[String],
    ) -> String {
        let insert = format!("INSERT INTO {table} ({}) {source}", columns.join(", "));
        match self {
            Dialect::MySql => {
                let set: Vec<String> = if set.is_empty() {
                    // Nothing to update: a no-op assignment keeps the statement an upsert.
                    vec![format!("{0} = {0}", key[0])]
                } else {
                    set.iter().map(|c| format!("{c} = VALUES({c})")).collect()
                };
                format!("{insert} ON DUPLICATE KEY UPDATE {}", set.join(", "))
            }
            Dialect::Postgres | Dialect::Sqlite => {
                let target = key.join(", ");
                if set.is_empty() {
                    format!("{insert} ON CONFLICT ({target}) DO NOTHING")
                } else {
                    let set: Vec<String> =
                        set.iter().map(|c| format!("{c} = excluded.{c}")).collect();
                    format!(
                        "{insert} ON CONFLICT ({target}) DO UPDATE SET {}",
                        set.join(", ")
                    )
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialect_follows_the_url_scheme() {
        assert_eq!(
            Dialect::from_url("postgresql://h/db"),
            Some(Dialect::Postgres)
        );
        assert_eq!(Dialect::from_url("mysql://u:p@h/db"), Some(Dialect::MySql));
        assert_eq!(
            Dialect::from_url("sqlite:///tmp/x.db"),
            Some(Dialect::Sqlite)
        );
        assert_eq!(Dialect::from_url("redis://h"), None);
    }

    #[test]
    fn upserts_per_dialect() {
        let cols = ["\"id\"".to_string(), "\"v\"".to_string()];
        let rows = [
            vec!["$1".to_string(), "$2".to_string()],
            vec!["$3".to_string(), "$4".to_string()],
        ];
        assert_eq!(
            Dialect::Postgres.upsert("\"t\"", &cols, &rows, &cols[..1], &cols[1..]),
            "INSERT INTO \"t\" (\"id\", \"v\") VALUES ($1, $2), ($3, $4) ON CONFLICT (\"id\") \
             DO UPDATE SET \"v\" = excluded.\"v\""
        );
        let cols = ["`id`".to_string()];
        assert_eq!(
            Dialect::MySql.upsert("`t`", &cols, &[vec!["?".to_string()]], &cols, &[]),
            "INSERT INTO `t` (`id`) VALUES (?) ON DUPLICATE KEY UPDATE `id` = `id`"
        );
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(Dialect::Postgres.quote("a\"b"), "\"a\"\"b\"");
        assert_eq!(Dialect::MySql.quote("a`b"), "`a``b`");
    }
}
