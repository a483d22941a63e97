//! Bootstrap (initial sync) on the publisher side: the current rows of a table, in
//! chunks, to one subscriber's queue, interleaved with the live stream — without a long
//! transaction or a lock (watermarks, as DBLog; the argument is in `docs/bootstrap.md`).
//!
//! Per chunk: a low watermark goes into the WAL (a non-transactional logical message),
//! the chunk is read in its own short statement (keyset pagination on the key), a high
//! watermark follows. The stream, when it reaches the low watermark, starts noting the
//! keys of that table changed by transactions it publishes; at the high watermark it
//! drops those rows from the chunk (the stream carries newer values for them) and
//! publishes the rest, stamped with the sequence number of the last transaction before
//! it, straight to the subscriber's queue.

use crate::config::{PublisherConfig, TableConfig};
use crate::error::{PublisherError, SourceError};
use crate::publish::Item;
use crate::source::postgres::catalog::{self, ConnInfo, TypeCache};
use crate::source::values::Conv;
use kausal_bus::amqp::AmqpConsumer;
use kausal_bus::bootstrap::{control_queue_spec, BootstrapRequest, TableRequest};
use kausal_bus::{Change, Column, Envelope, Op, Snapshot, TableSchema};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Prefix of the watermark messages in the WAL.
pub const WATERMARK_PREFIX: &str = "kausal-bootstrap";
/// How long a chunk may wait for the stream to reach its high watermark before it is
/// read again (the stream restarted in between, say).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);
const CHUNK_ATTEMPTS: u32 = 5;

/// Rows of a chunk: (key, row), published names.
type Rows = Vec<(Map<String, Value>, Map<String, Value>)>;

/// Chunks between their watermarks, shared by the bootstrap task and the stream.
#[derive(Default)]
pub struct Windows(Mutex<HashMap<String, Window>>);

struct Window {
    queue: String,
    snapshot: Snapshot,
    schema: TableSchema,
    open: bool,
    /// Keys (as JSON text) of the table changed since the low watermark.
    changed: HashSet<String>,
    /// The chunk's rows (key, row), set before the high watermark is written.
    rows: Option<Rows>,
    done: Option<oneshot::Sender<()>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Mark {
    chunk: String,
    high: bool,
}

impl Windows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Window>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes the keys `changes` touch in tables with an open window. Called by the
    /// stream for every envelope it publishes.
    pub fn record(&self, changes: &[Change]) {
        let mut windows = self.lock();
        if windows.values().all(|w| !w.open) {
            return;
        }
        for w in windows.values_mut().filter(|w| w.open) {
            for c in changes.iter().filter(|c| c.table == w.snapshot.table) {
                if c.op == Op::Truncate {
                    // Everything read before it is stale: the chunk goes out empty.
                    w.changed.insert(String::new());
                }
                w.changed.insert(key_text(&c.key));
                if let Some(old) = &c.old_key {
                    w.changed.insert(key_text(old));
                }
            }
        }
    }

    /// A watermark reached the stream. At a high one, returns the chunk to publish:
    /// its rows minus those changed in the window, versioned `last_seq`.
    pub fn mark(
        &self,
        content: &[u8],
        namespace: &str,
        generation: u64,
        last_seq: u64,
    ) -> Option<Item> {
        let mark: Mark = serde_json::from_slice(content).ok()?;
        let mut windows = self.lock();
        if !mark.high {
            if let Some(w) = windows.get_mut(&mark.chunk) {
                w.open = true;
            }
            return None;
        }
        let mut w = windows.remove(&mark.chunk)?;
        if !w.open {
            // Its low watermark was before this stream started: the window is
            // incomplete. The task reads the chunk again after its timeout.
            return None;
        }
        let truncated = w.changed.contains("");
        let changes = w
            .rows
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|(key, _)| !truncated && !w.changed.contains(&key_text(key)))
            .map(|(key, row)| Change {
                op: Op::Insert,
                table: w.snapshot.table.clone(),
                key,
                old_key: None,
                new: Some(row),
                old: None,
                unchanged: Vec::new(),
            })
            .collect();
        if let Some(done) = w.done.take() {
            let _ = done.send(());
        }
        let envelope = Envelope {
            namespace: namespace.to_string(),
            generation,
            seq: last_seq,
            part: 0,
            parts: Some(1),
            position: "bootstrap".into(),
            commit_ts_us: now_us(),
            txid: String::new(),
            context: Default::default(),
            schemas: vec![w.schema],
            changes,
            deps: Vec::new(),
            snapshot: Some(w.snapshot),
        };
        Some(Item::Direct {
            queue: w.queue,
            envelope: Box::new(envelope),
        })
    }
}

fn key_text(key: &Map<String, Value>) -> String {
    serde_json::to_string(key).unwrap_or_default()
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// Takes bootstrap requests from the namespace's control queue and answers them one at
/// a time, until the stream ends (the caller aborts this task). A request is acked
/// when its last chunk went out, so a publisher crash leaves it for the next start.
pub async fn serve(
    cfg: Arc<PublisherConfig>,
    conn: ConnInfo,
    windows: Arc<Windows>,
) -> Result<(), PublisherError> {
    let spec = control_queue_spec(&cfg.namespace);
    let mut consumer = AmqpConsumer::connect(&cfg.broker.url, &cfg.broker.exchange, &spec).await?;
    let client = conn.connect().await?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        match serde_json::from_slice::<BootstrapRequest>(&delivery.body) {
            Ok(request) => {
                tracing::info!(request = %request.request, queue = %request.queue,
                    tables = request.tables.len(), "bootstrap requested");
                // A request that fails is dead-lettered with the reason, not retried at
                // every start: the stream goes on (the subscriber asks again).
                match answer(&cfg, &client, &windows, &request).await {
                    Ok(()) => tracing::info!(request = %request.request, "bootstrap sent"),
                    Err(error) => {
                        tracing::error!(request = %request.request, error = %error,
                            "bootstrap request failed; dead-lettered");
                        consumer
                            .send_to_dead_letters(delivery.body.clone(), &error.to_string())
                            .await?;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "not a bootstrap request; dead-lettered");
                consumer
                    .send_to_dead_letters(delivery.body.clone(), &error.to_string())
                    .await?;
            }
        }
        delivery.ack().await?;
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
    for attempt in 1..=CHUNK_ATTEMPTS {
        let id = format!("{}/{}/{chunk}/{attempt}", request.request, tr.table);
        let (done_tx, done_rx) = oneshot::channel();
        windows.lock().insert(
            id.clone(),
            Window {
                queue: request.queue.clone(),
                snapshot: Snapshot {
                    request: request.request.clone(),
                    table: tr.table.clone(),
                    chunk,
                    last_key: None,
                    done: false,
                    estimated_rows: reader.estimated_rows,
                },
                schema: reader.schema.clone(),
                open: false,
                changed: HashSet::new(),
                rows: None,
                done: Some(done_tx),
            },
        );
        emit(client, &id, false).await?;
        let rows = reader
            .read(client, after.as_ref(), request.chunk_rows.max(1))
            .await?;
        let last = rows.len() < request.chunk_rows.max(1);
        let last_key = rows.last().map(|(k, _)| k.clone());
        if let Some(w) = windows.lock().get_mut(&id) {
            w.snapshot.last_key = last_key.clone().or_else(|| after.clone());
            w.snapshot.done = last;
            w.rows = Some(rows);
        }
        emit(client, &id, true).await?;
        match tokio::time::timeout(CHUNK_TIMEOUT, done_rx).await {
            Ok(Ok(())) => return Ok((last_key, last)),
            _ => {
                windows.lock().remove(&id);
                tracing::warn!(chunk = %id, attempt,
                    "the stream did not reach the chunk's high watermark; reading it again");
            }
        }
    }
    Err(SourceError::Bootstrap {
        table: tr.table.clone(),
        reason: format!("the stream never reached a high watermark in {CHUNK_ATTEMPTS} attempts"),
    }
    .into())
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
    Ok(())
}

/// How to read one table's rows as the stream would publish them.
struct Reader {
    sql: String,
    /// Published name and conversion of each selected column, key columns first.
    columns: Vec<(String, Conv)>,
    /// Published names of the key columns (the first `key_len` selected ones).
    key_len: usize,
    schema: TableSchema,
    estimated_rows: u64,
}

impl Reader {
    async fn new(client: &tokio_postgres::Client, t: &TableConfig) -> Result<Reader, SourceError> {
        let (schema_name, table) = t.qualified();
        let display = format!("{schema_name}.{table}");
        let meta = catalog::table_meta(client, &schema_name, &table)
            .await?
            .ok_or_else(|| SourceError::Bootstrap {
                table: display.clone(),
                reason: "the table does not exist".into(),
            })?;
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid FROM pg_attribute a WHERE a.attrelid = $1 \
                 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&meta.oid],
            )
            .await
            .map_err(|source| SourceError::Query {
                context: "read columns for a bootstrap",
                source,
            })?;
        let cols: Vec<(String, u32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut types = TypeCache::default();
        let oids: Vec<u32> = cols.iter().map(|(_, o)| *o).collect();
        types.resolve(client, &oids).await?;
        // Key columns first (in key order), then the other published columns.
        let mut selected: Vec<(String, u32)> = Vec::new();
        for k in &meta.key {
            if let Some(c) = cols.iter().find(|(n, _)| n == k) {
                selected.push(c.clone());
            }
        }
        for c in &cols {
            if t.publishes(&c.0) && !meta.key.contains(&c.0) {
                selected.push(c.clone());
            }
        }
        let ident = catalog::ident;
        // Qualified with the table's alias: in ORDER BY a bare name would mean the
        // selected `::text` column of the same name, and sort as text.
        let key_list: Vec<String> = meta.key.iter().map(|k| format!("t.{}", ident(k))).collect();
        let params: Vec<String> = meta
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let oid = cols.iter().find(|(n, _)| n == k).map_or(25, |c| c.1);
                format!("CAST(${}::text AS {})", i + 1, types.get(oid).0)
            })
            .collect();
        let select: Vec<String> = selected
            .iter()
            // The type's output function, as pgoutput sends values: a `::text` cast
            // differs for some types (bool gives `true`, inet adds `/32`).
            .map(|(n, _)| {
                let c = format!("t.{}", ident(n));
                format!("CASE WHEN {c} IS NULL THEN NULL ELSE format('%s', {c}) END")
            })
            .collect();
        let from = format!("{} AS t", catalog::qualified_ident(&schema_name, &table));
        let order = key_list.join(", ");
        // `$n` is the limit; the key parameters come first (absent on the first chunk).
        let n = meta.key.len() + 1;
        let sql = format!(
            "SELECT {} FROM {from} WHERE NOT ${}::bool OR ({order}) > ({}) \
             ORDER BY {order} LIMIT ${n}::int8",
            select.join(", "),
            n + 1,
            params.join(", ")
        );
        let columns = selected
            .iter()
            .map(|(name, oid)| (t.published_column(name), types.get(*oid).1))
            .collect();
        let schema = TableSchema {
            table: t.published_name(),
            columns: cols
                .iter()
                .filter(|(n, _)| t.publishes(n) || meta.key.contains(n))
                .map(|(n, oid)| Column {
                    name: t.published_column(n),
                    type_name: types.get(*oid).0,
                })
                .collect(),
            key: meta.key.iter().map(|k| t.published_column(k)).collect(),
            changed: false,
        };
        let estimated: f32 = client
            .query_one(
                "SELECT reltuples FROM pg_class WHERE oid = $1",
                &[&meta.oid],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0.0);
        Ok(Reader {
            sql,
            columns,
            key_len: meta.key.len(),
            schema,
            estimated_rows: estimated.max(0.0) as u64,
        })
    }

    /// Up to `limit` rows after `after` in key order, as (key, row) in published names.
    async fn read(
        &self,
        client: &tokio_postgres::Client,
        after: Option<&Map<String, Value>>,
        limit: usize,
    ) -> Result<Rows, SourceError> {
        let key_texts: Vec<Option<String>> = self.columns[..self.key_len]
            .iter()
            .map(|(name, _)| {
                after.and_then(|a| a.get(name)).map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            })
            .collect();
        let limit = limit as i64;
        let has_after = after.is_some();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        for k in &key_texts {
            params.push(k);
        }
        params.push(&limit);
        params.push(&has_after);
        let rows = client
            .query(self.sql.as_str(), &params)
            .await
            .map_err(|source| SourceError::Query {
                context: "read a bootstrap chunk",
                source,
            })?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut key = Map::new();
            let mut values = Map::new();
            for (i, (name, conv)) in self.columns.iter().enumerate() {
                let text: Option<String> = row.get(i);
                let value = text.map_or(Value::Null, |t| conv.convert(t.as_bytes()));
                if i < self.key_len {
                    key.insert(name.clone(), value.clone());
                }
                values.insert(name.clone(), value);
            }
            out.push((key, values));
        }
        Ok(out)
    }
}
