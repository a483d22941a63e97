//! Bootstrap (initial sync) on the publisher side: the current rows of a table, in
//! chunks, to one subscriber's queue, interleaved with the live stream — without a long
//! transaction or a lock (watermarks, as DBLog; the argument is in `docs/bootstrap.md`).
//!
//! Per chunk: a low watermark goes into the WAL (a non-transactional logical message),
//! the chunk is read in its own short transaction (keyset pagination on the key; the
//! snapshot is noted), a high watermark follows. The stream, when it reaches the low
//! watermark, starts noting the keys of that table changed by transactions it
//! publishes; at the high watermark it drops those rows from the chunk (the stream
//! carries newer values for them) and publishes the rest, stamped with the sequence
//! number of the last transaction before it, straight to the subscriber's queue — unless
//! the snapshot missed a transaction the stream decoded before the low watermark
//! (`windows`): then the chunk is read again.

mod held;
mod reader;
mod windows;

pub use windows::{PgSnapshot, Windows};

use crate::config::PublisherConfig;
use crate::error::{PublisherError, SourceError};
use crate::publish::Stats;
use crate::source::postgres::catalog::ConnInfo;
use held::Held;
use kausal_bus::amqp::AmqpConsumer;
use kausal_bus::bootstrap::{control_queue_spec, BootstrapRequest, TableRequest};
use kausal_bus::Snapshot;
use reader::Reader;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use windows::{Mark, Outcome, Window};

/// Prefix of the watermark messages in the WAL.
pub const WATERMARK_PREFIX: &str = "kausal-bootstrap";
/// Prefix of the (empty) transactional message that makes a high watermark flushed.
const FLUSH_PREFIX: &str = "kausal-flush";
/// How long a chunk may wait for the stream to reach its high watermark before it is
/// read again (the stream restarted in between, say).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);
const CHUNK_ATTEMPTS: u32 = 5;
/// Reads of one chunk that may each find a committed transaction not yet visible.
const STALE_ATTEMPTS: u32 = 100;
/// How often an idle bootstrap task lets the stream forget old transaction ids.
const FLOOR_INTERVAL: Duration = Duration::from_secs(10);

/// Rows of a chunk: (key, row), published names.
type Rows = Vec<(Map<String, Value>, Map<String, Value>)>;

/// Serves bootstrap requests for as long as the stream runs. A transient failure (the
/// broker node holding the control queue lost, the source connection dropped) ends
/// the requests in progress (they are redelivered) and serving starts again after a
/// backoff, while the stream goes on: the changes keep flowing when bootstraps cannot.
pub async fn serve_while_streaming(
    cfg: Arc<PublisherConfig>,
    conn: ConnInfo,
    windows: Arc<Windows>,
    stats: Arc<Stats>,
) -> Result<(), PublisherError> {
    let conn = Arc::new(conn);
    let mut backoff = Duration::from_millis(250);
    loop {
        let started = std::time::Instant::now();
        let served = serve(cfg.clone(), conn.clone(), windows.clone(), stats.clone()).await;
        // The tasks answering requests ended with `serve`: their chunks never complete.
        windows.forget_requests();
        stats
            .bootstrap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        match served {
            // The broker ended the consumer (the control queue deleted): declare it
            // again, as after any other lost connection.
            Ok(()) => tracing::warn!(
                retry_in_ms = backoff.as_millis() as u64,
                "the broker ended the bootstrap control queue's consumer; serving starts again"
            ),
            Err(error) if error.class() == crate::ErrorClass::Definite => return Err(error),
            Err(error) => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(250);
                }
                tracing::warn!(error = %kausal_bus::error_chain(&error),
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot serve bootstrap requests; the stream goes on, serving starts again");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Takes bootstrap requests from the namespace's control queue and answers up to
/// `tuning.bootstrap_requests` of them at once, each over a source connection of its
/// own, until the stream ends (the caller aborts this task; the answers in progress
/// end with it). A request is acked when its last chunk went out, so a publisher crash
/// leaves it for the next start.
async fn serve(
    cfg: Arc<PublisherConfig>,
    conn: Arc<ConnInfo>,
    windows: Arc<Windows>,
    stats: Arc<Stats>,
) -> Result<(), PublisherError> {
    // Nothing is declared before the stream passed its checks: a publisher refused at
    // preflight (a table without a key, say) leaves no control queue behind. Requests
    // sent meanwhile wait in the queue if it exists, and subscribers ask again otherwise.
    windows.until_stream_started().await;
    let mut spec = control_queue_spec(&cfg.namespace);
    spec.quorum = cfg.broker.queue_type == kausal_bus::amqp::QueueType::Quorum;
    // The prefetch window is the bound: the broker hands out no more requests than are
    // answered (or wait for a namesake) at once, the rest stay queued in order.
    spec.prefetch = u16::try_from(cfg.tuning.bootstrap_requests).unwrap_or(u16::MAX);
    let mut consumer = AmqpConsumer::connect(&cfg.broker.url, &cfg.broker.exchange, &spec).await?;
    let client = conn.connect().await?;
    let mut held = Held::new(stats);
    let mut answering: JoinSet<Result<(), PublisherError>> = JoinSet::new();
    let mut reported: std::collections::HashMap<String, std::time::Instant> = Default::default();
    let mut tick = tokio::time::interval(FLOOR_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Tell the stream which transaction ids every later chunk's snapshot
                // will show, so it forgets them.
                set_floor(&client, &windows).await?;
                report_missing_tables(&client, &cfg, &mut reported).await?;
            }
            next = consumer.next() => {
                let Some(delivery) = next else { break };
                let delivery = delivery?;
                match serde_json::from_slice::<BootstrapRequest>(&delivery.body) {
                    Ok(request) => {
                        tracing::info!(request = %request.request, queue = %request.queue,
                            tables = request.tables.len(), "bootstrap requested");
                        held.push(delivery, request);
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "not a bootstrap request; dead-lettered");
                        consumer
                            .send_to_dead_letters(delivery.body.clone(), &error.to_string())
                            .await?;
                        delivery.ack().await?;
                    }
                }
            }
            Some(joined) = answering.join_next_with_id() => {
                let (id, answered) = match joined {
                    Ok((id, answered)) => (id, answered),
                    Err(e) if e.is_panic() => (e.id(), Err(SourceError::Bootstrap {
                        table: String::new(),
                        reason: "the task answering it panicked".into(),
                    }.into())),
                    Err(e) => (e.id(), Ok(())),
                };
                let Some((delivery, request)) = held.finish(id) else { continue };
                windows.end_request(&request.request);
                match answered {
                    Ok(()) => tracing::info!(request = %request.request, "bootstrap sent"),
                    // A request that fails is dead-lettered with the reason, not
                    // retried at every start: the stream goes on (the subscriber asks
                    // again).
                    Err(error) => {
                        tracing::error!(request = %request.request, error = %error,
                            "bootstrap request failed; dead-lettered");
                        consumer
                            .send_to_dead_letters(delivery.body.clone(), &error.to_string())
                            .await?;
                    }
                }
                delivery.ack().await?;
            }
        }
        // Start every held request whose name is not being answered already (a
        // subscriber that asked again reuses the name, and chunk ids carry it).
        for (request, wait) in held.startable() {
            let (cfg, conn, windows) = (cfg.clone(), conn.clone(), windows.clone());
            let task = answering.spawn(async move {
                let client = conn.connect().await?;
                answer(&cfg, &client, &windows, &request).await
            });
            held.started(wait, task.id());
        }
    }
    Ok(())
}

/// A published table dropped (or renamed) at the source sends nothing through the WAL:
/// say so loudly, once a minute, while the other tables keep flowing. A restart refuses
/// to start until the configuration no longer lists it.
async fn report_missing_tables(
    client: &tokio_postgres::Client,
    cfg: &PublisherConfig,
    reported: &mut std::collections::HashMap<String, std::time::Instant>,
) -> Result<(), SourceError> {
    for table in crate::source::postgres::catalog::missing_tables(client, cfg).await? {
        if reported
            .get(&table)
            .is_some_and(|at| at.elapsed() < Duration::from_secs(60))
        {
            continue;
        }
        tracing::error!(
            table = %table,
            "a published table no longer exists at the source (dropped or renamed): \
             its changes up to the drop are published; remove it from [[table]] (or \
             publish the new name) before the next restart, and drop or keep its \
             rows at the subscribers"
        );
        reported.insert(table, std::time::Instant::now());
    }
    Ok(())
}

/// Sends every table of `request`, chunk by chunk.
async fn answer(
    cfg: &PublisherConfig,
    client: &tokio_postgres::Client,
    windows: &Windows,
    request: &BootstrapRequest,
) -> Result<(), PublisherError> {
    for tr in &request.tables {
        let Some(t) = cfg.tables.iter().find(|t| t.published_name() == tr.table) else {
            tracing::warn!(request = %request.request, table = %tr.table,
                "bootstrap of a table this publisher does not publish: skipped");
            continue;
        };
        let reader = Reader::new(client, t).await?;
        let mut after = tr.after.clone();
        let mut chunk = 0;
        loop {
            let (last_key, done) =
                send_chunk(client, windows, request, tr, &reader, chunk, after.clone()).await?;
            if done {
                break;
            }
            after = last_key;
            chunk += 1;
        }
    }
    Ok(())
}

/// One chunk between its watermarks; returns its last key and whether it was the last.
async fn send_chunk(
    client: &tokio_postgres::Client,
    windows: &Windows,
    request: &BootstrapRequest,
    tr: &TableRequest,
    reader: &Reader,
    chunk: u64,
    after: Option<Map<String, Value>>,
) -> Result<(Option<Map<String, Value>>, bool), PublisherError> {
    let (mut timeouts, mut stale) = (0, 0);
    for attempt in 1.. {
        let id = format!("{}/{}/{chunk}/{attempt}", request.request, tr.table);
        let (done_tx, done_rx) = oneshot::channel();
        let snapshot = Snapshot {
            request: request.request.clone(),
            table: tr.table.clone(),
            chunk,
            last_key: None,
            done: false,
            estimated_rows: reader.estimated_rows,
            join_after: None,
        };
        let window = Window::new(
            request.queue.clone(),
            snapshot,
            reader.schema.clone(),
            done_tx,
        );
        windows.open(&id, window);
        emit(client, &id, false).await?;
        let limit = request.chunk_rows.max(1);
        let (rows, pg_snapshot) = match reader.read(client, after.as_ref(), limit).await {
            Ok(read) => read,
            Err(error) => {
                windows.close(&id);
                return Err(error.into());
            }
        };
        let last = rows.len() < limit;
        let last_key = rows.last().map(|(k, _)| k.clone());
        let window_key = last_key.clone().or_else(|| after.clone());
        windows.set_rows(&id, rows, pg_snapshot, window_key, last);
        emit(client, &id, true).await?;
        match tokio::time::timeout(CHUNK_TIMEOUT, done_rx).await {
            Ok(Ok(Outcome::Published)) => return Ok((last_key, last)),
            Ok(Ok(Outcome::Stale)) => {
                // A transaction that had committed in the WAL was still becoming
                // visible: it is gone in a moment.
                stale += 1;
                tracing::debug!(chunk = %id, attempt, "chunk read before a committed transaction was visible; reading it again");
                if stale >= STALE_ATTEMPTS {
                    return Err(SourceError::Bootstrap {
                        table: tr.table.clone(),
                        reason: format!(
                            "{STALE_ATTEMPTS} reads of one chunk each missed a transaction that \
                             had committed before it (a synchronous standby not answering?)"
                        ),
                    }
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(10 * u64::from(stale.min(20)))).await;
            }
            _ => {
                windows.close(&id);
                timeouts += 1;
                tracing::warn!(chunk = %id, attempt,
                    "the stream did not reach the chunk's high watermark; reading it again");
                if timeouts >= CHUNK_ATTEMPTS {
                    break;
                }
            }
        }
    }
    Err(SourceError::Bootstrap {
        table: tr.table.clone(),
        reason: format!("the stream never reached a high watermark in {CHUNK_ATTEMPTS} attempts"),
    }
    .into())
}

/// Forgets, in the stream, the transactions every snapshot taken from now on shows.
async fn set_floor(client: &tokio_postgres::Client, windows: &Windows) -> Result<(), SourceError> {
    let text: String = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(|source| SourceError::Query {
            context: "take a snapshot",
            source,
        })?
        .get(0);
    if let Some(snapshot) = PgSnapshot::parse(&text) {
        windows.set_floor(snapshot.xmin);
    }
    Ok(())
}

async fn emit(client: &tokio_postgres::Client, chunk: &str, high: bool) -> Result<(), SourceError> {
    let mark = serde_json::to_string(&Mark {
        chunk: chunk.to_string(),
        high,
    })
    .unwrap_or_default();
    client
        .execute(
            "SELECT pg_logical_emit_message(false, $1, $2::text)",
            &[&WATERMARK_PREFIX, &mark],
        )
        .await
        .map_err(|source| SourceError::Query {
            context: "write a bootstrap watermark",
            source,
        })?;
    if high {
        // A non-transactional message is not flushed by itself: on a quiet source the
        // walsender sends it only when the WAL writer next flushes (`wal_writer_delay`,
        // 200 ms), and every chunk waits that long for its high watermark. A commit
        // flushes the WAL up to it, so one tiny transaction follows (a transactional
        // message gets an id; the stream sees an empty transaction and skips it).
        // `local`: a synchronous standby that lags must not hold the bootstrap.
        client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL synchronous_commit = local; \
                 SELECT pg_logical_emit_message(true, '{FLUSH_PREFIX}', ''); COMMIT"
            ))
            .await
            .map_err(|source| SourceError::Query {
                context: "flush a bootstrap watermark",
                source,
            })?;
    }
    Ok(())
}
