//! The Redis cache sink: subscribed rows written to Redis as they change, so readers
//! find the new value right after the transaction is applied (refresh, not invalidate).
//!
//! Keys: `<prefix>:<table>:<key>` (destination table name; key values in key order,
//! joined by `:`, strings as they are, numbers in decimal). A row is a hash (one field
//! per non-null column, values as text; JSON values as JSON text) or, with
//! `format = "json"`, a string holding the row as a JSON object. An optional TTL is set
//! on every write. Deletes remove the key.
//!
//! Versions: every write goes through one Lua script that compares the row version
//! `<generation>:<seq>` with the version kept for the row in `<prefix>:_v:<table>` (a
//! hash, one field per key, kept after a delete as its tombstone) and with the table's
//! truncate floor `<prefix>:_truncated:<table>`; an older version is skipped (an equal
//! one is the same transaction changing the row again, or its replay: same result).
//! The changes of a whole group go in one `MULTI`/`EXEC`, sent when the store is about to
//! commit ([`Sink::flush`]): one round trip per group, and a reader sees all of a source
//! transaction or none of it. Exceptions: a truncate (done with `SCAN`) sends what came
//! before it first, and a group whose writes pass [`SEND_AT`] commands is sent at the
//! next transaction boundary (a split transaction, applied part by part, per part).

use super::{Sink, SinkFuture};
use crate::error::{ErrorClass, SinkError};
use crate::txn::{RowChange, Transaction};
use kausal_bus::Op;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSinkConfig {
    /// `redis://host:6379/db`.
    pub url: String,
    /// Key prefix: rows are at `<prefix>:<table>:<key>`. Default `cache`.
    #[serde(default = "default_cache_prefix")]
    pub prefix: String,
    /// `hash` (default) or `json`.
    #[serde(default)]
    pub format: crate::sink::redis::CacheFormat,
    /// Expiry set on every write, in seconds; 0 (default) keeps rows until deleted.
    #[serde(default)]
    pub ttl_seconds: u64,
    /// Destination tables cached; default: every subscribed table.
    #[serde(default)]
    pub tables: Option<Vec<String>>,
}

impl std::fmt::Debug for RedisSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSinkConfig")
            .field("url", &kausal_bus::amqp::redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("format", &self.format)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("tables", &self.tables)
            .finish()
    }
}

fn default_cache_prefix() -> String {
    "cache".into()
}
use std::collections::HashSet;

/// KEYS: data key, versions hash, truncate floor. ARGV: row field, generation, seq, op
/// (`hash`, `hash-merge`, `json`, `del`), ttl seconds, then the payload (hash: field,
/// value, …; json: the document).
const WRITE: &str = r#"
local g, s = tonumber(ARGV[2]), tonumber(ARGV[3])
local function older(stored)
  if not stored then return false end
  local sg, ss = string.match(stored, '^(%d+):(%d+)$')
  sg, ss = tonumber(sg), tonumber(ss)
  if g ~= sg then return g < sg end
  return s < ss
end
if older(redis.call('HGET', KEYS[2], ARGV[1])) then return 0 end
if older(redis.call('GET', KEYS[3])) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
local op = ARGV[4]
if op ~= 'hash-merge' then redis.call('DEL', KEYS[1]) end
if op == 'del' then return 1 end
if op == 'json' then
  redis.call('SET', KEYS[1], ARGV[6])
else
  redis.call('HSET', KEYS[1], unpack(ARGV, 6))
end
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"#;

/// KEYS: truncate floor, versions hash. ARGV: generation, seq. Returns 1 when the
/// truncate is newer than the floor (the caller then deletes the table's keys).
const TRUNCATE: &str = r#"
local stored = redis.call('GET', KEYS[1])
if stored then
  local sg, ss = string.match(stored, '^(%d+):(%d+)$')
  local g, s = tonumber(ARGV[1]), tonumber(ARGV[2])
  sg, ss = tonumber(sg), tonumber(ss)
  if g < sg or (g == sg and s <= ss) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"#;

/// How rows are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheFormat {
    /// A hash per row, one field per non-null column.
    #[default]
    Hash,
    /// A string per row holding the row as a JSON object (types kept).
    Json,
}

/// Buffered commands past which a group's writes are sent at the next transaction
/// boundary, so the buffer stays bounded.
const SEND_AT: usize = 10_000;

/// The writes of the groups being applied, not sent yet (shared by the appliers of the
/// process: a group's flush sends the others' writes too, as their applies did before).
struct Buffer {
    pipe: redis::Pipeline,
    pending: usize,
}

impl Buffer {
    fn new() -> Buffer {
        let mut pipe = redis::pipe();
        pipe.atomic();
        Buffer { pipe, pending: 0 }
    }
}

pub struct RedisSink {
    name: String,
    buffer: std::sync::Mutex<Buffer>,
    conn: ConnectionManager,
    prefix: String,
    format: CacheFormat,
    ttl: u64,
    tables: Option<HashSet<String>>,
}

impl RedisSink {
    pub async fn connect(cfg: &RedisSinkConfig) -> Result<RedisSink, SinkError> {
        let endpoint = kausal_bus::amqp::redact_url(&cfg.url);
        let name = format!("redis {endpoint} ({})", cfg.prefix);
        let tls = cfg.url.starts_with("rediss://");
        let failed = |e: redis::RedisError| super::connect_failed(&name, tls, &e, "Redis");
        let client = crate::tls::redis_client(&cfg.url).map_err(|e| match e {
            crate::tls::RedisClientError::Settings(e) => SinkError::External {
                sink: name.clone(),
                message: e.to_string(),
                class: ErrorClass::Definite,
                source: None,
            },
            crate::tls::RedisClientError::Redis(e) => failed(e),
        })?;
        let conn = ConnectionManager::new(client).await.map_err(failed)?;
        Ok(RedisSink {
            name: name.clone(),
            buffer: std::sync::Mutex::new(Buffer::new()),
            conn,
            prefix: cfg.prefix.clone(),
            format: cfg.format,
            ttl: cfg.ttl_seconds,
            tables: cfg.tables.as_ref().map(|t| t.iter().cloned().collect()),
        })
    }

    /// The Redis key of a row: `<prefix>:<table>:<key values joined by ':'>`.
    pub fn key(&self, table: &str, key_columns: &[String], key: &Map<String, Value>) -> String {
        let mut out = format!("{}:{table}", self.prefix);
        for c in key_columns {
            out.push(':');
            match key.get(c) {
                Some(Value::String(s)) => out.push_str(s),
                Some(v) => out.push_str(&v.to_string()),
                None => {}
            }
        }
        out
    }

    fn error(&self, e: redis::RedisError) -> SinkError {
        let transient = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_cluster_error();
        SinkError::External {
            sink: self.name.clone(),
            message: e.to_string(),
            class: if transient {
                ErrorClass::Transient
            } else {
                ErrorClass::Definite
            },
            source: Some(Box::new(e)),
        }
    }

    fn wanted(&self, change: &RowChange) -> bool {
        self.tables
            .as_ref()
            .is_none_or(|t| t.contains(&change.shape.name))
    }

    /// Adds the writes of one row change to `pipe`.
    fn push(
        &self,
        pipe: &mut redis::Pipeline,
        tx: &Transaction,
        change: &RowChange,
    ) -> Result<(), SinkError> {
        let table = &change.shape.name;
        let versions = format!("{}:_v:{table}", self.prefix);
        let floor = format!("{}:_truncated:{table}", self.prefix);
        let (g, s) = (tx.id.generation, tx.id.seq);
        let mut script = |key: String, op: &str, payload: Vec<String>| {
            let field = key
                .get(self.prefix.len() + table.len() + 2..)
                .unwrap_or_default()
                .to_string();
            let cmd = pipe
                .cmd("EVAL")
                .arg(WRITE)
                .arg(3)
                .arg(&key)
                .arg(&versions)
                .arg(&floor)
                .arg(field)
                .arg(g)
                .arg(s)
                .arg(op)
                .arg(self.ttl);
            for p in payload {
                cmd.arg(p);
            }
            cmd.ignore();
        };
        let key_of = |k: &Map<String, Value>| self.key(table, &change.shape.key, k);
        match change.op {
            Op::Truncate => {}
            Op::Delete => script(key_of(&change.key), "del", Vec::new()),
            Op::Insert | Op::Update => {
                if let Some(old) = change.old_key.as_ref().filter(|o| **o != change.key) {
                    script(key_of(old), "del", Vec::new());
                }
                let row = change.new.clone().unwrap_or_default();
                match self.format {
                    CacheFormat::Json if !change.unchanged.is_empty() => {
                        return Err(SinkError::External {
                            sink: self.name.clone(),
                            message: format!(
                                "table {table}: columns {:?} were not logged by the source \
                                 (unchanged TOAST values); a JSON cache entry cannot be \
                                 merged: use format = \"hash\" or REPLICA IDENTITY FULL at \
                                 the source",
                                change.unchanged
                            ),
                            class: ErrorClass::Definite,
                            source: None,
                        })
                    }
                    CacheFormat::Json => script(
                        key_of(&change.key),
                        "json",
                        vec![Value::Object(row).to_string()],
                    ),
                    CacheFormat::Hash => {
                        let mut payload = Vec::with_capacity(row.len() * 2);
                        for (column, value) in row {
                            let text = match value {
                                Value::Null => continue,
                                Value::String(s) => s,
                                other => other.to_string(),
                            };
                            payload.push(column);
                            payload.push(text);
                        }
                        let op = if change.unchanged.is_empty() {
                            "hash"
                        } else {
                            "hash-merge"
                        };
                        script(key_of(&change.key), op, payload);
                    }
                }
            }
        }
        Ok(())
    }

    async fn truncate(&self, tx: &Transaction, table: &str) -> Result<(), SinkError> {
        let mut conn = self.conn.clone();
        let newer: i64 = redis::cmd("EVAL")
            .arg(TRUNCATE)
            .arg(2)
            .arg(format!("{}:_truncated:{table}", self.prefix))
            .arg(format!("{}:_v:{table}", self.prefix))
            .arg(tx.id.generation)
            .arg(tx.id.seq)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        if newer == 0 {
            return Ok(());
        }
        let pattern = format!("{}:{table}:*", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error(e))?;
            if !keys.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| self.error(e))?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// The buffered writes, leaving an empty buffer.
    fn take(&self) -> Buffer {
        // A panic elsewhere while it was held leaves a buffer worth nothing more than a
        // fresh one: the group is retried.
        let mut buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *buffer, Buffer::new())
    }

    /// Sends the buffered writes in one `MULTI`/`EXEC`.
    async fn send(&self) -> Result<(), SinkError> {
        let buffer = self.take();
        if buffer.pending == 0 {
            return Ok(());
        }
        buffer
            .pipe
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| self.error(e))
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn apply<'a>(&'a self, tx: &'a Transaction) -> SinkFuture<'a> {
        Box::pin(async move {
            let full = self.buffer.lock().map_or(true, |b| b.pending >= SEND_AT);
            if full {
                self.send().await?;
            }
            for change in tx.changes.iter().filter(|c| self.wanted(c)) {
                if change.op == Op::Truncate {
                    // Everything before the truncate first, then the truncate itself.
                    self.send().await?;
                    self.truncate(tx, &change.shape.name).await?;
                    continue;
                }
                let mut buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
                self.push(&mut buffer.pipe, tx, change)?;
                buffer.pending += 1;
            }
            Ok(())
        })
    }

    fn flush(&self) -> SinkFuture<'_> {
        Box::pin(self.send())
    }

    // No `abort`: the buffer is shared by the process's appliers, and dropping it would
    // lose another group's writes before its store commits. A rolled back group's writes
    // go with the next send, as they went at once before the buffer; its retry writes
    // the same versions again (equal versions apply the same result).
}
