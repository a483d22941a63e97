//! The search sink (feature `search`): one table kept current in a tantivy index.
//!
//! Each row is one document: `_key` (the key values joined by `:`, exact), `_v` (its
//! version `<generation>:<seq>`), `_live` (`1`, or `0` for a tombstone left by a
//! delete), `_doc` (the whole row as JSON, stored, so columns added later come along),
//! and the configured fields: `text` columns tokenized for full-text search, `keyword`
//! columns as exact terms, `number` columns as f64. A write looks the row's version up
//! (changes not yet committed first, then the index) and is skipped unless newer; it
//! replaces the row's document by deleting the `_key` term and adding the new one.
//!
//! Commits: the store calls [`Sink::flush`] once per group, before its own commit, so a
//! transaction the store records as applied is already searchable (the bound is the
//! group, well under a second), and a crash between the two makes the replay find the
//! rows' versions and skip them.

use super::{Sink, SinkFuture};
use crate::error::{ErrorClass, SinkError};
use crate::txn::{RowChange, Transaction};
use kausal_bus::Op;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, QueryParser, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, OwnedValue, Schema, FAST, INDEXED, STORED, STRING, TEXT,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

/// Memory the index writer may use before it flushes a segment.
const WRITER_HEAP: usize = 50_000_000;
/// The `_key` of the document holding a table's truncate floor.
const FLOOR_KEY: &str = "\u{0}truncated";

/// `[[sink]] kind = "search"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSinkConfig {
    /// Directory of the index (created if missing).
    pub path: PathBuf,
    /// Destination table indexed.
    pub table: String,
    /// Columns tokenized for full-text search.
    #[serde(default)]
    pub text: Vec<String>,
    /// Columns indexed as exact terms (ids, states, dates as ISO text).
    #[serde(default)]
    pub keyword: Vec<String>,
    /// Numeric columns (range queries: `likes:[10 TO *]`).
    #[serde(default)]
    pub number: Vec<String>,
}

struct Fields {
    key: Field,
    version: Field,
    live: Field,
    doc: Field,
    text: Vec<(String, Field)>,
    keyword: Vec<(String, Field)>,
    number: Vec<(String, Field)>,
}

pub struct SearchSink {
    name: String,
    table: String,
    index: Index,
    reader: IndexReader,
    writer: Mutex<IndexWriter>,
    fields: Fields,
    /// Versions written since the last commit (not visible to searchers yet).
    pending: Mutex<HashMap<String, (u64, u64)>>,
}

fn schema(cfg: &SearchSinkConfig) -> Schema {
    let mut b = Schema::builder();
    b.add_text_field("_key", STRING | STORED);
    b.add_text_field("_v", STORED);
    b.add_text_field("_live", STRING);
    b.add_text_field("_doc", STORED);
    for c in &cfg.text {
        b.add_text_field(c, TEXT | STORED);
    }
    for c in &cfg.keyword {
        b.add_text_field(c, STRING | STORED);
    }
    for c in &cfg.number {
        b.add_f64_field(c, INDEXED | STORED | FAST);
    }
    b.build()
}

impl SearchSink {
    /// Opens the index at `cfg.path`, creating it if missing. An index built for other
    /// fields is refused with the fix.
    pub fn open(cfg: &SearchSinkConfig) -> Result<SearchSink, SinkError> {
        let name = format!("search index {} ({})", cfg.path.display(), cfg.table);
        let fail = |class: ErrorClass, message: String| SinkError::External {
            sink: name.clone(),
            message,
            class,
            source: None,
        };
        std::fs::create_dir_all(&cfg.path)
            .map_err(|e| fail(ErrorClass::Definite, format!("cannot create it: {e}")))?;
        let wanted = schema(cfg);
        let dir = tantivy::directory::MmapDirectory::open(&cfg.path)
            .map_err(|e| fail(ErrorClass::Definite, format!("cannot open it: {e}")))?;
        let index = Index::open_or_create(dir, wanted.clone()).map_err(|e| {
            fail(
                ErrorClass::Definite,
                format!(
                    "it was built for other fields ({e}): move it away and re-bootstrap \
                     the table, or point `path` elsewhere"
                ),
            )
        })?;
        let writer = index
            .writer(WRITER_HEAP)
            .map_err(|e| fail(ErrorClass::Transient, format!("cannot lock it: {e}")))?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e| fail(ErrorClass::Definite, format!("cannot read it: {e}")))?;
        let field = |n: &str| wanted.get_field(n).expect("built above");
        let fields = Fields {
            key: field("_key"),
            version: field("_v"),
            live: field("_live"),
            doc: field("_doc"),
            text: cfg.text.iter().map(|c| (c.clone(), field(c))).collect(),
            keyword: cfg.keyword.iter().map(|c| (c.clone(), field(c))).collect(),
            number: cfg.number.iter().map(|c| (c.clone(), field(c))).collect(),
        };
        Ok(SearchSink {
            name,
            table: cfg.table.clone(),
            index,
            reader,
            writer: Mutex::new(writer),
            fields,
            pending: Mutex::new(HashMap::new()),
        })
    }

    fn error(&self, e: impl std::fmt::Display) -> SinkError {
        SinkError::External {
            sink: self.name.clone(),
            message: e.to_string(),
            class: ErrorClass::Transient,
            source: None,
        }
    }

    /// The key text of a row: key values in key order, joined by `:`.
    pub fn key_text(key_columns: &[String], key: &Map<String, Value>) -> String {
        key_columns
            .iter()
            .map(|c| match key.get(c) {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            })
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The committed document of `key` (live or tombstone).
    fn committed(&self, key: &str) -> Result<Option<TantivyDocument>, SinkError> {
        let searcher = self.reader.searcher();
        let query = TermQuery::new(
            Term::from_field_text(self.fields.key, key),
            IndexRecordOption::Basic,
        );
        let hits = searcher
            .search(&query, &TopDocs::with_limit(1).order_by_score())
            .map_err(|e| self.error(e))?;
        match hits.first() {
            Some((_, address)) => Ok(Some(searcher.doc(*address).map_err(|e| self.error(e))?)),
            None => Ok(None),
        }
    }

    fn version_of(&self, key: &str) -> Result<Option<(u64, u64)>, SinkError> {
        if let Some(v) = self.pending.lock().expect("not poisoned").get(key) {
            return Ok(Some(*v));
        }
        let Some(doc) = self.committed(key)? else {
            return Ok(None);
        };
        Ok(text_of(&doc, self.fields.version).and_then(|v| parse_version(&v)))
    }

    /// The live row stored for `key`, as its JSON object; `None` when absent or deleted.
    pub fn get(&self, key: &str) -> Result<Option<Map<String, Value>>, SinkError> {
        let Some(doc) = self.committed(key)? else {
            return Ok(None);
        };
        Ok(text_of(&doc, self.fields.doc).and_then(|d| serde_json::from_str(&d).ok()))
    }

    /// Writes one document version of `key` (a tombstone when `row` is `None`), unless
    /// the index already holds a newer one, or a newer truncate. An equal version is the
    /// same transaction changing the row again (or its replay: the same document).
    fn put(
        &self,
        key: &str,
        version: (u64, u64),
        row: Option<&Map<String, Value>>,
    ) -> Result<(), SinkError> {
        let newest = self.version_of(key)?.max(self.version_of(FLOOR_KEY)?);
        if newest.is_some_and(|v| v > version) {
            return Ok(());
        }
        let f = &self.fields;
        let mut doc = TantivyDocument::default();
        doc.add_text(f.key, key);
        doc.add_text(f.version, format!("{}:{}", version.0, version.1));
        doc.add_text(f.live, if row.is_some() { "1" } else { "0" });
        if let Some(row) = row {
            doc.add_text(f.doc, Value::Object(row.clone()).to_string());
            for (c, field) in f.text.iter().chain(&f.keyword) {
                match row.get(c) {
                    Some(Value::Null) | None => {}
                    Some(Value::String(s)) => doc.add_text(*field, s),
                    Some(v) => doc.add_text(*field, v.to_string()),
                }
            }
            for (c, field) in &f.number {
                if let Some(n) = row.get(c).and_then(|v| match v {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                }) {
                    doc.add_f64(*field, n);
                }
            }
        }
        let writer = self.writer.lock().expect("not poisoned");
        writer.delete_term(Term::from_field_text(f.key, key));
        writer.add_document(doc).map_err(|e| self.error(e))?;
        drop(writer);
        self.pending
            .lock()
            .expect("not poisoned")
            .insert(key.to_string(), version);
        Ok(())
    }

    fn write(&self, tx: &Transaction, change: &RowChange) -> Result<(), SinkError> {
        let version = (tx.id.generation, tx.id.seq);
        let key = |k: &Map<String, Value>| Self::key_text(&change.shape.key, k);
        match change.op {
            Op::Truncate => {
                let newest = self.version_of(FLOOR_KEY)?;
                if newest.is_some_and(|v| v >= version) {
                    return Ok(());
                }
                let writer = self.writer.lock().expect("not poisoned");
                writer.delete_term(Term::from_field_text(self.fields.live, "1"));
                drop(writer);
                self.put(FLOOR_KEY, version, None)
            }
            Op::Delete => self.put(&key(&change.key), version, None),
            Op::Insert | Op::Update => {
                if let Some(old) = change.old_key.as_ref().filter(|o| **o != change.key) {
                    self.put(&key(old), version, None)?;
                }
                self.put(&key(&change.key), version, change.new.as_ref())
            }
        }
    }

    /// Searches live rows: `query` in tantivy's query language over the text and keyword
    /// fields. Returns up to `limit` rows (their JSON objects), best first.
    pub fn search(&self, query: &str, limit: usize) -> Result<Vec<Map<String, Value>>, SinkError> {
        search_index(&self.index, &self.reader, &self.fields, query, limit)
            .map_err(|e| self.error(e))
    }
}

/// Opens the index at `path` read-only and searches it (the `kausal search` command).
pub fn search_path(
    path: &std::path::Path,
    query: &str,
    limit: usize,
) -> Result<Vec<Map<String, Value>>, String> {
    let index =
        Index::open_in_dir(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let schema = index.schema();
    let field = |n: &str| schema.get_field(n).map_err(|e| e.to_string());
    let mut text = Vec::new();
    for (f, entry) in schema.fields() {
        let n = entry.name();
        if !n.starts_with('_') && entry.field_type().is_indexed() {
            text.push((n.to_string(), f));
        }
    }
    let fields = Fields {
        key: field("_key")?,
        version: field("_v")?,
        live: field("_live")?,
        doc: field("_doc")?,
        text,
        keyword: Vec::new(),
        number: Vec::new(),
    };
    let reader = index.reader().map_err(|e| e.to_string())?;
    search_index(&index, &reader, &fields, query, limit).map_err(|e| e.to_string())
}

fn search_index(
    index: &Index,
    reader: &IndexReader,
    fields: &Fields,
    query: &str,
    limit: usize,
) -> tantivy::Result<Vec<Map<String, Value>>> {
    let searchable: Vec<Field> = fields
        .text
        .iter()
        .chain(&fields.keyword)
        .map(|(_, f)| *f)
        .collect();
    let parser = QueryParser::for_index(index, searchable);
    let parsed = parser.parse_query(query)?;
    let live: Box<dyn Query> = Box::new(TermQuery::new(
        Term::from_field_text(fields.live, "1"),
        IndexRecordOption::Basic,
    ));
    let both = BooleanQuery::new(vec![(Occur::Must, parsed), (Occur::Must, live)]);
    let searcher = reader.searcher();
    let hits = searcher.search(&both, &TopDocs::with_limit(limit).order_by_score())?;
    let mut out = Vec::with_capacity(hits.len());
    for (_, address) in hits {
        let doc: TantivyDocument = searcher.doc(address)?;
        if let Some(row) = text_of(&doc, fields.doc).and_then(|d| serde_json::from_str(&d).ok()) {
            out.push(row);
        }
    }
    Ok(out)
}

fn text_of(doc: &TantivyDocument, field: Field) -> Option<String> {
    doc.get_first(field)
        .and_then(|v| match OwnedValue::from(v) {
            OwnedValue::Str(s) => Some(s),
            _ => None,
        })
}

fn parse_version(v: &str) -> Option<(u64, u64)> {
    let (g, s) = v.split_once(':')?;
    Some((g.parse().ok()?, s.parse().ok()?))
}

impl Sink for SearchSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn apply<'a>(&'a self, tx: &'a Transaction) -> SinkFuture<'a> {
        Box::pin(async move {
            for change in tx.changes.iter().filter(|c| c.shape.name == self.table) {
                self.write(tx, change)?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> SinkFuture<'_> {
        Box::pin(async move {
            if self.pending.lock().expect("not poisoned").is_empty() {
                return Ok(());
            }
            tokio::task::block_in_place(|| {
                self.writer
                    .lock()
                    .expect("not poisoned")
                    .commit()
                    .map_err(|e| self.error(e))?;
                self.reader.reload().map_err(|e| self.error(e))
            })?;
            self.pending.lock().expect("not poisoned").clear();
            Ok(())
        })
    }

    // No `abort`: with several appliers, another group's changes may wait in the same
    // writer, and rolling it back would lose them after their store committed. A rolled
    // back group's changes stay queued; its retry finds their versions and the next
    // flush commits them. (A transaction that is then dead-lettered stays searchable
    // until its rows' next version.)
}
