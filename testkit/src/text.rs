//! JSON values as the text Postgres's output functions print (what pgoutput sends), so
//! the publisher's converter turns them back into exactly the envelope's JSON.

use base64::Engine;
use kausal_publisher::source::values::Conv;
use serde_json::Value;

/// The text of `value` for a column converted by `conv`; `None` for NULL.
pub fn text_of(conv: &Conv, value: &Value) -> Result<Option<String>, String> {
    Ok(Some(match (conv, value) {
        (_, Value::Null) => return Ok(None),
        (Conv::Json, v) => v.to_string(),
        (Conv::Bool, Value::Bool(b)) => if *b { "t" } else { "f" }.to_string(),
        (Conv::Bytea, Value::String(s)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| format!("binary values are base64 in envelopes: {e}"))?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("\\x{hex}")
        }
        (Conv::Array(elem), Value::Array(items)) => array_literal(elem, items)?,
        (Conv::Array(_), other) => return Err(format!("expected an array, got {other}")),
        (_, Value::String(s)) => s.clone(),
        (_, Value::Number(n)) => n.to_string(),
        (_, Value::Bool(b)) => b.to_string(),
        (_, other) => return Err(format!("cannot store {other} in a non-JSON column")),
    }))
}

/// `[1, null, "a b"]` → `{"1",NULL,"a b"}` (every element quoted: always valid input).
fn array_literal(elem: &Conv, items: &[Value]) -> Result<String, String> {
    let mut parts = Vec::with_capacity(items.len());
    for item in items {
        parts.push(match item {
            Value::Null => "NULL".to_string(),
            Value::Array(nested) => array_literal(elem, nested)?,
            other => {
                let text = text_of(elem, other)?.unwrap_or_default();
                format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
            }
        });
    }
    Ok(format!("{{{}}}", parts.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Whatever the kit prints, the publisher's converter reads back as the same JSON.
    #[test]
    fn values_survive_the_publishers_conversion() {
        let int_array = Conv::Array(Box::new(Conv::Int));
        let text_array = Conv::Array(Box::new(Conv::Text));
        let cases = [
            (Conv::Int, json!(-42)),
            (Conv::Float, json!(1.5)),
            (Conv::Bool, json!(true)),
            (Conv::Text, json!("héllo \"quoted\"")),
            (Conv::Json, json!({"a": [1, "x"]})),
            (Conv::Json, json!("a JSON string")),
            (Conv::Bytea, json!("AAEC/w==")),
            (Conv::Timestamptz, json!("2024-01-02T03:04:05.123456+00:00")),
            (int_array, json!([1, null, 3])),
            (text_array, json!(["a b", "c\"d", "e\\f"])),
        ];
        for (conv, value) in cases {
            let text = text_of(&conv, &value).unwrap().unwrap();
            assert_eq!(conv.convert(text.as_bytes()), value, "{conv:?} {text}");
        }
        assert_eq!(text_of(&Conv::Int, &Value::Null).unwrap(), None);
        assert!(text_of(&Conv::Text, &json!({"no": 1})).is_err());
    }
}
