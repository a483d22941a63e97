//! The message headers Kausal sets and reads: signatures, operator commands, retries
//! and dead-letter reasons.

use lapin::types::{AMQPValue, FieldTable};

/// The headers of a signed message.
pub fn signature_headers(key_id: &str, signature: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    add_signature(
        &mut headers,
        Some(&(key_id.to_string(), signature.to_string())),
    );
    headers
}

pub(super) fn add_signature(headers: &mut FieldTable, signature: Option<&(String, String)>) {
    if let Some((key, sig)) = signature {
        headers.insert(
            crate::signing::KEY_HEADER.into(),
            AMQPValue::LongString(key.as_str().into()),
        );
        headers.insert(
            crate::signing::SIG_HEADER.into(),
            AMQPValue::LongString(sig.as_str().into()),
        );
    }
}

/// The signature headers of a message, if it has both.
pub(super) fn read_signature(headers: Option<&FieldTable>) -> Option<(String, String)> {
    Some((
        header_text(headers, crate::signing::KEY_HEADER)?,
        header_text(headers, crate::signing::SIG_HEADER)?,
    ))
}

/// Header naming an operator's command (`release`); the body is the command's JSON.
pub const CONTROL_HEADER: &str = "x-kausal-control";
/// Header of a message an operator sent back from the dead-letter queue.
pub const RETRY_HEADER: &str = "x-kausal-retry";
/// Header holding why Kausal dead-lettered a message.
pub const REASON_HEADER: &str = "x-kausal-reason";
/// Header of a dead letter that is a whole signed message of which only these
/// transactions (`ns/gen/seq`, comma-separated) were dead-lettered.
pub const ONLY_HEADER: &str = "x-kausal-only";

pub(super) fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The headers that travel with a delivery when it is moved or retried.
pub(super) fn kausal_headers(
    control: Option<&str>,
    retried: bool,
    signature: Option<&(String, String)>,
) -> FieldTable {
    let mut headers = FieldTable::default();
    add_signature(&mut headers, signature);
    if let Some(c) = control {
        headers.insert(CONTROL_HEADER.into(), AMQPValue::LongString(c.into()));
    }
    if retried {
        headers.insert(RETRY_HEADER.into(), AMQPValue::LongString("1".into()));
    }
    headers
}
