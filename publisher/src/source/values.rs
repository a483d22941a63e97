//! Postgres text values (as pgoutput sends them) to JSON.
//!
//! The replication session pins `DateStyle=ISO`, `TimeZone=UTC`,
//! `IntervalStyle=iso_8601` and `extra_float_digits=3`, so text forms are stable.
//! Mapping: integers → numbers; `numeric`/`money` → strings (no precision lost);
//! floats → numbers (`NaN`/`Infinity` → strings); `bool` → true/false; `json`/`jsonb` →
//! the JSON value itself; `bytea` → base64; `timestamptz` → RFC 3339 with offset;
//! `timestamp` → ISO 8601 without offset; `date`, `time` → ISO strings; arrays →
//! JSON arrays of their element mapping; enums and everything else → strings.

use base64::Engine;
use serde_json::{Number, Value};

/// How a column's text is converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conv {
    Bool,
    Int,
    Float,
    Json,
    Bytea,
    Timestamp,
    Timestamptz,
    Text,
    Array(Box<Conv>),
}

impl Conv {
    /// Conversion for a type from its catalog name, category and array element.
    pub fn for_type(name: &str, category: u8, element: Option<Conv>) -> Conv {
        if let Some(elem) = element {
            if category == b'A' {
                return Conv::Array(Box::new(elem));
            }
        }
        match name {
            "bool" => Conv::Bool,
            "int2" | "int4" | "int8" | "oid" | "xid" => Conv::Int,
            "float4" | "float8" => Conv::Float,
            "json" | "jsonb" => Conv::Json,
            "bytea" => Conv::Bytea,
            "timestamp" => Conv::Timestamp,
            "timestamptz" => Conv::Timestamptz,
            _ => Conv::Text,
        }
    }

    /// Converts one non-null text value. Never fails: text that does not parse as its
    /// type is passed through as a string (it cannot happen with a sane server, and
    /// losing the value would be worse).
    pub fn convert(&self, text: &[u8]) -> Value {
        let s = String::from_utf8_lossy(text);
        match self {
            Conv::Bool => match &*s {
                "t" => Value::Bool(true),
                "f" => Value::Bool(false),
                _ => Value::String(s.into_owned()),
            },
            Conv::Int => s
                .parse::<i64>()
                .map(|i| Value::Number(i.into()))
                .or_else(|_| s.parse::<u64>().map(|u| Value::Number(u.into())))
                .unwrap_or_else(|_| Value::String(s.into_owned())),
            Conv::Float => s
                .parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(s.into_owned())),
            Conv::Json => {
                serde_json::from_str(&s).unwrap_or_else(|_| Value::String(s.into_owned()))
            }
            Conv::Bytea => match s.strip_prefix("\\x").map(decode_hex) {
                Some(Some(bytes)) => {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
                _ => Value::String(s.into_owned()),
            },
            Conv::Timestamp => Value::String(iso_timestamp(&s, false)),
            Conv::Timestamptz => Value::String(iso_timestamp(&s, true)),
            Conv::Text => Value::String(s.into_owned()),
            Conv::Array(elem) => match parse_array(&s) {
                Some(parsed) => array_to_json(&parsed, elem),
                None => Value::String(s.into_owned()),
            },
        }
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `2024-01-02 03:04:05.123456+00` → `2024-01-02T03:04:05.123456+00:00`.
fn iso_timestamp(s: &str, with_zone: bool) -> String {
    if s == "infinity" || s == "-infinity" {
        return s.to_string();
    }
    let mut out = s.replacen(' ', "T", 1);
    if with_zone {
        // The offset is `+HH`, `+HH:MM` or `+HH:MM:SS`; RFC 3339 needs `+HH:MM`.
        if let Some(pos) = out.rfind(['+', '-']) {
            if pos > 10 {
                let offset = out[pos + 1..].to_string();
                if offset.len() == 2 {
                    out.push_str(":00");
                }
            }
        }
    }
    out
}

/// A parsed array literal: nested arrays, NULLs and element texts.
#[derive(Debug, PartialEq)]
enum ArrayItem {
    Null,
    Text(String),
    Nested(Vec<ArrayItem>),
}

/// Parses Postgres array output like `{1,NULL,"a b","x\"y"}` or `{{1,2},{3,4}}`.
/// Returns `None` for anything malformed (including `[1:2]={...}` bound decorations,
/// which are then passed through as a string).
fn parse_array(s: &str) -> Option<Vec<ArrayItem>> {
    let bytes = s.as_bytes();
    let mut pos = 0;
    let items = parse_level(bytes, &mut pos)?;
    (pos == bytes.len()).then_some(items)
}

fn parse_level(b: &[u8], pos: &mut usize) -> Option<Vec<ArrayItem>> {
    if b.get(*pos) != Some(&b'{') {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Some(items);
    }
    loop {
        match b.get(*pos)? {
            b'{' => items.push(ArrayItem::Nested(parse_level(b, pos)?)),
            b'"' => {
                *pos += 1;
                let mut buf = Vec::new();
                loop {
                    match *b.get(*pos)? {
                        b'\\' => {
                            buf.push(*b.get(*pos + 1)?);
                            *pos += 2;
                        }
                        b'"' => {
                            *pos += 1;
                            break;
                        }
                        c => {
                            buf.push(c);
                            *pos += 1;
                        }
                    }
                }
                items.push(ArrayItem::Text(String::from_utf8(buf).ok()?));
            }
            _ => {
                let start = *pos;
                while !matches!(b.get(*pos)?, b',' | b'}') {
                    *pos += 1;
                }
                let raw = std::str::from_utf8(&b[start..*pos]).ok()?;
                items.push(if raw == "NULL" {
                    ArrayItem::Null
                } else {
                    ArrayItem::Text(raw.to_string())
                });
            }
        }
        match b.get(*pos)? {
            b',' => *pos += 1,
            b'}' => {
                *pos += 1;
                return Some(items);
            }
            _ => return None,
        }
    }
}

fn array_to_json(items: &[ArrayItem], elem: &Conv) -> Value {
    Value::Array(
        items
            .iter()
            .map(|item| match item {
                ArrayItem::Null => Value::Null,
                ArrayItem::Text(t) => elem.convert(t.as_bytes()),
                ArrayItem::Nested(inner) => array_to_json(inner, elem),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converts_scalars_faithfully() {
        assert_eq!(Conv::Int.convert(b"-9223372036854775808"), json!(i64::MIN));
        assert_eq!(
            Conv::Text.convert(b"12345678901234567890.000001"),
            json!("12345678901234567890.000001")
        );
        assert_eq!(Conv::Float.convert(b"NaN"), json!("NaN"));
        assert_eq!(Conv::Float.convert(b"1.5"), json!(1.5));
        assert_eq!(Conv::Bool.convert(b"t"), json!(true));
        assert_eq!(Conv::Bytea.convert(b"\\x00ff"), json!("AP8="));
        assert_eq!(
            Conv::Json.convert(br#"{"a": [1, 2]}"#),
            json!({"a": [1, 2]})
        );
        assert_eq!(
            Conv::Timestamptz.convert(b"2024-01-02 03:04:05.123456+00"),
            json!("2024-01-02T03:04:05.123456+00:00")
        );
        assert_eq!(
            Conv::Timestamp.convert(b"2024-01-02 03:04:05"),
            json!("2024-01-02T03:04:05")
        );
    }

    #[test]
    fn converts_arrays_with_nulls_quotes_and_nesting() {
        let ints = Conv::Array(Box::new(Conv::Int));
        assert_eq!(
            ints.convert(b"{{1,2},{3,NULL}}"),
            json!([[1, 2], [3, null]])
        );
        let texts = Conv::Array(Box::new(Conv::Text));
        assert_eq!(
            texts.convert(br#"{"a b","x\"y",NULL,"NULL",plain}"#),
            json!(["a b", "x\"y", null, "NULL", "plain"])
        );
        assert_eq!(texts.convert(b"{}"), json!([]));
        assert_eq!(texts.convert(b"{unterminated"), json!("{unterminated"));
    }
}
