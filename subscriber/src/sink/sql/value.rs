//! JSON values (as the publisher sends them) to bound SQL parameters, shaped by the type
//! of the column they land in.

use super::dialect::Dialect;
use base64::Engine;
use serde_json::Value;
use sqlx::any::{Any, AnyArguments};
use sqlx::query::Query;

/// What a destination column holds, as far as binding is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Bool,
    Text,
    Json,
    Binary,
    /// MySQL `DATETIME`/`TIMESTAMP`: no offset in the literal.
    Timestamp,
    /// A Postgres array: bound as an array literal.
    PgArray,
    /// Anything else (numeric, dates, enums, …): bound as the value comes; Postgres
    /// casts it to the column type.
    Other,
}

impl Kind {
    /// The kind of a column from the catalog: Postgres `information_schema` `data_type`,
    /// MySQL `information_schema` `data_type`, or a SQLite declared type.
    pub fn of(dialect: Dialect, type_name: &str) -> Kind {
        let t = type_name.to_ascii_lowercase();
        match dialect {
            Dialect::Postgres => match t.as_str() {
                "smallint" | "integer" | "bigint" => Kind::Int,
                "real" | "double precision" => Kind::Float,
                "boolean" => Kind::Bool,
                "text" | "character varying" | "character" => Kind::Text,
                "json" | "jsonb" => Kind::Json,
                "bytea" => Kind::Binary,
                "array" => Kind::PgArray,
                _ => Kind::Other,
            },
            Dialect::MySql => match t.as_str() {
                "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => Kind::Int,
                "float" | "double" | "real" => Kind::Float,
                "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => Kind::Text,
                "json" => Kind::Json,
                "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
                    Kind::Binary
                }
                "datetime" | "timestamp" => Kind::Timestamp,
                _ => Kind::Other,
            },
            // SQLite's affinity rules (section 3.1 of "Datatypes In SQLite"), bool first.
            Dialect::Sqlite => {
                if t.contains("bool") {
                    Kind::Bool
                } else if t.contains("int") {
                    Kind::Int
                } else if t.contains("char") || t.contains("clob") || t.contains("text") {
                    Kind::Text
                } else if t.contains("blob") {
                    Kind::Binary
                } else if t.contains("real") || t.contains("floa") || t.contains("doub") {
                    Kind::Float
                } else {
                    Kind::Other
                }
            }
        }
    }
}

/// One bound parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

impl Bound {
    /// The value as the brief of the store says, before any column type is considered:
    /// null → NULL, bool → bool, integers → i64 (above `i64::MAX` → text), floats → f64,
    /// strings (`"NaN"` included) → text, arrays and objects → their JSON text.
    pub fn natural(value: &Value) -> Bound {
        match value {
            Value::Null => Bound::Null,
            Value::Bool(b) => Bound::Bool(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Bound::Int(i)
                } else if n.is_u64() {
                    Bound::Text(n.to_string())
                } else {
                    n.as_f64().map_or(Bound::Text(n.to_string()), Bound::Float)
                }
            }
            Value::String(s) => Bound::Text(s.clone()),
            Value::Array(_) | Value::Object(_) => Bound::Text(value.to_string()),
        }
    }

    /// The value for a column of `kind`. `json_source`: the published column is JSON, so
    /// a string value is a JSON string and is stored as JSON text (`"a"` with quotes).
    pub fn for_column(value: &Value, kind: Kind, json_source: bool) -> Bound {
        if value.is_null() {
            return Bound::Null;
        }
        if kind == Kind::Json || json_source {
            return Bound::Text(value.to_string());
        }
        match (kind, value) {
            (Kind::Text, Value::Number(n)) => Bound::Text(n.to_string()),
            (Kind::Text, Value::Bool(b)) => Bound::Text(b.to_string()),
            (Kind::Binary, Value::String(s)) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_or_else(|_| Bound::Text(s.clone()), Bound::Bytes),
            (Kind::Timestamp, Value::String(s)) => Bound::Text(mysql_datetime(s)),
            (Kind::PgArray, Value::Array(items)) => Bound::Text(pg_array(items)),
            _ => Bound::natural(value),
        }
    }

    pub fn bind<'q>(self, query: Query<'q, Any, AnyArguments>) -> Query<'q, Any, AnyArguments> {
        match self {
            Bound::Null => query.bind(Option::<String>::None),
            Bound::Bool(b) => query.bind(b),
            Bound::Int(i) => query.bind(i),
            Bound::Float(f) => query.bind(f),
            Bound::Text(s) => query.bind(s),
            Bound::Bytes(b) => query.bind(b),
        }
    }
}

impl Bound {
    /// Appends the value as an element of a Postgres array literal (the element's text
    /// is read by its type's input function, as a text parameter cast to it would be).
    pub fn push_pg_element(&self, out: &mut String) {
        match self {
            Bound::Null => out.push_str("NULL"),
            Bound::Bool(b) => out.push(if *b { 't' } else { 'f' }),
            Bound::Int(i) => out.push_str(&i.to_string()),
            Bound::Float(f) => out.push_str(&f.to_string()),
            Bound::Text(s) => quote_element(out, s),
            Bound::Bytes(b) => {
                let mut hex = String::with_capacity(2 + 2 * b.len());
                hex.push_str("\\x");
                for byte in b {
                    hex.push_str(&format!("{byte:02x}"));
                }
                quote_element(out, &hex);
            }
        }
    }
}

/// `2024-01-02T03:04:05.123456+00:00` → `2024-01-02 03:04:05.123456`: MariaDB rejects an
/// offset in a datetime literal. The session time zone is UTC; a value with another
/// offset is passed unchanged (the publisher sends UTC).
fn mysql_datetime(s: &str) -> String {
    let utc = s
        .strip_suffix("+00:00")
        .or_else(|| s.strip_suffix('Z'))
        .or_else(|| s.strip_suffix("+00"));
    match utc {
        Some(local) if local.len() >= 19 && local.as_bytes()[10] == b'T' => {
            local.replacen('T', " ", 1)
        }
        _ => s.to_string(),
    }
}

/// A JSON array as a Postgres array literal: `[1, "a b", null]` → `{1,"a b",NULL}`.
fn pg_array(items: &[Value]) -> String {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) => out.push_str(&pg_array(inner)),
            Value::String(s) => quote_element(&mut out, s),
            Value::Object(_) => quote_element(&mut out, &item.to_string()),
            Value::Bool(b) => out.push_str(if *b { "t" } else { "f" }),
            Value::Number(n) => out.push_str(&n.to_string()),
        }
    }
    out.push('}');
    out
}

fn quote_element(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn natural_binding_follows_the_json_type() {
        assert_eq!(Bound::natural(&json!(null)), Bound::Null);
        assert_eq!(Bound::natural(&json!(-5)), Bound::Int(-5));
        assert_eq!(
            Bound::natural(&json!(u64::MAX)),
            Bound::Text(u64::MAX.to_string())
        );
        assert_eq!(Bound::natural(&json!(1.5)), Bound::Float(1.5));
        assert_eq!(Bound::natural(&json!("NaN")), Bound::Text("NaN".into()));
        assert_eq!(
            Bound::natural(&json!({"a": 1})),
            Bound::Text("{\"a\":1}".into())
        );
    }

    #[test]
    fn column_kind_shapes_the_value() {
        assert_eq!(
            Bound::for_column(&json!(7), Kind::Text, false),
            Bound::Text("7".into())
        );
        assert_eq!(
            Bound::for_column(&json!("a"), Kind::Json, false),
            Bound::Text("\"a\"".into())
        );
        assert_eq!(
            Bound::for_column(&json!("a"), Kind::Text, true),
            Bound::Text("\"a\"".into())
        );
        assert_eq!(
            Bound::for_column(&json!("AP8="), Kind::Binary, false),
            Bound::Bytes(vec![0, 255])
        );
        assert_eq!(
            Bound::for_column(
                &json!("2024-01-02T03:04:05.5+00:00"),
                Kind::Timestamp,
                false
            ),
            Bound::Text("2024-01-02 03:04:05.5".into())
        );
        assert_eq!(
            Bound::for_column(&json!([[1, 2], [null, 3]]), Kind::PgArray, false),
            Bound::Text("{{1,2},{NULL,3}}".into())
        );
        assert_eq!(
            Bound::for_column(&json!(["a\"b", "c d"]), Kind::PgArray, false),
            Bound::Text("{\"a\\\"b\",\"c d\"}".into())
        );
    }

    #[test]
    fn values_become_postgres_array_elements() {
        let mut out = String::new();
        for (i, b) in [
            Bound::Null,
            Bound::Bool(true),
            Bound::Int(-3),
            Bound::Float(1.5),
            Bound::Text("a \"q\" \\ NULL".into()),
            Bound::Bytes(vec![0, 255]),
        ]
        .iter()
        .enumerate()
        {
            if i > 0 {
                out.push(',');
            }
            b.push_pg_element(&mut out);
        }
        assert_eq!(out, r#"NULL,t,-3,1.5,"a \"q\" \\ NULL","\\x00ff""#);
    }

    #[test]
    fn catalog_types_map_to_kinds() {
        assert_eq!(
            Kind::of(Dialect::Postgres, "timestamp with time zone"),
            Kind::Other
        );
        assert_eq!(Kind::of(Dialect::Postgres, "ARRAY"), Kind::PgArray);
        assert_eq!(Kind::of(Dialect::MySql, "longtext"), Kind::Text);
        assert_eq!(Kind::of(Dialect::Sqlite, "BIGINT"), Kind::Int);
        assert_eq!(Kind::of(Dialect::Sqlite, "BOOLEAN"), Kind::Bool);
        assert_eq!(Kind::of(Dialect::Sqlite, "DOUBLE PRECISION"), Kind::Float);
    }
}
