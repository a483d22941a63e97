//! The Postgres source: logical replication with `pgoutput` through
//! `pgwire-replication`, turned into envelopes by [`crate::source::assemble`].

pub mod catalog;
pub mod pgoutput;

use crate::checkpoint::Checkpoint;
use crate::config::{split_name, PostgresSource, PublisherConfig};
use crate::error::{PublisherError, SourceError};
use crate::publish::Item;
use crate::source::assemble::{resolve_refs, schema_of, Assembler, ColumnRt, RefSpec, TableRt};
use crate::tracker::{Tracker, TrackerState};
use catalog::{ConnInfo, TableMeta, TypeCache};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

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

/// Checks the server, prepares publication and slot, and streams until shutdown or an
/// error. Envelopes and checkpoint markers go to `tx` in commit order; `durable` reports
/// positions whose checkpoint is on disk, which are then confirmed to Postgres.
/// Bootstrap watermarks in the stream go to `windows`.
#[allow(clippy::too_many_arguments)]
pub async fn stream(
    cfg: &PublisherConfig,
    pg: &PostgresSource,
    checkpoint: Option<Checkpoint>,
    checkpoint_path: &Path,
    tx: mpsc::Sender<Item>,
    mut durable: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
    windows: &crate::bootstrap::Windows,
) -> Result<(), PublisherError> {
    let conn = ConnInfo::parse(&pg.url, pg.password()?)?;
    let sql = conn.connect().await?;
    let slot = slot_name(cfg, pg);
    let publication = publication_name(cfg, pg);
    let metas = catalog::preflight(&sql, cfg, &conn.user, &conn.database, &slot).await?;
    catalog::ensure_publication(&sql, &publication, cfg).await?;
    let (state, start) = match (catalog::slot_state(&sql, &slot).await?, checkpoint) {
        (Some((plugin, _)), _) if plugin != "pgoutput" => {
            return Err(SourceError::SlotPlugin { slot, plugin }.into())
        }
        (None, Some(_)) => {
            return Err(SourceError::SlotDropped {
                slot,
                checkpoint: checkpoint_path.display().to_string(),
            }
            .into())
        }
        (Some(_), Some(cp)) if cp.state.key_space != cfg.tuning.key_space => {
            return Err(SourceError::KeySpaceChanged {
                configured: cfg.tuning.key_space,
                checkpointed: cp.state.key_space,
                checkpoint: checkpoint_path.display().to_string(),
            }
            .into())
        }
        (Some(_), Some(cp)) => (cp.state, cp.position),
        (existing, None) => {
            let start = match existing {
                Some((_, confirmed)) => confirmed,
                None => catalog::create_slot(&sql, &slot).await?,
            };
            let state = TrackerState::new_generation(cfg.tuning.key_space, checkpoint_path);
            // Written down before streaming: a publisher stopped before it published
            // anything (a quiet source, a bootstrap answered from an idle stream) resumes
            // the same generation instead of starting yet another one, which would make
            // every subscriber reset its dependency state and leave bootstraps
            // answered so far in a generation nobody continues.
            let first = Checkpoint {
                position: start,
                resume: String::new(),
                state: state.clone(),
            };
            crate::checkpoint::persist(checkpoint_path, first).await?;
            (state, start)
        }
    };
    tracing::info!(slot, publication, start = %Lsn(start), generation = state.generation,
        next_seq = state.next_seq, "starting replication");

    let key_columns = cfg
        .tables
        .iter()
        .filter_map(|t| {
            let meta = metas.get(&t.qualified())?;
            Some((
                t.published_name(),
                meta.key.iter().map(|k| t.published_column(k)).collect(),
            ))
        })
        .collect();
    let mut asm = Assembler::new(
        &cfg.namespace,
        cfg.tuning.key_space,
        cfg.tuning.max_part_changes,
        Tracker::new(state),
        key_columns,
    );
    let mut metas = metas;
    let mut types = TypeCache::default();

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

    let interval = Duration::from_millis(cfg.checkpoint.interval_ms);
    let mut last_marker = Instant::now();
    let mut last_commit_end = start;
    let mut dirty = false;
    let mut marker_pos = start;
    let mut lag_timer = tokio::time::interval(Duration::from_secs(30));
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));

    let marker = |asm: &Assembler, pos: u64| {
        Item::Marker(Box::new(Checkpoint {
            position: pos,
            resume: String::new(),
            state: asm.tracker.state.clone(),
        }))
    };

    loop {
        let clean = !dirty && *durable.borrow() >= marker_pos;
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                if !asm.in_transaction() && dirty {
                    let _ = tx.send(marker(&asm, last_commit_end)).await;
                }
                client.stop();
                return Ok(());
            }
            Ok(()) = durable.changed() => {
                let pos = *durable.borrow_and_update();
                client.update_applied_lsn(Lsn(pos));
            }
            _ = tick.tick() => {
                if dirty && !asm.in_transaction() && last_marker.elapsed() >= interval {
                    send(&tx, marker(&asm, last_commit_end)).await?;
                    marker_pos = last_commit_end;
                    dirty = false;
                    last_marker = Instant::now();
                }
            }
            _ = lag_timer.tick() => {
                if let Ok(Some(lag)) = catalog::slot_lag_bytes(&sql, &slot).await {
                    tracing::info!(slot, lag_bytes = lag, "replication slot lag");
                }
            }
            event = client.recv() => {
                let Some(event) = event.map_err(SourceError::Replication)? else {
                    return Ok(());
                };
                match event {
                    ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                        windows.begin(xid);
                        asm.begin(&final_lsn.to_string(), xid, commit_time_micros);
                    }
                    ReplicationEvent::XLogData { data, .. } => {
                        let msg = pgoutput::decode(&data).map_err(SourceError::from)?;
                        if let pgoutput::Message::Relation(rel) = msg {
                            let table = relation(cfg, &sql, &mut metas, &mut types, &rel).await?;
                            if let Some(t) = table {
                                asm.relation(rel.oid, t);
                            }
                            continue;
                        }
                        if let Some(part) = asm.change(msg)? {
                            windows.record(&part.changes);
                            send(&tx, Item::Envelope(part)).await?;
                        }
                    }
                    ReplicationEvent::Message { transactional: true, prefix, content, .. }
                        if prefix == "kausal" =>
                    {
                        asm.context_message(&content);
                    }
                    ReplicationEvent::Message { transactional: false, prefix, content, .. }
                        if prefix == crate::bootstrap::WATERMARK_PREFIX =>
                    {
                        let state = &asm.tracker.state;
                        let last_seq = state.next_seq.saturating_sub(1);
                        if let Some(chunk) =
                            windows.mark(&content, &cfg.namespace, state.generation, last_seq)
                        {
                            send(&tx, chunk).await?;
                        }
                    }
                    ReplicationEvent::Message { .. } => {}
                    ReplicationEvent::Commit { end_lsn, .. } => {
                        last_commit_end = end_lsn.as_u64();
                        if let Some(last) = asm.commit() {
                            windows.record(&last.changes);
                            send(&tx, Item::Envelope(last)).await?;
                            dirty = true;
                        } else if clean {
                            // Nothing of ours in flight: let the slot move past it.
                            client.update_applied_lsn(end_lsn);
                        }
                        if dirty && last_marker.elapsed() >= interval {
                            send(&tx, marker(&asm, last_commit_end)).await?;
                            marker_pos = last_commit_end;
                            dirty = false;
                            last_marker = Instant::now();
                        }
                    }
                    ReplicationEvent::KeepAlive { wal_end, .. } => {
                        if clean && !asm.in_transaction() {
                            // Idle: confirm the server's position so the slot does not
                            // hold WAL and Postgres can shut down fast.
                            client.update_applied_lsn(wal_end);
                        }
                    }
                    ReplicationEvent::StoppedAt { .. } => return Ok(()),
                }
            }
        }
    }
}

async fn send(tx: &mpsc::Sender<Item>, item: Item) -> Result<(), PublisherError> {
    // The publish loop only goes away when it failed; its error is the one reported.
    tx.send(item)
        .await
        .map_err(|_| SourceError::PublisherGone.into())
}

/// Builds the runtime description of a relation from its relation message and the
/// catalog. `None` for tables this publisher does not publish.
async fn relation(
    cfg: &PublisherConfig,
    sql: &tokio_postgres::Client,
    metas: &mut HashMap<(String, String), TableMeta>,
    types: &mut TypeCache,
    rel: &pgoutput::Relation,
) -> Result<Option<TableRt>, SourceError> {
    let qualified = (rel.schema.clone(), rel.name.clone());
    let Some(tcfg) = cfg.tables.iter().find(|t| t.qualified() == qualified) else {
        return Ok(None);
    };
    // Refresh catalog facts when the relation differs from what we know (DDL).
    let stale = metas.get(&qualified).is_none_or(|m| {
        m.columns.len() != rel.columns.len()
            || m.columns
                .iter()
                .zip(&rel.columns)
                .any(|(a, b)| *a != b.name)
    });
    if stale {
        if let Some(meta) = catalog::table_meta(sql, &rel.schema, &rel.name).await? {
            metas.insert(qualified.clone(), meta);
        }
    }
    let meta = metas.get(&qualified).cloned().unwrap_or_default();
    let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
    types.resolve(sql, &oids).await?;
    let published = tcfg.published_name();
    let mut columns = Vec::with_capacity(rel.columns.len());
    let mut described = Vec::with_capacity(rel.columns.len());
    for c in &rel.columns {
        let (type_name, conv) = types.get(c.type_oid);
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
        Some((tt.published_name(), metas.get(target)?.key.clone()))
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
