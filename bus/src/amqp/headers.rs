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

/// Why a dead letter is in the dead-letter queue: the reason Kausal recorded
/// (`x-kausal-reason`), or else the one RabbitMQ recorded when it dead-lettered the
/// message itself (`x-death`: a message TTL expired, a queue length limit, a quorum
/// queue's delivery limit).
pub(super) fn dead_letter_reason(headers: Option<&FieldTable>) -> Option<String> {
    if let Some(reason) = header_text(headers, super::REASON_HEADER) {
        return Some(reason);
    }
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(death) = deaths.as_slice().first()? else {
        return None;
    };
    let text = |name: &str| match death.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    };
    let reason = text("reason")?;
    let queue = text("queue").unwrap_or_else(|| "?".into());
    let why = match reason.as_str() {
        "expired" => "its message TTL expired",
        "maxlen" => "the queue's length limit was reached",
        "delivery_limit" => "it was delivered more often than the quorum queue's delivery limit",
        "rejected" => "a consumer rejected it",
        _ => "",
    };
    Some(if why.is_empty() {
        format!("dead-lettered by RabbitMQ from {queue}: {reason}")
    } else {
        format!("dead-lettered by RabbitMQ from {queue}: {reason} ({why})")
    })
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
