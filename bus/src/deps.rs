//! Hashing of dependency keys.
//!
//! A key names what a transaction touches: a row (`table` + primary key values), a session
//! or an explicit hint. Keys are hashed with 32-bit FNV-1a into a bounded space (a power of
//! two, default 2^20, as in Promiscuous): counters stay bounded, and a collision only adds a
//! false dependency, never drops a true one.

/// Default size of the hashed key space (2^20, Promiscuous's choice: 8 MiB of counters at
/// most per array, and a collision rate that stays low for a million hot rows).
pub const DEFAULT_KEY_SPACE: u32 = 1 << 20;

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// Incremental FNV-1a; fields are separated by a 0x1f byte so `("ab","c")` and
/// `("a","bc")` hash differently.
#[derive(Clone, Copy)]
pub struct KeyHasher(u32);

impl Default for KeyHasher {
    fn default() -> Self {
        KeyHasher(FNV_OFFSET)
    }
}

impl KeyHasher {
    pub fn new(kind: &str) -> Self {
        let mut h = KeyHasher::default();
        h.field(kind.as_bytes());
        h
    }

    pub fn field(&mut self, bytes: &[u8]) -> &mut Self {
        for b in bytes {
            self.0 ^= u32::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
        self.0 ^= 0x1f;
        self.0 = self.0.wrapping_mul(FNV_PRIME);
        self
    }

    /// The key in a space of `space` slots (`space` is a power of two).
    pub fn finish(&self, space: u32) -> u32 {
        self.0 & (space - 1)
    }
}

/// Key of a row: the published table name and the primary key values in key order,
/// each in the source's text form.
pub fn row_key<'a>(table: &str, key_values: impl IntoIterator<Item = &'a str>, space: u32) -> u32 {
    let mut h = KeyHasher::new("row");
    h.field(table.as_bytes());
    for v in key_values {
        h.field(v.as_bytes());
    }
    h.finish(space)
}

/// Key of an application session (`pg_logical_emit_message` context `session`).
pub fn session_key(session: &str, space: u32) -> u32 {
    KeyHasher::new("session")
        .field(session.as_bytes())
        .finish(space)
}

/// Key of a whole table: every row change reads it, a truncate writes it.
pub fn table_key(table: &str, space: u32) -> u32 {
    KeyHasher::new("table")
        .field(table.as_bytes())
        .finish(space)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_boundaries_matter() {
        let a = row_key("t", ["ab", "c"], DEFAULT_KEY_SPACE);
        let b = row_key("t", ["a", "bc"], DEFAULT_KEY_SPACE);
        assert_ne!(a, b);
    }

    #[test]
    fn keys_stay_in_the_space() {
        for i in 0..1000 {
            let k = row_key("users", [i.to_string().as_str()], 1024);
            assert!(k < 1024);
        }
    }

    #[test]
    fn sessions_and_rows_do_not_share_keys_by_construction() {
        assert_ne!(
            session_key("users", DEFAULT_KEY_SPACE),
            row_key("users", [], DEFAULT_KEY_SPACE)
        );
    }
}
