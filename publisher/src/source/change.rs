//! The row-change vocabulary every source speaks. A source decodes its log into these
//! types (pgoutput messages, binlog rows events) and describes its tables with
//! [`TableMeta`]; from there on [`super::assemble`] and [`super::check_columns`] treat
//! every source alike. Kept apart from the sources so that no source depends on another.
//!
//! The shape is pgoutput's because Postgres was first: values in their text form, and
//! old rows that are either the key only or the whole row.

/// Catalog facts about one published table: keys and references, read before streaming
/// and again after DDL.
#[derive(Debug, Clone, Default)]
pub struct TableMeta {
    /// Postgres: the table's oid. MySQL / MariaDB: 0.
    pub oid: u32,
    /// Primary key (or replica identity index) columns in key order.
    pub key: Vec<String>,
    /// Postgres: `relreplident` (`d`, `n`, `f`, `i`). MySQL / MariaDB: empty.
    pub replica_identity: String,
    /// Declared foreign keys: (local columns, referenced schema, table, referenced columns).
    pub foreign_keys: Vec<(Vec<String>, String, String, Vec<String>)>,
    pub columns: Vec<String>,
    /// Text columns that hold JSON (MariaDB's `JSON` is `LONGTEXT` with a `json_valid`
    /// check): published as JSON values.
    pub json_columns: Vec<String>,
    /// MySQL `BOOLEAN` columns (`tinyint(1)`): published as booleans.
    pub bool_columns: Vec<String>,
    /// Postgres: stored generated columns, which logical replication does not carry
    /// (before Postgres 18): never published. MySQL / MariaDB: empty.
    pub generated_columns: Vec<String>,
}

/// One column value of a row, borrowed from the source's buffer (the pgoutput message,
/// the decoded binlog row): the assembler converts it without copying it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datum<'a> {
    Null,
    /// An unchanged out-of-line (TOASTed) value the server did not send (Postgres only).
    Unchanged,
    /// Text representation.
    Text(&'a [u8]),
}

/// Which old row an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// Only the key columns (the rest are null).
    Key,
    /// The whole old row (Postgres `REPLICA IDENTITY FULL`; always on MySQL / MariaDB).
    Full,
}

/// A change to rows of one or more tables. `rel` is the source's id of the table, as
/// announced to the assembler with [`super::assemble::Assembler::relation`]; rows hold
/// the table's columns in its order.
#[derive(Debug)]
pub enum RowChange<'a> {
    Insert {
        rel: u32,
        new: Vec<Datum<'a>>,
    },
    Update {
        rel: u32,
        old: Option<(OldKind, Vec<Datum<'a>>)>,
        new: Vec<Datum<'a>>,
    },
    Delete {
        rel: u32,
        old: (OldKind, Vec<Datum<'a>>),
    },
    Truncate {
        rels: Vec<u32>,
    },
}
