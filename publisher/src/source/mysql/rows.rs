//! Binlog rows in the shared row-change vocabulary: a table-map event (with
//! `binlog_row_metadata = FULL`: names, signedness, charsets, enum and set labels, primary
//! key) becomes a [`TableRt`], and each binlog value becomes the text Postgres would send
//! for the equivalent type, converted by the same [`Conv`]. That is what makes a MySQL
//! envelope indistinguishable from a Postgres one for the same logical row.
//!
//! | MySQL | published type | JSON |
//! |---|---|---|
//! | boolean (`tinyint(1)`) | bool | true / false |
//! | tinyint, smallint, tinyint unsigned, year | int2 | number |
//! | mediumint (unsigned), int, smallint unsigned | int4 | number |
//! | bigint, int unsigned | int8 | number |
//! | bigint unsigned | numeric | number (exact up to 2^64-1) |
//! | decimal | numeric | string |
//! | float, double | float4, float8 | number |
//! | char, varchar, text, enum, set | text | string (set: `a,b`) |
//! | binary, varbinary, blob, geometry | bytea | base64 string |
//! | date | date | `YYYY-MM-DD` |
//! | datetime | timestamp | ISO 8601 without offset |
//! | timestamp | timestamptz | RFC 3339 in UTC (`+00:00`) |
//! | time | time | `[-]HH:MM:SS[.ffffff]`, hours up to 838 |
//! | bit(n) | bit | string of n `0`/`1` |
//! | json | json | the JSON value |

use crate::source::assemble::{schema_of, ColumnRt, TableRt};
use crate::source::values::Conv;
use mysql_async::binlog::events::{OptionalMetaExtractor, OptionalMetadataField, TableMapEvent};
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_async::Value;
use std::fmt::Write;

/// The binary pseudo-charset: the column holds bytes, not text.
const BINARY_CHARSET: u16 = 63;
/// latin1 collations (MySQL's latin1 is cp1252; decoded as ISO-8859-1, which differs
/// only in 0x80–0x9F).
const LATIN1: [u16; 8] = [5, 8, 15, 31, 47, 48, 49, 94];

/// How one binlog column is turned into text.
#[derive(Debug, Clone)]
pub struct MyColumn {
    pub name: String,
    pub ty: ColumnType,
    pub unsigned: bool,
    pub charset: u16,
    /// Labels of an ENUM or SET column.
    pub labels: Vec<String>,
    /// Width of a BIT column.
    pub bits: usize,
    pub type_name: &'static str,
    pub conv: Conv,
}

/// Columns of a table as one table-map event describes them.
#[derive(Debug, Clone)]
pub struct MyTable {
    pub database: String,
    pub table: String,
    pub columns: Vec<MyColumn>,
    /// Primary key column indices from the event (empty if the server sent none).
    pub key: Vec<usize>,
}

fn published_type(ty: ColumnType, unsigned: bool, charset: u16) -> (&'static str, Conv) {
    use ColumnType::*;
    match ty {
        MYSQL_TYPE_TINY | MYSQL_TYPE_YEAR => ("int2", Conv::Int),
        MYSQL_TYPE_SHORT if !unsigned => ("int2", Conv::Int),
        MYSQL_TYPE_SHORT | MYSQL_TYPE_INT24 => ("int4", Conv::Int),
        MYSQL_TYPE_LONG if !unsigned => ("int4", Conv::Int),
        MYSQL_TYPE_LONG => ("int8", Conv::Int),
        MYSQL_TYPE_LONGLONG if !unsigned => ("int8", Conv::Int),
        MYSQL_TYPE_LONGLONG => ("numeric", Conv::Int),
        MYSQL_TYPE_DECIMAL | MYSQL_TYPE_NEWDECIMAL => ("numeric", Conv::Text),
        MYSQL_TYPE_FLOAT => ("float4", Conv::Float),
        MYSQL_TYPE_DOUBLE => ("float8", Conv::Float),
        MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE => ("date", Conv::Text),
        MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2 => ("timestamp", Conv::Timestamp),
        MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2 => ("timestamptz", Conv::Timestamptz),
        MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2 => ("time", Conv::Text),
        MYSQL_TYPE_BIT => ("bit", Conv::Text),
        MYSQL_TYPE_JSON => ("json", Conv::Json),
        MYSQL_TYPE_GEOMETRY => ("bytea", Conv::Bytea),
        MYSQL_TYPE_ENUM | MYSQL_TYPE_SET => ("text", Conv::Text),
        _ if charset == BINARY_CHARSET => ("bytea", Conv::Bytea),
        _ => ("text", Conv::Text),
    }
}

impl MyTable {
    /// Reads a table-map event. Errors name what is missing or malformed.
    pub fn from_event(tme: &TableMapEvent<'_>) -> Result<MyTable, String> {
        let n = tme.columns_count() as usize;
        let meta = OptionalMetaExtractor::new(tme.iter_optional_meta())
            .map_err(|e| format!("malformed optional metadata: {e}"))?;
        let mut signed = meta.iter_signedness();
        let mut charsets = meta.iter_charset();
        let mut enum_set_charsets = meta.iter_enum_and_set_charset();
        let mut names = meta.iter_column_name();
        let mut enum_labels = Vec::new();
        let mut set_labels = Vec::new();
        for field in tme.iter_optional_meta() {
            match field.map_err(|e| format!("malformed optional metadata: {e}"))? {
                OptionalMetadataField::EnumStrValue(values) => {
                    for column in values.iter_values() {
                        let column = column.map_err(|e| format!("malformed enum labels: {e}"))?;
                        enum_labels.push(
                            column
                                .values()
                                .iter()
                                .map(|v| v.value().into_owned())
                                .collect::<Vec<_>>(),
                        );
                    }
                }
                OptionalMetadataField::SetStrValue(values) => {
                    for column in values.iter_values() {
                        let column = column.map_err(|e| format!("malformed set labels: {e}"))?;
                        set_labels.push(
                            column
                                .values()
                                .iter()
                                .map(|v| v.value().into_owned())
                                .collect::<Vec<_>>(),
                        );
                    }
                }
                _ => {}
            }
        }
        let (mut enums, mut sets) = (enum_labels.into_iter(), set_labels.into_iter());
        let mut columns = Vec::with_capacity(n);
        for i in 0..n {
            let ty = tme
                .get_column_type(i)
                .map_err(|e| format!("column {i}: {e}"))?
                .ok_or_else(|| format!("column {i} has no type"))?;
            let unsigned = ty.is_numeric_type() && signed.next().unwrap_or(false);
            let charset = if ty.is_character_type() {
                charsets.next().transpose().map_err(|e| e.to_string())?
            } else if ty.is_enum_or_set_type() {
                enum_set_charsets
                    .next()
                    .transpose()
                    .map_err(|e| e.to_string())?
            } else {
                None
            }
            .unwrap_or_default();
            let name = names
                .next()
                .transpose()
                .map_err(|e| e.to_string())?
                .map(|c| c.name().into_owned())
                .ok_or_else(|| {
                    "the table-map event carries no column names: set \
                     binlog_row_metadata = FULL"
                        .to_string()
                })?;
            let labels = match ty {
                ColumnType::MYSQL_TYPE_ENUM => enums.next().unwrap_or_default(),
                ColumnType::MYSQL_TYPE_SET => sets.next().unwrap_or_default(),
                _ => Vec::new(),
            };
            let bits = match (ty, tme.get_column_metadata(i)) {
                (ColumnType::MYSQL_TYPE_BIT, Some([b0, b1, ..])) => *b1 as usize * 8 + *b0 as usize,
                _ => 0,
            };
            let (type_name, conv) = published_type(ty, unsigned, charset);
            columns.push(MyColumn {
                name,
                ty,
                unsigned,
                charset,
                labels,
                bits,
                type_name,
                conv,
            });
        }
        let key = meta
            .iter_primary_key()
            .filter_map(|k| k.ok())
            .map(|k| k as usize)
            .filter(|&k| k < n)
            .collect();
        Ok(MyTable {
            database: tme.database_name().into_owned(),
            table: tme.table_name().into_owned(),
            columns,
            key,
        })
    }

    /// The table as a result set describes it (`SELECT * … LIMIT 0`): for a TRUNCATE,
    /// which has no table-map event. Types map to the same published types as the
    /// binlog's (`VAR_STRING` ~ `VARCHAR`, `DATETIME` ~ `DATETIME2`, …), so the schema
    /// fingerprint agrees.
    pub fn from_columns(database: &str, table: &str, columns: &[mysql_async::Column]) -> MyTable {
        let columns = columns
            .iter()
            .map(|c| {
                let ty = c.column_type();
                let unsigned = c
                    .flags()
                    .contains(mysql_async::consts::ColumnFlags::UNSIGNED_FLAG);
                let charset = c.character_set();
                let (type_name, conv) = published_type(ty, unsigned, charset);
                MyColumn {
                    name: c.name_str().into_owned(),
                    ty,
                    unsigned,
                    charset,
                    labels: Vec::new(),
                    bits: 0,
                    type_name,
                    conv,
                }
            })
            .collect();
        MyTable {
            database: database.to_string(),
            table: table.to_string(),
            columns,
            key: Vec::new(),
        }
    }

    /// Publishes text columns named in `json` as JSON values (MariaDB's JSON alias),
    /// and signed TINYINT columns named in `bools` (`BOOLEAN`, i.e. `tinyint(1)`) as
    /// booleans: 0 is false, anything else true.
    pub fn mark_catalog_types(&mut self, json: &[String], bools: &[String]) {
        for c in &mut self.columns {
            if c.type_name == "text" && c.labels.is_empty() && json.contains(&c.name) {
                c.type_name = "json";
                c.conv = Conv::Json;
            }
            if c.ty == ColumnType::MYSQL_TYPE_TINY && !c.unsigned && bools.contains(&c.name) {
                c.type_name = "bool";
                c.conv = Conv::Bool;
            }
        }
    }

    /// The column index of a name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// Builds the runtime table for the assembler. `publish` decides, per source column
/// name, its published name (`None`: not published); `key` are the key column indices
/// and `refs` the resolved references.
pub fn table_rt(
    t: &MyTable,
    published: String,
    publish: impl Fn(&str) -> Option<String>,
    key: Vec<usize>,
    refs: Vec<(Vec<usize>, String)>,
) -> TableRt {
    let mut columns = Vec::with_capacity(t.columns.len());
    let mut described = Vec::with_capacity(t.columns.len());
    for c in &t.columns {
        let out = publish(&c.name);
        described.push((
            out.clone().unwrap_or_default(),
            c.type_name.to_string(),
            out.is_some(),
        ));
        columns.push(ColumnRt {
            out,
            conv: c.conv.clone(),
        });
    }
    let key_names: Vec<String> = key
        .iter()
        .filter_map(|&i| columns.get(i).and_then(|c: &ColumnRt| c.out.clone()))
        .collect();
    let (schema, fingerprint) = schema_of(&published, &described, &key_names);
    TableRt {
        published,
        columns,
        key,
        refs,
        schema,
        fingerprint,
    }
}

impl MyColumn {
    /// The text form of one value (`None` for NULL), as Postgres would print the
    /// equivalent type; [`Conv`] then makes the JSON value.
    pub fn text(&self, value: BinlogValue<'_>) -> Result<Option<Vec<u8>>, String> {
        let v = match value {
            BinlogValue::Value(v) => v,
            BinlogValue::Jsonb(j) => {
                let json = serde_json::Value::try_from(j)
                    .map_err(|e| format!("column {}: invalid JSON: {e}", self.name))?;
                return Ok(Some(json.to_string().into_bytes()));
            }
            BinlogValue::JsonDiff(_) => {
                return Err(format!(
                    "column {} arrived as a partial JSON update: set \
                     binlog_row_value_options = ''",
                    self.name
                ))
            }
        };
        use ColumnType::*;
        let text = match (self.ty, v) {
            (_, Value::NULL) => return Ok(None),
            // TIMESTAMP: seconds since the epoch (old format as an integer, TIMESTAMP2 as
            // "sec[.usec]"), always UTC in the binlog whatever the server's time zone.
            (MYSQL_TYPE_TIMESTAMP, Value::Int(secs)) => utc_timestamp(secs, 0),
            (MYSQL_TYPE_TIMESTAMP2, Value::Bytes(b)) => {
                let s = String::from_utf8_lossy(&b);
                let (secs, frac) = s.split_once('.').unwrap_or((&s, "0"));
                let secs = secs.parse::<i64>().map_err(|_| bad(&self.name, &s))?;
                let micros = format!("{frac:0<6}")[..6]
                    .parse::<u32>()
                    .map_err(|_| bad(&self.name, &s))?;
                utc_timestamp(secs, micros)
            }
            (MYSQL_TYPE_YEAR, Value::Bytes(b)) => {
                // mysql_common adds 1900 to the stored byte; a stored 0 is year 0000.
                let s = String::from_utf8_lossy(&b).into_owned();
                if s == "1900" {
                    "0".into()
                } else {
                    s
                }
            }
            (MYSQL_TYPE_TINY, Value::Int(i)) if self.type_name == "bool" => {
                if i == 0 { "f" } else { "t" }.to_string()
            }
            // mysql_common 0.37 does not sign-extend a signed MEDIUMINT's 24 bits
            // (-8388608 arrives as 8388608): extend it here.
            (MYSQL_TYPE_INT24, Value::Int(i)) if !self.unsigned => {
                (((i as i32) << 8) >> 8).to_string()
            }
            (MYSQL_TYPE_ENUM, Value::Int(i)) => match usize::try_from(i) {
                // 0 is the empty string MySQL stores for an invalid value.
                Ok(0) => String::new(),
                Ok(i) => self
                    .labels
                    .get(i - 1)
                    .cloned()
                    .ok_or_else(|| bad(&self.name, &i.to_string()))?,
                Err(_) => return Err(bad(&self.name, &i.to_string())),
            },
            (MYSQL_TYPE_SET, Value::Bytes(mask)) => {
                let mut out = Vec::new();
                for (i, label) in self.labels.iter().enumerate() {
                    if mask.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0) {
                        out.push(label.as_str());
                    }
                }
                out.join(",")
            }
            (MYSQL_TYPE_BIT, Value::Bytes(b)) => {
                let all: String = b.iter().map(|byte| format!("{byte:08b}")).collect();
                let width = if self.bits == 0 { all.len() } else { self.bits };
                all[all.len().saturating_sub(width)..].to_string()
            }
            (MYSQL_TYPE_GEOMETRY, Value::Bytes(b)) => hex(&b),
            (
                MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING | MYSQL_TYPE_STRING | MYSQL_TYPE_BLOB,
                Value::Bytes(b),
            ) => {
                if self.charset == BINARY_CHARSET {
                    hex(&b)
                } else if LATIN1.contains(&self.charset) {
                    b.iter().map(|&c| char::from(c)).collect()
                } else {
                    return Ok(Some(b));
                }
            }
            (_, Value::Bytes(b)) => return Ok(Some(b)),
            (_, Value::Int(i)) => i.to_string(),
            (_, Value::UInt(u)) => u.to_string(),
            (_, Value::Float(f)) => float_text(f64::from(f), f.to_string()),
            (_, Value::Double(d)) => float_text(d, d.to_string()),
            (MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE, Value::Date(y, m, d, ..)) => {
                format!("{y:04}-{m:02}-{d:02}")
            }
            (_, Value::Date(y, mo, d, h, mi, s, us)) => {
                let mut t = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}");
                push_fraction(&mut t, us);
                t
            }
            (_, Value::Time(negative, days, h, m, s, us)) => {
                let hours = u64::from(days) * 24 + u64::from(h);
                let mut t = format!(
                    "{}{hours:02}:{m:02}:{s:02}",
                    if negative { "-" } else { "" }
                );
                push_fraction(&mut t, us);
                t
            }
        };
        Ok(Some(text.into_bytes()))
    }
}

fn bad(column: &str, value: &str) -> String {
    format!("column {column}: unexpected binlog value {value:?}")
}

/// Postgres prints infinities and NaN by name; MySQL has none, but be total.
fn float_text(v: f64, shortest: String) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        shortest
    }
}

/// Postgres's text form of bytea.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("\\x");
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Fractional seconds as Postgres prints them: trailing zeros dropped, none at all for
/// whole seconds.
fn push_fraction(out: &mut String, micros: u32) {
    if micros > 0 {
        let f = format!("{micros:06}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]+00` for seconds since the Unix epoch.
fn utc_timestamp(secs: i64, micros: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut t = format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    push_fraction(&mut t, micros);
    t.push_str("+00");
    t
}

/// Gregorian date of a day count since 1970-01-01 (the well-known era-based algorithm,
/// H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_seconds_become_utc_civil_times() {
        assert_eq!(utc_timestamp(0, 0), "1970-01-01 00:00:00+00");
        assert_eq!(
            utc_timestamp(1_709_210_096, 123_456),
            "2024-02-29 12:34:56.123456+00"
        );
        assert_eq!(
            utc_timestamp(2_147_483_647, 500_000),
            "2038-01-19 03:14:07.5+00"
        );
        assert_eq!(utc_timestamp(-86_400, 0), "1969-12-31 00:00:00+00");
    }

    #[test]
    fn fractions_print_like_postgres() {
        let mut s = String::new();
        push_fraction(&mut s, 120_000);
        assert_eq!(s, ".12");
        let mut s = String::new();
        push_fraction(&mut s, 0);
        assert_eq!(s, "");
        assert_eq!(hex(&[0, 0xff, 0x10]), "\\x00ff10");
    }
}
