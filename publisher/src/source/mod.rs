//! Sources of row changes. Each source decodes its log into the same row-change
//! vocabulary ([`change`]) and feeds it to the shared [`assemble::Assembler`], so every
//! source publishes identical envelopes and dependencies for the same logical changes.
//!
//! - [`change`]: the vocabulary, shared by all sources; no source imports another.
//! - `driver`: the one stream loop — checkpoint and generation, markers, confirms,
//!   shutdown — run for every source through its `ChangeLog` implementation.
//! - [`postgres`], [`mysql`]: each source's connection, catalog checks and decoding.

pub mod assemble;
pub mod change;
pub(crate) mod driver;
pub mod mysql;
pub mod postgres;
pub mod tls;
pub mod values;

use crate::config::TableConfig;
use crate::error::SourceError;
use change::TableMeta;

/// Checks a published table's configuration against its catalog facts, the same way
/// for every source: listed columns exist, the key is published, references name
/// existing columns and a published table (`published(reference.table)`).
pub fn check_columns(
    t: &TableConfig,
    meta: &TableMeta,
    display: &str,
    published: impl Fn(&str) -> bool,
) -> Result<(), SourceError> {
    let missing = |column: &String| SourceError::MissingColumn {
        table: display.to_string(),
        column: column.clone(),
    };
    if let Some(c) = t
        .columns
        .iter()
        .find(|c| *c != "*" && !meta.columns.contains(c))
    {
        return Err(missing(c));
    }
    if let Some(k) = meta.key.iter().find(|k| !t.publishes(k)) {
        return Err(SourceError::KeyNotPublished {
            table: display.to_string(),
            column: k.clone(),
        });
    }
    for r in &t.references {
        if let Some(c) = r.columns.iter().find(|c| !meta.columns.contains(c)) {
            return Err(missing(c));
        }
        if !published(&r.table) {
            return Err(SourceError::BadReference {
                table: display.to_string(),
                referenced: r.table.clone(),
            });
        }
    }
    Ok(())
}
