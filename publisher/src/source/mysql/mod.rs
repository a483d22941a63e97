//! The MySQL / MariaDB source: the binlog, read as a replica through `mysql_async`'s
//! binlog stream. `events` decodes it into the shared vocabulary
//! ([`crate::source::change`]); the shared `source::driver` does the rest, exactly as
//! for Postgres.
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
use crate::config::{MysqlSource, PublisherConfig};
use crate::error::{PublisherError, SourceError};
use crate::source::driver::{self, ChangeLog, Feed, Start, Step, Wiring};
use catalog::{table_qualified, ConnInfo, Server};
use events::Decoder;
use futures_util::StreamExt;
use mysql_async::binlog::events::{Event, EventData};
use mysql_async::prelude::Queryable;
use mysql_async::BinlogStreamRequest;
use position::{clean_binlog_name, parse_mariadb_gtid, Resume, MARIADB_GTID_EVENT};
use std::time::Duration;

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

/// Checks the server, then streams the binlog from the checkpoint (or from the server's
/// current position, starting a new generation) until shutdown or an error.
pub(crate) async fn stream(
    cfg: &PublisherConfig,
    my: &MysqlSource,
    checkpoint: Option<Checkpoint>,
    wiring: Wiring,
) -> Result<(), PublisherError> {
    let info = ConnInfo::parse(my)?;
    let mut sql = info.connect().await?;
    let server = catalog::check_server(&mut sql, &info.user).await?;
    let metas = catalog::check_tables(&mut sql, &server, cfg, &info.user, &info.database).await?;
    let path = &wiring.checkpoint_path;
    let (state, resume) = match Start::decide(cfg, checkpoint, path)? {
        Start::Resume(cp) => {
            let resume =
                Resume::parse(&cp.resume).ok_or_else(|| SourceError::ForeignCheckpoint {
                    checkpoint: path.display().to_string(),
                })?;
            (cp.state, resume)
        }
        Start::Begin => {
            // From the server's current binlog position.
            let token = catalog::current_position(&mut sql, &server).await?;
            let resume = Resume::parse(&token).ok_or_else(|| SourceError::BinlogDecode {
                table: "-".into(),
                detail: format!("unexpected server position {token:?}"),
            })?;
            let state = driver::new_generation(cfg, path, 0, resume.to_string()).await?;
            (state, resume)
        }
    };
    let server_id = server_id(cfg, my);
    tracing::info!(server = %server.version, resume = %resume, generation = state.generation,
        next_seq = state.next_seq, server_id, "starting binlog stream");

    let key_columns = driver::key_columns(cfg, &metas, |t| table_qualified(t, &info.database));
    let binlog = open_binlog(&info, &server, &resume, server_id).await?;
    let log = Binlog {
        decoder: Decoder::new(cfg, my, info, server.mariadb, metas, resume),
        sql,
        binlog,
        first: true,
        heard: tokio::time::Instant::now(),
    };
    driver::run(cfg, log, state, key_columns, wiring).await
}

/// The open binlog stream, the SQL connection for catalog reads between its events, and
/// the decoder's state.
struct Binlog<'a> {
    decoder: Decoder<'a>,
    sql: mysql_async::Conn,
    binlog: mysql_async::BinlogStream,
    /// Nothing read yet: a "purged" error now means the start position is gone.
    first: bool,
    /// When the stream last delivered something. The silence limit counts from here,
    /// not from each `recv`: the driver's loop drops a pending `recv` whenever one of
    /// its timers fires first, which would restart a per-call timeout forever.
    heard: tokio::time::Instant,
}

impl ChangeLog for Binlog<'_> {
    type Event = Event;

    async fn recv(&mut self) -> Result<Option<Event>, PublisherError> {
        let deadline = self.heard + SILENCE_LIMIT;
        let event = match tokio::time::timeout_at(deadline, self.binlog.next()).await {
            Err(_) => {
                return Err(SourceError::BinlogSilent {
                    seconds: SILENCE_LIMIT.as_secs(),
                }
                .into())
            }
            Ok(None) => {
                return Err(SourceError::Binlog(mysql_async::Error::Other(
                    "the server closed the binlog stream".into(),
                ))
                .into())
            }
            Ok(Some(Err(mysql_async::Error::Server(e)))) if self.first && e.code == 1236 => {
                return Err(SourceError::BinlogPurged {
                    position: self.decoder.resume.to_string(),
                    detail: e.message,
                }
                .into());
            }
            Ok(Some(Err(e))) => return Err(SourceError::Binlog(e).into()),
            Ok(Some(Ok(event))) => event,
        };
        self.first = false;
        self.heard = tokio::time::Instant::now();
        Ok(Some(event))
    }

    async fn apply(&mut self, event: Event, feed: &mut Feed) -> Result<Step, PublisherError> {
        let d = &mut self.decoder;
        let header = event.header();
        if header.log_pos() != 0 {
            d.next_pos = u64::from(header.log_pos());
        }
        let header_ts_us = i64::from(header.timestamp()) * 1_000_000;
        if header.event_type_raw() == MARIADB_GTID_EVENT {
            let gtid =
                parse_mariadb_gtid(event.data()).ok_or_else(|| SourceError::BinlogDecode {
                    table: "-".into(),
                    detail: "truncated MariaDB GTID event".into(),
                })?;
            let id = (gtid.domain, header.server_id(), gtid.seq);
            d.open_group(feed, Some(id), !gtid.standalone, header_ts_us);
            return Ok(Step::Continue);
        }
        let data = event.read_data().map_err(|e| SourceError::BinlogDecode {
            table: "-".into(),
            detail: e.to_string(),
        })?;
        let committed = match data {
            Some(EventData::RotateEvent(r)) => {
                d.file = clean_binlog_name(r.name_raw());
                d.next_pos = r.position();
                false
            }
            Some(EventData::GtidEvent(g)) => {
                // MySQL: positions stay file/offset (see docs/publisher.md); the GTID
                // event carries the commit time in microseconds.
                let ts = g.immediate_commit_timestamp();
                let ts = if ts > 0 { ts as i64 } else { header_ts_us };
                d.open_group(feed, None, false, ts);
                false
            }
            Some(EventData::QueryEvent(q)) => {
                let text = q.query();
                let (stmt, schema) = (text.trim(), q.schema());
                d.statement(&mut self.sql, feed, stmt, &schema, header.timestamp())
                    .await?
            }
            Some(EventData::TableMapEvent(tme)) => {
                let id = tme.table_id();
                if !d.tables.contains_key(&id) {
                    let mapped = d.map_table(&mut self.sql, feed, &tme).await?;
                    d.tables.insert(id, mapped);
                }
                false
            }
            Some(EventData::RowsEvent(re)) => {
                let Some(tme) = self.binlog.get_tme(re.table_id()) else {
                    return Err(SourceError::BinlogDecode {
                        table: "-".into(),
                        detail: format!("rows for unknown table id {}", re.table_id()),
                    }
                    .into());
                };
                d.rows(feed, &re, tme).await?;
                false
            }
            Some(EventData::XidEvent(_)) => {
                d.commit(feed).await?;
                true
            }
            _ => false,
        };
        // Every group's end is checkpointed, even one that published nothing: the
        // checkpoint is the only record of how far the binlog was read.
        Ok(if committed {
            Step::Committed
        } else {
            Step::Continue
        })
    }

    fn position(&self) -> (u64, String) {
        (0, self.decoder.resume.to_string())
    }

    /// A binlog has no slot: there is nothing to confirm to the server.
    fn confirm(&mut self, _position: u64) {}

    async fn close(self) {
        drop(self.binlog);
        let _ = self.sql.disconnect().await;
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
