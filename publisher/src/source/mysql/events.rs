//! The binlog's event-group state and what each event does to it: groups open and
//! commit, statements, table maps, rows and truncates of published tables, all turned
//! into the shared row-change vocabulary for the assembler.

use super::catalog::{self, qualified, table_qualified, ConnInfo};
use super::position::Resume;
use super::rows::{self, MyTable};
use crate::config::{MysqlSource, PublisherConfig, DEFAULT_CONTEXT_TABLE};
use crate::error::{PublisherError, SourceError};
use crate::publish::Item;
use crate::source::assemble::{resolve_refs, RefSpec};
use crate::source::change::{Datum, OldKind, RowChange, TableMeta};
use crate::source::driver::Feed;
use mysql_async::binlog::events::{RowsEventData, TableMapEvent};
use mysql_async::prelude::Queryable;
use std::collections::HashMap;

/// What a table-map event's table is to this publisher.
pub(super) enum Mapped {
    /// A published table: its relation id in the assembler and its binlog columns.
    Published(u32, MyTable),
    /// The context table: its rows carry context JSON.
    Context(MyTable),
    Ignored,
}

/// The open event group.
struct Group {
    /// MariaDB GTID `(domain, server, seq)`.
    gtid: Option<(u32, u32, u64)>,
    /// Inside `BEGIN` … `COMMIT`/XID; otherwise the group is one statement.
    begun: bool,
}

/// Everything the binlog's events are read against: table maps, catalog facts, the open
/// group and the position.
pub(super) struct Decoder<'a> {
    cfg: &'a PublisherConfig,
    info: ConnInfo,
    mariadb: bool,
    context_table: (String, String),
    metas: HashMap<(String, String), TableMeta>,
    metas_stale: bool,
    pub tables: HashMap<u64, Mapped>,
    group: Option<Group>,
    /// Where a checkpoint resumes: moved by each commit.
    pub resume: Resume,
    /// Binlog file being read and the offset after the last event.
    pub file: String,
    pub next_pos: u64,
}

impl<'a> Decoder<'a> {
    pub(super) fn new(
        cfg: &'a PublisherConfig,
        my: &MysqlSource,
        info: ConnInfo,
        mariadb: bool,
        metas: HashMap<(String, String), TableMeta>,
        resume: Resume,
    ) -> Self {
        let (file, next_pos) = match &resume {
            Resume::File { file, pos } => (file.clone(), *pos),
            Resume::Gtid(_) => (String::new(), 4),
        };
        let context_table = qualified(
            my.context_table.as_deref().unwrap_or(DEFAULT_CONTEXT_TABLE),
            &info.database,
        );
        Decoder {
            cfg,
            info,
            mariadb,
            context_table,
            metas,
            metas_stale: false,
            tables: HashMap::new(),
            group: None,
            resume,
            file,
            next_pos,
        }
    }
}

impl Decoder<'_> {
    pub(super) fn open_group(
        &mut self,
        feed: &mut Feed,
        gtid: Option<(u32, u32, u64)>,
        begun: bool,
        commit_ts_us: i64,
    ) {
        let (position, txid) = match gtid {
            Some((d, sv, n)) => (format!("mysql:{d}-{sv}-{n}"), format!("{d}-{sv}-{n}")),
            None => {
                let at = format!("{}:{}", self.file, self.next_pos);
                (format!("mysql:{at}"), at)
            }
        };
        feed.asm.begin_at(position, txid, commit_ts_us);
        self.group = Some(Group { gtid, begun });
    }

    /// Ends the open group: publishes what it changed and moves the resume position.
    pub(super) async fn commit(&mut self, feed: &mut Feed) -> Result<(), PublisherError> {
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        if let Some(last) = feed.asm.commit() {
            feed.send(Item::Envelope(last)).await?;
        }
        match (&mut self.resume, group.gtid) {
            (Resume::Gtid(state), Some((d, sv, n))) => {
                state.insert(d, (sv, n));
            }
            (Resume::File { file, pos }, _) => {
                *file = self.file.clone();
                *pos = self.next_pos;
            }
            (Resume::Gtid(_), None) => {}
        }
        Ok(())
    }

    /// A statement event: `BEGIN`, `COMMIT`, or DDL (or a statement-logged change), which
    /// ends a group of its own unless inside `BEGIN`. Returns whether a group ended.
    pub(super) async fn statement(
        &mut self,
        sql: &mut mysql_async::Conn,
        feed: &mut Feed,
        stmt: &str,
        schema: &str,
        timestamp: u32,
    ) -> Result<bool, PublisherError> {
        if stmt.eq_ignore_ascii_case("BEGIN") {
            if self.group.is_none() {
                self.open_group(feed, None, true, i64::from(timestamp) * 1_000_000);
            }
            if let Some(g) = self.group.as_mut() {
                g.begun = true;
            }
            return Ok(false);
        }
        if stmt.eq_ignore_ascii_case("COMMIT") {
            self.commit(feed).await?;
            return Ok(true);
        }
        // DDL (or a statement-logged change we cannot see row by row): forget table maps
        // and re-read keys and foreign keys.
        self.tables.clear();
        self.metas_stale = true;
        if let Some(name) = truncated_table(stmt, schema) {
            self.truncate(sql, feed, name, timestamp).await?;
        }
        if !self.group.as_ref().is_some_and(|g| g.begun) {
            self.commit(feed).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// A `TRUNCATE` of a published table: a truncate change, ordered like on Postgres
    /// through the table's key.
    async fn truncate(
        &mut self,
        sql: &mut mysql_async::Conn,
        feed: &mut Feed,
        name: (String, String),
        timestamp: u32,
    ) -> Result<(), PublisherError> {
        let Mapped::Published(rel, _) = self.map_from_catalog(sql, feed, &name).await? else {
            return Ok(());
        };
        if self.group.is_none() {
            self.open_group(feed, None, false, i64::from(timestamp) * 1_000_000);
        }
        if let Some(part) = feed.asm.change(RowChange::Truncate { rels: vec![rel] })? {
            feed.send(Item::Envelope(part)).await?;
        }
        Ok(())
    }

    /// Decides what a table-map event's table is, building its runtime description.
    pub(super) async fn map_table(
        &mut self,
        sql: &mut mysql_async::Conn,
        feed: &mut Feed,
        tme: &TableMapEvent<'_>,
    ) -> Result<Mapped, PublisherError> {
        let name = (
            tme.database_name().into_owned(),
            tme.table_name().into_owned(),
        );
        let decode_error = |detail: String| SourceError::BinlogDecode {
            table: format!("{}.{}", name.0, name.1),
            detail,
        };
        if name == self.context_table {
            return Ok(Mapped::Context(
                MyTable::from_event(tme).map_err(decode_error)?,
            ));
        }
        let db = &self.info.database;
        if !self
            .cfg
            .tables
            .iter()
            .any(|t| table_qualified(t, db) == name)
        {
            return Ok(Mapped::Ignored);
        }
        let table = MyTable::from_event(tme).map_err(decode_error)?;
        self.register(sql, feed, table).await
    }

    /// A published table's columns from the catalog, for statements without a
    /// table-map event (TRUNCATE).
    async fn map_from_catalog(
        &mut self,
        sql: &mut mysql_async::Conn,
        feed: &mut Feed,
        name: &(String, String),
    ) -> Result<Mapped, PublisherError> {
        let probe = format!(
            "SELECT * FROM {}.{} LIMIT 0",
            catalog::ident(&name.0),
            catalog::ident(&name.1)
        );
        let result = sql
            .query_iter(probe)
            .await
            .map_err(|source| SourceError::MysqlQuery {
                context: "read the columns of a truncated table",
                source,
            })?;
        let columns = result.columns().map(|c| c.to_vec()).unwrap_or_default();
        drop(result);
        let table = MyTable::from_columns(&name.0, &name.1, &columns);
        self.register(sql, feed, table).await
    }

    /// Registers a published table's runtime description with the assembler.
    async fn register(
        &mut self,
        sql: &mut mysql_async::Conn,
        feed: &mut Feed,
        mut table: MyTable,
    ) -> Result<Mapped, PublisherError> {
        let name = (table.database.clone(), table.table.clone());
        let db = self.info.database.clone();
        let Some((index, tcfg)) = self
            .cfg
            .tables
            .iter()
            .enumerate()
            .find(|(_, t)| table_qualified(t, &db) == name)
        else {
            return Ok(Mapped::Ignored);
        };
        if self.metas_stale {
            for t in &self.cfg.tables {
                let (d, tn) = table_qualified(t, &db);
                if let Some(meta) = catalog::table_meta(sql, self.mariadb, &d, &tn).await? {
                    self.metas.insert((d, tn), meta);
                }
            }
            self.metas_stale = false;
        }
        let meta = self.metas.get(&name).cloned().unwrap_or_default();
        table.mark_catalog_types(&meta.json_columns, &meta.bool_columns);
        // The event's own primary key is the key as of this row; the catalog's is the
        // fallback for servers that do not send it.
        let key: Vec<usize> = if table.key.is_empty() {
            meta.key.iter().filter_map(|k| table.index_of(k)).collect()
        } else {
            table.key.clone()
        };
        if key.is_empty() {
            return Err(SourceError::MysqlNoKey {
                table: format!("{}.{}", name.0, name.1),
            }
            .into());
        }
        let mut specs: Vec<RefSpec<'_>> = meta
            .foreign_keys
            .iter()
            .map(|(local, rdb, rt, rc)| RefSpec {
                local,
                target: (rdb.clone(), rt.clone()),
                target_columns: Some(rc),
            })
            .collect();
        specs.extend(tcfg.references.iter().map(|r| RefSpec {
            local: &r.columns,
            target: qualified(&r.table, &db),
            target_columns: None,
        }));
        let refs = resolve_refs(
            &specs,
            |c| table.index_of(c),
            |target| {
                let tt = self
                    .cfg
                    .tables
                    .iter()
                    .find(|t| table_qualified(t, &db) == *target)?;
                Some((tt.published_name(), self.metas.get(target)?.key.clone()))
            },
        );
        let rt = rows::table_rt(
            &table,
            tcfg.published_name(),
            |c| tcfg.publishes(c).then(|| tcfg.published_column(c)),
            key,
            refs,
        );
        // The relation id is the table's place in the configuration: stable across
        // restarts, so replayed envelopes list their schemas in the same order.
        let rel = index as u32;
        feed.asm.relation(rel, rt);
        Ok(Mapped::Published(rel, table))
    }

    /// A rows event: row changes of a published table, or context from the context
    /// table.
    pub(super) async fn rows(
        &mut self,
        feed: &mut Feed,
        re: &RowsEventData<'_>,
        tme: &TableMapEvent<'_>,
    ) -> Result<(), PublisherError> {
        let (rel, table, context) = match self.tables.get(&re.table_id()) {
            Some(Mapped::Published(rel, t)) => (*rel, t, false),
            Some(Mapped::Context(t)) => (0, t, true),
            Some(Mapped::Ignored) | None => return Ok(()),
        };
        let table = table.clone();
        if self.group.is_none() {
            // A rows event outside any group: treat it as its own transaction.
            self.open_group(feed, None, false, 0);
        }
        let name = format!("{}.{}", table.database, table.table);
        let decode = |detail: String| SourceError::BinlogDecode {
            table: name.clone(),
            detail,
        };
        for row in re.rows(tme) {
            let (before, after) = row.map_err(|e| decode(e.to_string()))?;
            let before = before
                .map(|r| texts(&table, r))
                .transpose()
                .map_err(decode)?;
            let after = after
                .map(|r| texts(&table, r))
                .transpose()
                .map_err(decode)?;
            if context {
                let data = table
                    .index_of("data")
                    .and_then(|i| after.as_ref()?.get(i)?.as_deref());
                if let Some(json) = data {
                    feed.asm.context_message(json);
                }
                continue;
            }
            let msg = match (&before, &after) {
                (None, Some(new)) => RowChange::Insert {
                    rel,
                    new: datums(new),
                },
                (Some(old), Some(new)) => RowChange::Update {
                    rel,
                    old: Some((OldKind::Full, datums(old))),
                    new: datums(new),
                },
                (Some(old), None) => RowChange::Delete {
                    rel,
                    old: (OldKind::Full, datums(old)),
                },
                (None, None) => continue,
            };
            if let Some(part) = feed.asm.change(msg)? {
                feed.send(Item::Envelope(part)).await?;
            }
        }
        Ok(())
    }
}

/// Text forms of a row's values in table order; a column missing from the row image
/// (impossible with `binlog_row_image = FULL`) is an error, never a silent NULL.
fn texts(
    table: &MyTable,
    row: mysql_async::binlog::row::BinlogRow,
) -> Result<Vec<Option<Vec<u8>>>, String> {
    if row.len() != table.columns.len() {
        return Err(format!(
            "row image has {} of {} columns: set binlog_row_image = FULL",
            row.len(),
            table.columns.len()
        ));
    }
    row.unwrap()
        .into_iter()
        .zip(&table.columns)
        .map(|(v, c)| c.text(v))
        .collect()
}

fn datums(values: &[Option<Vec<u8>>]) -> Vec<Datum<'_>> {
    values
        .iter()
        .map(|v| match v {
            Some(b) => Datum::Text(b),
            None => Datum::Null,
        })
        .collect()
}

/// The table of a `TRUNCATE [TABLE] [db.]name` statement; `default_db` is the
/// statement's current database.
fn truncated_table(stmt: &str, default_db: &str) -> Option<(String, String)> {
    let mut words = stmt.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("truncate") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("table") {
        name = words.next()?;
    }
    let name = name.trim_end_matches(';');
    let unquote = |s: &str| s.trim_matches('`').replace("``", "`");
    match name.split_once("`.`").or_else(|| name.split_once('.')) {
        Some((d, t)) => Some((unquote(d), unquote(t))),
        None => Some((default_db.to_string(), unquote(name))),
    }
}

#[cfg(test)]
mod tests {
    use super::truncated_table;

    #[test]
    fn truncate_statements_name_their_table() {
        let t = |s: &str| truncated_table(s, "app");
        assert_eq!(t("TRUNCATE posts"), Some(("app".into(), "posts".into())));
        assert_eq!(
            t("truncate table `shop`.`orders`"),
            Some(("shop".into(), "orders".into()))
        );
        assert_eq!(t("TRUNCATE TABLE x.y;"), Some(("x".into(), "y".into())));
        assert_eq!(t("ALTER TABLE posts ADD c int"), None);
    }
}
