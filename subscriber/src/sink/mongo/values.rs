//! Values as the MongoDB sink stores them: versions as comparable text, JSON as BSON.

use mongodb::bson::{Bson, Document};
use serde_json::Value;

/// A version as stored: comparable as a string. The view of one part of a split
/// transaction applied part by part gets its part index as a suffix, so that a later
/// part writes over an earlier one of the same transaction while a retried earlier part
/// does not: `g:s` < `g:s:0` < `g:s:1` < `g:s+1`.
pub fn version_text(generation: u64, seq: u64, part: Option<u32>) -> String {
    match part {
        None => format!("{generation:020}:{seq:020}"),
        Some(part) => format!("{generation:020}:{seq:020}:{part:010}"),
    }
}

/// A JSON value as BSON: integers as Int64 (beyond it, as text: exact), other numbers as
/// doubles, objects as embedded documents.
pub fn to_bson(value: &Value) -> Bson {
    match value {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Bson::Int64(i),
            (None, Some(_)) if n.is_u64() => Bson::String(n.to_string()),
            (None, Some(f)) => Bson::Double(f),
            (None, None) => Bson::String(n.to_string()),
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(a) => Bson::Array(a.iter().map(to_bson).collect()),
        Value::Object(o) => Bson::Document(
            o.iter()
                .map(|(k, v)| (k.clone(), to_bson(v)))
                .collect::<Document>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::MongoSink;
    use super::*;
    use mongodb::bson::doc;
    use serde_json::json;

    #[test]
    fn version_texts_compare_like_versions() {
        assert!(version_text(1, 9, None) < version_text(1, 10, None));
        assert!(version_text(1, u64::MAX, None) < version_text(2, 1, None));
        assert_eq!(version_text(3, 4, None), version_text(3, 4, None));
    }

    #[test]
    fn part_versions_order_within_their_transaction_and_before_the_next() {
        let whole = version_text(1, 9, None);
        let (first, second) = (version_text(1, 9, Some(0)), version_text(1, 9, Some(1)));
        assert!(whole < first && first < second);
        assert!(second < version_text(1, 10, None));
        assert!(version_text(1, 9, Some(9)) < version_text(1, 9, Some(10)));
    }

    #[test]
    fn json_values_become_bson_without_losing_integers() {
        assert_eq!(to_bson(&json!(-5)), Bson::Int64(-5));
        assert_eq!(
            to_bson(&json!(18446744073709551615u64)),
            Bson::String("18446744073709551615".into())
        );
        assert_eq!(to_bson(&json!(1.5)), Bson::Double(1.5));
        assert_eq!(
            to_bson(&json!({"a": [1, "x", null]})),
            Bson::Document(doc! {"a": [1_i64, "x", Bson::Null]})
        );
    }

    #[test]
    fn composite_keys_become_a_sub_document_in_key_order() {
        let key = json!({"b": 2, "a": "x"});
        let key = key.as_object().unwrap();
        let cols = vec!["b".to_string(), "a".to_string()];
        assert_eq!(
            MongoSink::id(&cols, key),
            Bson::Document(doc! {"b": 2_i64, "a": "x"})
        );
        assert_eq!(MongoSink::id(&cols[..1], key), Bson::Int64(2));
    }
}
