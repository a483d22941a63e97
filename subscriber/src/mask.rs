//! Masking: per-column rules applied to every value before anything is written locally
//! (store, sinks, callbacks), for a laptop or a team that must not hold the raw data.
//!
//! - `keep`: the value as published (the default).
//! - `hash`: HMAC-SHA256 of the value's text under a secret salt, as 64 hex digits. Equal
//!   values give equal hashes, so joins and lookups by a hashed column still work; without
//!   the salt nobody can test guesses (an email address is easy to guess, its salted hash
//!   is not). The column is stored as text.
//! - `redact`: NULL. Not allowed on a key column (every row would have the same key).

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

/// What happens to one column's values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mask {
    #[default]
    Keep,
    Hash,
    Redact,
}

/// Shortest salt accepted: a short one can be brute-forced together with the values.
pub const MIN_SALT_LEN: usize = 16;

/// Applies `mask` to `value`; `salt` is the secret of `hash`.
pub fn apply(mask: Mask, value: &Value, salt: &[u8]) -> Value {
    match (mask, value) {
        (Mask::Keep, v) => v.clone(),
        (_, Value::Null) | (Mask::Redact, _) => Value::Null,
        (Mask::Hash, Value::String(s)) => Value::String(hash(salt, s.as_bytes())),
        (Mask::Hash, other) => Value::String(hash(salt, other.to_string().as_bytes())),
    }
}

fn hash(salt: &[u8], text: &[u8]) -> String {
    // HMAC accepts keys of any length: this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(salt) else {
        return String::new();
    };
    mac.update(text);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SALT: &[u8] = b"a secret of sixteen+ bytes";

    #[test]
    fn hashing_is_keyed_deterministic_and_text_shaped() {
        let a = apply(Mask::Hash, &json!("ada@example.com"), SALT);
        assert_eq!(a, apply(Mask::Hash, &json!("ada@example.com"), SALT));
        assert_ne!(
            a,
            apply(
                Mask::Hash,
                &json!("ada@example.com"),
                b"another secret salt"
            )
        );
        assert_ne!(a, apply(Mask::Hash, &json!("bob@example.com"), SALT));
        let text = a.as_str().expect("a string");
        assert_eq!(text.len(), 64);
        assert!(!text.contains("ada"));
        // Numbers hash their JSON text; NULL stays NULL.
        assert_eq!(
            apply(Mask::Hash, &json!(42), SALT),
            apply(Mask::Hash, &json!("42"), SALT)
        );
        assert_eq!(apply(Mask::Hash, &Value::Null, SALT), Value::Null);
    }

    #[test]
    fn redact_gives_null_and_keep_the_value() {
        assert_eq!(apply(Mask::Redact, &json!("secret"), SALT), Value::Null);
        assert_eq!(apply(Mask::Keep, &json!({"a": 1}), SALT), json!({"a": 1}));
    }
}
