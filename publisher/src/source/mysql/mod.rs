//! The MySQL / MariaDB source: the binlog, read as a replica through `mysql_async`'s
//! binlog stream, turned into the same envelopes as the Postgres source by the shared
//! [`crate::source::assemble::Assembler`].
//!
//! A transaction is a binlog event group: a GTID event (or `BEGIN`), table-map and rows
//! events, and an XID event (or `COMMIT`, or the single statement of a standalone group
//! such as DDL). The resume position after each group is a MariaDB GTID state or a
//! binlog file and offset ([`position`]); it is checkpointed with the counters once
//! RabbitMQ confirmed everything before it, exactly as for Postgres. Nothing is confirmed
//! to the server: a binlog has no slot, so the server's own retention
//! (`binlog_expire_logs_seconds`) bounds how long a publisher may be down.

pub mod catalog;
mod events;
pub mod position;
pub mod rows;

use crate::checkpoint::Checkpoint;
use crate::config::{MysqlSource, PublisherConfig, DEFAULT_CONTEXT_TABLE};
use crate::error::{PublisherError, SourceError};
use crate::publish::Item;
use crate::source::assemble::Assembler;
use crate::source::postgres::catalog::TableMeta;
use crate::tracker::{Tracker, TrackerState};
use catalog::{qualified, table_qualified, ConnInfo, Server};
use events::truncated_table;
use futures_util::StreamExt;
use mysql_async::binlog::events::EventData;
use mysql_async::prelude::Queryable;
use mysql_async::BinlogStreamRequest;
use position::{clean_binlog_name, parse_mariadb_gtid, Resume, MARIADB_GTID_EVENT};
use rows::MyTable;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Heartbeat the server sends on an idle stream; a stream silent for
/// [`SILENCE_LIMIT`] is dead (a half-open TCP connection) and is reopened.
const HEARTBEAT: Duration = Duration::from_secs(2);
const SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// The replica server id this publisher registers with.
pub fn server_id(cfg: &PublisherConfig, my: &MysqlSource) -> u32 {
    my.server_id
        .unwrap_or_else(|| derived_server_id(&cfg.namespace))
}

/// The server id a namespace gets when `source.server_id` is not set.
pub fn derived_server_id(namespace: &str) -> u32 {
    // 'K' in the high byte keeps derived ids clear of small hand-picked ones.
    let mut h: u32 = 0x811c_9dc5;
    for b in namespace.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    0x4b00_0000 | (h & 0x00ff_ffff)
}

/// Connects and runs the preflight checks, changing nothing.
pub async fn check(cfg: &PublisherConfig, my: &MysqlSource) -> Result<(), SourceError> {
    let info = ConnInfo::parse(my)?;
    let mut conn = info.connect().await?;
    let server = catalog::check_server(&mut conn, &info.user).await?;
    catalog::check_tables(&mut conn, &server, cfg, &info.user, &info.database).await?;
    let _ = conn.disconnect().await;
    Ok(())
}

/// What a table-map event's table is to this publisher.
enum Mapped {
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

struct Stream<'a> {
    cfg: &'a PublisherConfig,
    info: ConnInfo,
    mariadb: bool,
    context_table: (String, String),
    metas: HashMap<(String, String), TableMeta>,
    metas_stale: bool,
    tables: HashMap<u64, Mapped>,
    asm: Assembler,
    group: Option<Group>,
    resume: Resume,
    /// Binlog file being read and the offset after the last event.
    file: String,
    next_pos: u64,
    tx: mpsc::Sender<Item>,
}

/// Checks the server, then streams the binlog from the checkpoint (or from the server's
/// current position, starting a new generation) until shutdown or an error.
pub async fn stream(
    cfg: &PublisherConfig,
    my: &MysqlSource,
    checkpoint: Option<Checkpoint>,
    checkpoint_path: &Path,
    tx: mpsc::Sender<Item>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PublisherError> {
    let info = ConnInfo::parse(my)?;
    let mut sql = info.connect().await?;
    let server = catalog::check_server(&mut sql, &info.user).await?;
    let metas = catalog::check_tables(&mut sql, &server, cfg, &info.user, &info.database).await?;
    let (state, resume) = match checkpoint {
        Some(cp) if cp.state.key_space != cfg.tuning.key_space => {
            return Err(SourceError::KeySpaceChanged {
                configured: cfg.tuning.key_space,
                checkpointed: cp.state.key_space,
                checkpoint: checkpoint_path.display().to_string(),
            }
            .into())
        }
        Some(cp) => {
            let resume =
                Resume::parse(&cp.resume).ok_or_else(|| SourceError::ForeignCheckpoint {
                    checkpoint: checkpoint_path.display().to_string(),
                })?;
            (cp.state, resume)
        }
        None => {
            let token = catalog::current_position(&mut sql, &server).await?;
            let resume = Resume::parse(&token).ok_or_else(|| SourceError::BinlogDecode {
                table: "-".into(),
                detail: format!("unexpected server position {token:?}"),
            })?;
            // From the server's current binlog position.
            let state = TrackerState::new_generation(cfg.tuning.key_space, checkpoint_path);
            // The binlog has no slot holding this position for us: write it down before
            // streaming, or a publisher stopped before its first transaction would start
            // the next time from a later position and skip what was committed between.
            let first = Checkpoint {
                position: 0,
                resume: resume.to_string(),
                state: state.clone(),
            };
            crate::checkpoint::persist(checkpoint_path, first).await?;
            (state, resume)
        }
    };
    tracing::info!(server = %server.version, resume = %resume, generation = state.generation,
        next_seq = state.next_seq, server_id = server_id(cfg, my), "starting binlog stream");

    let key_columns = cfg
        .tables
        .iter()
        .filter_map(|t| {
            let meta = metas.get(&table_qualified(t, &info.database))?;
            Some((
                t.published_name(),
                meta.key.iter().map(|k| t.published_column(k)).collect(),
            ))
        })
        .collect();
    let asm = Assembler::new(
        &cfg.namespace,
        cfg.tuning.key_space,
        cfg.tuning.max_part_changes,
        Tracker::new(state),
        key_columns,
    );
    let (file, next_pos) = match &resume {
        Resume::File { file, pos } => (file.clone(), *pos),
        Resume::Gtid(_) => (String::new(), 4),
    };
    let context_table = qualified(
        my.context_table.as_deref().unwrap_or(DEFAULT_CONTEXT_TABLE),
        &info.database,
    );
    let mut s = Stream {
        cfg,
        info,
        mariadb: server.mariadb,
        context_table,
        metas,
        metas_stale: false,
        tables: HashMap::new(),
        asm,
        group: None,
        resume,
        file,
        next_pos,
        tx,
    };

    let mut binlog = open_binlog(&s.info, &server, &s.resume, server_id(cfg, my)).await?;
    let interval = Duration::from_millis(cfg.checkpoint.interval_ms);
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    let mut last_marker = Instant::now();
    let mut dirty = false;
    let mut first = true;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                if s.group.is_none() && dirty {
                    let _ = s.tx.send(s.marker()).await;
                }
                drop(binlog);
                let _ = sql.disconnect().await;
                return Ok(());
            }
            _ = tick.tick() => {
                if dirty && s.group.is_none() && last_marker.elapsed() >= interval {
                    send(&s.tx, s.marker()).await?;
                    dirty = false;
                    last_marker = Instant::now();
                }
            }
            event = tokio::time::timeout(SILENCE_LIMIT, binlog.next()) => {
                let event = match event {
                    Err(_) => return Err(SourceError::BinlogSilent { seconds: SILENCE_LIMIT.as_secs() }.into()),
                    Ok(None) => return Err(SourceError::Binlog(mysql_async::Error::Other(
                        "the server closed the binlog stream".into())).into()),
                    Ok(Some(Err(mysql_async::Error::Server(e)))) if first && e.code == 1236 => {
                        return Err(SourceError::BinlogPurged {
                            position: s.resume.to_string(),
                            detail: e.message,
                        }.into());
                    }
                    Ok(Some(Err(e))) => return Err(SourceError::Binlog(e).into()),
                    Ok(Some(Ok(event))) => event,
                };
                first = false;
                let header = event.header();
                if header.log_pos() != 0 {
                    s.next_pos = u64::from(header.log_pos());
                }
                if header.event_type_raw() == MARIADB_GTID_EVENT {
                    let gtid = parse_mariadb_gtid(event.data()).ok_or_else(|| SourceError::BinlogDecode {
                        table: "-".into(),
                        detail: "truncated MariaDB GTID event".into(),
                    })?;
                    let id = (gtid.domain, header.server_id(), gtid.seq);
                    s.open_group(Some(id), !gtid.standalone, i64::from(header.timestamp()) * 1_000_000);
                    continue;
                }
                let data = event.read_data().map_err(|e| SourceError::BinlogDecode {
                    table: "-".into(),
                    detail: e.to_string(),
                })?;
                match data {
                    Some(EventData::RotateEvent(r)) => {
                        s.file = clean_binlog_name(r.name_raw());
                        s.next_pos = r.position();
                    }
                    Some(EventData::GtidEvent(g)) => {
                        // MySQL: positions stay file/offset (see docs/publisher.md); the
                        // GTID event carries the commit time in microseconds.
                        let ts = g.immediate_commit_timestamp();
                        let ts = if ts > 0 { ts as i64 } else { i64::from(header.timestamp()) * 1_000_000 };
                        s.open_group(None, false, ts);
                    }
                    Some(EventData::QueryEvent(q)) => {
                        let text = q.query();
                        let stmt = text.trim();
                        if stmt.eq_ignore_ascii_case("BEGIN") {
                            if s.group.is_none() {
                                s.open_group(None, true, i64::from(header.timestamp()) * 1_000_000);
                            }
                            if let Some(g) = s.group.as_mut() {
                                g.begun = true;
                            }
                        } else if stmt.eq_ignore_ascii_case("COMMIT") {
                            s.commit().await?;
                            dirty = true;
                        } else {
                            // DDL (or a statement-logged change we cannot see row by row):
                            // forget table maps and re-read keys and foreign keys.
                            s.tables.clear();
                            s.metas_stale = true;
                            if let Some(name) = truncated_table(stmt, &q.schema()) {
                                s.truncate(&mut sql, name, header.timestamp()).await?;
                            }
                            if !s.group.as_ref().is_some_and(|g| g.begun) {
                                s.commit().await?;
                                dirty = true;
                            }
                        }
                    }
                    Some(EventData::TableMapEvent(tme)) => {
                        let id = tme.table_id();
                        if !s.tables.contains_key(&id) {
                            let mapped = s.map_table(&mut sql, &tme).await?;
                            s.tables.insert(id, mapped);
                        }
                    }
                    Some(EventData::RowsEvent(re)) => {
                        let Some(tme) = binlog.get_tme(re.table_id()) else {
                            return Err(SourceError::BinlogDecode {
                                table: "-".into(),
                                detail: format!("rows for unknown table id {}", re.table_id()),
                            }.into());
                        };
                        s.rows(&re, tme).await?;
                    }
                    Some(EventData::XidEvent(_)) => {
                        s.commit().await?;
                        dirty = true;
                    }
                    _ => {}
                }
                if dirty && s.group.is_none() && last_marker.elapsed() >= interval {
                    send(&s.tx, s.marker()).await?;
                    dirty = false;
                    last_marker = Instant::now();
                }
            }
        }
    }
}

async fn open_binlog(
    info: &ConnInfo,
    server: &Server,
    resume: &Resume,
    server_id: u32,
) -> Result<mysql_async::BinlogStream, SourceError> {
    let mut conn = info.connect().await?;
    let q = |context| move |source| SourceError::MysqlQuery { context, source };
    let heartbeat_ns = HEARTBEAT.as_nanos() as u64;
    conn.query_drop(format!("SET @master_heartbeat_period = {heartbeat_ns}"))
        .await
        .map_err(q("set the heartbeat period"))?;
    if server.mariadb {
        // Capability 4 (MARIA_SLAVE_CAPABILITY_GTID): send GTID events as they are.
        conn.query_drop("SET @mariadb_slave_capability = 4")
            .await
            .map_err(q("announce replica capabilities"))?;
    }
    let request = BinlogStreamRequest::new(server_id);
    let request = match resume {
        Resume::Gtid(_) => {
            let state = resume.connect_state().unwrap_or_default();
            conn.exec_drop(
                "SET @slave_connect_state = ?, @slave_gtid_strict_mode = 1",
                (state,),
            )
            .await
            .map_err(q("set the GTID start position"))?;
            request.with_filename(b"").with_pos(4u64)
        }
        Resume::File { file, pos } => request.with_filename(file.as_bytes()).with_pos(*pos),
    };
    conn.get_binlog_stream(request).await.map_err(|e| match e {
        mysql_async::Error::Server(ref se) if se.code == 1236 => SourceError::BinlogPurged {
            position: resume.to_string(),
            detail: se.message.clone(),
        },
        e => SourceError::Binlog(e),
    })
}

async fn send(tx: &mpsc::Sender<Item>, item: Item) -> Result<(), PublisherError> {
    // The publish loop only goes away when it failed; its error is the one reported.
    tx.send(item)
        .await
        .map_err(|_| SourceError::PublisherGone.into())
}

impl Stream<'_> {
    fn marker(&self) -> Item {
        Item::Marker(Box::new(Checkpoint {
            position: 0,
            resume: self.resume.to_string(),
            state: self.asm.tracker.state.clone(),
        }))
    }

    fn open_group(&mut self, gtid: Option<(u32, u32, u64)>, begun: bool, commit_ts_us: i64) {
        let (position, txid) = match gtid {
            Some((d, sv, n)) => (format!("mysql:{d}-{sv}-{n}"), format!("{d}-{sv}-{n}")),
            None => {
                let at = format!("{}:{}", self.file, self.next_pos);
                (format!("mysql:{at}"), at)
            }
        };
        self.asm.begin_at(position, txid, commit_ts_us);
        self.group = Some(Group { gtid, begun });
    }

    /// Ends the open group: publishes what it changed and moves the resume position.
    async fn commit(&mut self) -> Result<(), PublisherError> {
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        if let Some(last) = self.asm.commit() {
            send(&self.tx, Item::Envelope(last)).await?;
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
}
