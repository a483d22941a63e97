//! The Postgres source: logical replication with `pgoutput` through
//! `pgwire-replication`. The slot holds our position on the server; `Replication`
//! decodes its messages into the shared vocabulary ([`crate::source::change`]) and the
//! shared `source::driver` does the rest (checkpoints, confirms, shutdown).

pub mod catalog;
pub mod pgoutput;

use crate::bootstrap::{Windows, WATERMARK_PREFIX};
use crate::checkpoint::Checkpoint;
use crate::config::{split_name, PostgresSource, PublisherConfig};
use crate::error::{PublisherError, SourceError};
use crate::publish::Item;
use crate::source::assemble::{resolve_refs, schema_of, ColumnRt, RefSpec, TableRt};
use crate::source::change::{RowChange, TableMeta};
use crate::source::driver::{self, ChangeLog, Feed, Start, Step, Wiring};
use catalog::{ConnInfo, TypeCache};
use pgoutput::Message;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Offset between the Postgres epoch (2000-01-01) and the Unix epoch, in microseconds.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// Prefix of the transactional messages that carry context, sessions and read hints
/// (`pg_logical_emit_message(true, 'kausal', ...)`).
const CONTEXT_PREFIX: &str = "kausal";

/// Names of slot and publication for a config.
pub fn slot_name(cfg: &PublisherConfig, pg: &PostgresSource) -> String {
    pg.slot
        .clone()
        .unwrap_or_else(|| format!("kausal_{}", cfg.namespace.replace('-', "_")))
}

pub fn publication_name(cfg: &PublisherConfig, pg: &PostgresSource) -> String {
    pg.publication
        .clone()
        .unwrap_or_else(|| format!("kausal_{}", cfg.namespace.replace('-', "_")))
}

/// Connects and runs the preflight checks, changing nothing.
pub async fn check(cfg: &PublisherConfig, pg: &PostgresSource) -> Result<(), SourceError> {
    let conn = ConnInfo::parse(&pg.url, pg.password()?)?;
    let sql = conn.connect().await?;
    catalog::preflight(&sql, cfg, &conn.user, &conn.database, &slot_name(cfg, pg)).await?;
    Ok(())
}

/// Checks the server, prepares publication and slot, and streams from the checkpoint
/// (or from the slot, starting a new generation) until shutdown or an error. Bootstrap
/// watermarks in the stream go to `windows`.
pub(crate) async fn stream(
    cfg: &PublisherConfig,
    pg: &PostgresSource,
    checkpoint: Option<Checkpoint>,
    wiring: Wiring,
    windows: &Windows,
) -> Result<(), PublisherError> {
    let conn = ConnInfo::parse(&pg.url, pg.password()?)?;
    let sql = conn.connect().await?;
    let slot = slot_name(cfg, pg);
    let publication = publication_name(cfg, pg);
    let metas = catalog::preflight(&sql, cfg, &conn.user, &conn.database, &slot).await?;
    catalog::ensure_publication(&sql, &publication, cfg).await?;
    let path = &wiring.checkpoint_path;
    let confirmed = match (catalog::slot_state(&sql, &slot).await?, &checkpoint) {
        (Some((plugin, _)), _) if plugin != "pgoutput" => {
            return Err(SourceError::SlotPlugin { slot, plugin }.into())
        }
        (None, Some(_)) => {
            return Err(SourceError::SlotDropped {
                slot,
                checkpoint: path.display().to_string(),
            }
            .into())
        }
        (existing, _) => existing.map(|(_, confirmed)| confirmed),
    };
    let (state, start) = match Start::decide(cfg, checkpoint, path)? {
        Start::Resume(cp) => (cp.state, cp.position),
        Start::Begin => {
            let start = match confirmed {
                Some(confirmed) => confirmed,
                None => catalog::create_slot(&sql, &slot).await?,
            };
            let state = driver::new_generation(cfg, path, start, String::new()).await?;
            (state, start)
        }
    };
    tracing::info!(slot, publication, start = %Lsn(start), generation = state.generation,
        next_seq = state.next_seq, "starting replication");

    let key_columns = driver::key_columns(cfg, &metas, |t| t.qualified());
    let repl_cfg = ReplicationConfig::new(
        conn.host.clone(),
        conn.user.clone(),
        conn.password.clone(),
        conn.database.clone(),
        slot.clone(),
        publication.clone(),
    )
    .with_port(conn.port)
    .with_start_lsn(Lsn(start))
    .with_options(catalog::SESSION_OPTIONS)
    .with_application_name(format!("kausal-{}", cfg.namespace))
    .with_status_interval(Duration::from_millis(500))
    .with_wakeup_interval(Duration::from_secs(2))
    .with_tls(replication_tls(&conn.tls));
    let mut client = ReplicationClient::connect(repl_cfg)
        .await
        .map_err(|e| replication_error(&conn, e))?;
    client
        .wait_started()
        .await
        .map_err(SourceError::Replication)?;
    windows.stream_started();

    let log = Replication {
        cfg,
        windows,
        sql,
        slot,
        metas,
        types: TypeCache::default(),
        client,
        position: start,
        unpublished: HashSet::new(),
    };
    driver::run(cfg, log, state, key_columns, wiring).await
}

/// The open replication stream, with the catalog connection that describes its
/// relations.
struct Replication<'a> {
    cfg: &'a PublisherConfig,
    windows: &'a Windows,
    sql: tokio_postgres::Client,
    slot: String,
    metas: HashMap<(String, String), TableMeta>,
    types: TypeCache,
    client: ReplicationClient,
    /// End of the last commit (at first, the start): a checkpoint resumes there.
    position: u64,
    /// Relations the stream described that this publisher does not publish. Their changes
    /// still come when the publication listed them at the time (a table taken out of the
    /// configuration, then the WAL replayed from the checkpoint): skipped, not an error.
    unpublished: HashSet<u32>,
}

impl ChangeLog for Replication<'_> {
    type Event = ReplicationEvent;

    async fn recv(&mut self) -> Result<Option<ReplicationEvent>, PublisherError> {
        Ok(self.client.recv().await.map_err(SourceError::Replication)?)
    }

    async fn apply(
        &mut self,
        event: ReplicationEvent,
        feed: &mut Feed,
    ) -> Result<Step, PublisherError> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.windows.begin(xid);
                feed.asm.begin_at(
                    format!("pg:{final_lsn}"),
                    xid.to_string(),
                    commit_time_micros.saturating_add(PG_EPOCH_OFFSET_US),
                );
            }
            ReplicationEvent::XLogData { data, .. } => {
                match pgoutput::decode(&data).map_err(SourceError::from)? {
                    Message::Relation(rel) => match self.relation(&rel).await? {
                        Some(table) => {
                            self.unpublished.remove(&rel.oid);
                            feed.asm.relation(rel.oid, table);
                        }
                        None => {
                            self.unpublished.insert(rel.oid);
                        }
                    },
                    Message::Row(
                        RowChange::Insert { rel, .. }
                        | RowChange::Update { rel, .. }
                        | RowChange::Delete { rel, .. },
                    ) if self.unpublished.contains(&rel) => {}
                    Message::Row(change) => {
                        if let Some(part) = feed.asm.change(change)? {
                            self.windows.record(&part.changes);
                            feed.send(Item::Envelope(part)).await?;
                        }
                    }
                    Message::Ignored(_) => {}
                }
            }
            ReplicationEvent::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == CONTEXT_PREFIX => feed.asm.context_message(&content),
            ReplicationEvent::Message {
                transactional: false,
                prefix,
                content,
                ..
            } if prefix == WATERMARK_PREFIX => {
                let state = &feed.asm.tracker.state;
                let last_seq = state.next_seq.saturating_sub(1);
                let chunk =
                    self.windows
                        .mark(&content, &self.cfg.namespace, state.generation, last_seq);
                if let Some(chunk) = chunk {
                    feed.send(chunk).await?;
                }
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.position = end_lsn.as_u64();
                let Some(last) = feed.asm.commit() else {
                    // Nothing of ours: the slot may move past it.
                    return Ok(Step::Idle(self.position));
                };
                self.windows.record(&last.changes);
                feed.send(Item::Envelope(last)).await?;
                return Ok(Step::Committed);
            }
            // Idle: confirming the server's position keeps the slot from holding WAL and
            // lets Postgres shut down fast.
            ReplicationEvent::KeepAlive { wal_end, .. } => return Ok(Step::Idle(wal_end.as_u64())),
            ReplicationEvent::StoppedAt { .. } => return Ok(Step::End),
        }
        Ok(Step::Continue)
    }

    fn position(&self) -> (u64, String) {
        (self.position, String::new())
    }

    fn confirm(&mut self, position: u64) {
        self.client.update_applied_lsn(Lsn(position));
    }

    async fn close(self) {
        self.client.stop();
    }

    async fn report_lag(&mut self) {
        if let Ok(Some(lag)) = catalog::slot_lag_bytes(&self.sql, &self.slot).await {
            tracing::info!(
                slot = self.slot.as_str(),
                lag_bytes = lag,
                "replication slot lag"
            );
        }
    }
}

impl Replication<'_> {
    /// Builds the runtime description of a relation from its relation message and the
    /// catalog. `None` for tables this publisher does not publish.
    async fn relation(&mut self, rel: &pgoutput::Relation) -> Result<Option<TableRt>, SourceError> {
        let cfg = self.cfg;
        let qualified = (rel.schema.clone(), rel.name.clone());
        let Some(tcfg) = cfg.tables.iter().find(|t| t.qualified() == qualified) else {
            return Ok(None);
        };
        // Refresh catalog facts when the relation differs from what we know (DDL).
        let stale = self.metas.get(&qualified).is_none_or(|m| {
            m.columns.len() != rel.columns.len()
                || m.columns
                    .iter()
                    .zip(&rel.columns)
                    .any(|(a, b)| *a != b.name)
        });
        if stale {
            if let Some(meta) = catalog::table_meta(&self.sql, &rel.schema, &rel.name).await? {
                self.metas.insert(qualified.clone(), meta);
            }
        }
        let meta = self.metas.get(&qualified).cloned().unwrap_or_default();
        let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
        self.types.resolve(&self.sql, &oids).await?;
        let published = tcfg.published_name();
        let mut columns = Vec::with_capacity(rel.columns.len());
        let mut described = Vec::with_capacity(rel.columns.len());
        for c in &rel.columns {
            let (type_name, conv) = self.types.get(c.type_oid);
            let on = tcfg.publishes(&c.name);
            let out = on.then(|| tcfg.published_column(&c.name));
            described.push((out.clone().unwrap_or_default(), type_name, on));
            columns.push(ColumnRt { out, conv });
        }
        let index_of = |name: &str| rel.columns.iter().position(|c| c.name == name);
        let key: Vec<usize> = meta.key.iter().filter_map(|k| index_of(k)).collect();
        let key_names: Vec<String> = meta.key.iter().map(|k| tcfg.published_column(k)).collect();
        let mut specs: Vec<RefSpec<'_>> = meta
            .foreign_keys
            .iter()
            .map(|(local, rs, rt, rc)| RefSpec {
                local,
                target: (rs.clone(), rt.clone()),
                target_columns: Some(rc),
            })
            .collect();
        specs.extend(tcfg.references.iter().map(|r| RefSpec {
            local: &r.columns,
            target: split_name(&r.table),
            target_columns: None,
        }));
        let refs = resolve_refs(&specs, index_of, |target| {
            let tt = cfg.tables.iter().find(|t| t.qualified() == *target)?;
            Some((tt.published_name(), self.metas.get(target)?.key.clone()))
        });
        let (schema, fingerprint) = schema_of(&published, &described, &key_names);
        Ok(Some(TableRt {
            published,
            columns,
            key,
            refs,
            schema,
            fingerprint,
        }))
    }
}

/// The replication stream's TLS: the same mode and CA as the catalog connection.
fn replication_tls(tls: &crate::source::tls::SourceTls) -> pgwire_replication::TlsConfig {
    use crate::source::tls::TlsMode;
    use pgwire_replication::TlsConfig;
    match tls.mode {
        TlsMode::Disable => TlsConfig::disabled(),
        TlsMode::Require => TlsConfig::require(),
        TlsMode::VerifyCa => TlsConfig::verify_ca(tls.ca_file.clone()),
        TlsMode::VerifyFull => TlsConfig::verify_full(tls.ca_file.clone()),
    }
}

/// A certificate problem of the replication connection becomes the same clear error as
/// the catalog connection's.
fn replication_error(
    conn: &catalog::ConnInfo,
    error: pgwire_replication::PgWireError,
) -> SourceError {
    if conn.tls.enabled() {
        let detail = kausal_bus::tls::describe(&error);
        if kausal_bus::tls::hint(&detail).is_some() {
            return SourceError::Tls {
                endpoint: conn.endpoint(),
                detail,
            };
        }
    }
    SourceError::Replication(error)
}
