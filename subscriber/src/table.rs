//! The vocabulary of destination tables shared by the configuration and the sinks: how
//! a subscribed table lands in the store, and which names may appear in generated SQL.

use serde::Deserialize;

/// How a subscribed table lands in the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableMode {
    /// Kausal creates the table from the published column types and keeps it equal to
    /// the source (plus a `_kausal_seq` column: the sequence number of the last change).
    #[default]
    Mirror,
    /// Rows go into a table the application owns and created; Kausal only upserts and
    /// deletes by key, in the subscribed columns.
    Map,
    /// Not stored at all: only callbacks see the changes.
    None,
}

/// Names Kausal puts into SQL it generates: plain identifiers only, so quoting can never
/// be escaped.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}
