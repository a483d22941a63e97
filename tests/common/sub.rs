//! Helpers for subscriber tests: configs, in-process workers, a hand-driven feed of
//! envelopes (dependencies computed by the real publisher tracker), store queries.
#![allow(dead_code)]

use super::AMQP;
use kausal::bus::amqp::AmqpPublisher;
use kausal::bus::deps::{row_key, session_key, table_key, DEFAULT_KEY_SPACE};
use kausal::bus::{Change, Column, Context, Envelope, Op, TableSchema};
use kausal::publisher::tracker::{Tracker, TrackerState};
use kausal::subscriber::{Subscriber, SubscriberConfig};
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub const REDIS: &str = "redis://127.0.0.1:6379";

/// Subscriber config: `body` is TOML after `app`, `[broker]` and `[store]` (e.g.
/// `[ordering]` and `[[table]]` entries).
pub fn sub_config(app: &str, store_url: &str, body: &str) -> SubscriberConfig {
    toml::from_str(&sub_config_text(app, store_url, body)).unwrap()
}

pub fn sub_config_text(app: &str, store_url: &str, body: &str) -> String {
    format!(
        "app = \"{app}\"\n[broker]\nurl = \"{AMQP}\"\nprefetch = 64\n\
         [store]\nurl = \"{store_url}\"\n{body}"
    )
}

/// A SQLite store file for a test.
pub fn sqlite_url(name: &str) -> String {
    let dir = std::env::temp_dir().join("kausal-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.db"));
    let _ = std::fs::remove_file(&path);
    format!("sqlite://{}", path.display())
}

/// A subscriber running in this process.
pub struct Worker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), kausal::subscriber::SubscriberError>>,
}

impl Worker {
    pub fn start(sub: Subscriber) -> Worker {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(sub.run(rx));
        Worker { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task
            .await
            .unwrap()
            .expect("subscriber ended with an error");
    }
}

/// Declares a subscriber app's durable queue (as its workers will), so that messages
/// published before a worker is up wait in it.
pub async fn declare_queue(app: &str, namespace: &str) {
    let spec = kausal::bus::amqp::QueueSpec::durable(&format!("kausal.{app}"), &[namespace]);
    let c = kausal::bus::amqp::AmqpConsumer::connect(AMQP, "kausal", &spec)
        .await
        .unwrap();
    c.close().await;
}

/// Deletes a subscriber app's queues (and dead letters).
pub async fn delete_queues(app: &str) {
    let spec = kausal::bus::amqp::QueueSpec::durable("kausal.tmp-cleanup", &[]);
    if let Ok(c) = kausal::bus::amqp::AmqpConsumer::connect(AMQP, "kausal", &spec).await {
        // Partition queues of an app with Redis coordination (8 by default).
        let partitions = (1..8).map(|i| format!("kausal.{app}.p{i}"));
        for q in partitions.chain([
            format!("kausal.{app}"),
            format!("kausal.{app}.dlq"),
            spec.name.clone(),
            spec.dead_letter_queue(),
        ]) {
            let _ = c.delete_queue(&q).await;
        }
        c.close().await;
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Envelopes built by hand with the publisher's own dependency tracker, published
/// straight to the exchange: lets a test deliver transactions in any order.
pub struct Feed {
    pub namespace: String,
    tracker: Tracker,
    publisher: AmqpPublisher,
}

/// One row change of a [`Feed`] transaction.
pub struct Row {
    pub op: Op,
    pub table: &'static str,
    pub id: i64,
    pub values: Value,
    /// Rows this one references (foreign keys): `(table, id)`.
    pub refs: Vec<(&'static str, i64)>,
}

pub fn insert(table: &'static str, id: i64, values: Value) -> Row {
    Row {
        op: Op::Insert,
        table,
        id,
        values,
        refs: Vec::new(),
    }
}

pub fn delete(table: &'static str, id: i64) -> Row {
    Row {
        op: Op::Delete,
        table,
        id,
        values: Value::Null,
        refs: Vec::new(),
    }
}

impl Row {
    pub fn refs(mut self, table: &'static str, id: i64) -> Row {
        self.refs.push((table, id));
        self
    }
}

pub fn schema(table: &str) -> TableSchema {
    let cols: &[(&str, &str)] = match table {
        "users" => &[("id", "int4"), ("name", "text"), ("email", "text")],
        "messages" => &[("id", "int4"), ("user_id", "int4"), ("text", "text")],
        _ => &[("id", "int4"), ("v", "text")],
    };
    TableSchema {
        table: table.to_string(),
        columns: cols
            .iter()
            .map(|(n, t)| Column {
                name: n.to_string(),
                type_name: t.to_string(),
            })
            .collect(),
        key: vec!["id".into()],
        changed: false,
    }
}

impl Feed {
    pub async fn new(namespace: &str) -> Feed {
        Feed {
            namespace: namespace.to_string(),
            tracker: Tracker::new(TrackerState::new(1, DEFAULT_KEY_SPACE)),
            publisher: AmqpPublisher::connect(AMQP, "kausal").await.unwrap(),
        }
    }

    /// The next transaction, in commit order (sequence numbers from 1).
    pub fn txn(&mut self, rows: Vec<Row>, session: Option<&str>) -> Envelope {
        let seq = self.tracker.seq();
        if let Some(s) = session {
            self.tracker.write(session_key(s, DEFAULT_KEY_SPACE));
        }
        let mut changes = Vec::new();
        let mut schemas: Vec<TableSchema> = Vec::new();
        for r in rows {
            let id = r.id.to_string();
            self.tracker.read(table_key(r.table, DEFAULT_KEY_SPACE));
            for (t, rid) in &r.refs {
                self.tracker
                    .read(row_key(t, [rid.to_string().as_str()], DEFAULT_KEY_SPACE));
            }
            self.tracker
                .write(row_key(r.table, [id.as_str()], DEFAULT_KEY_SPACE));
            let mut key = Map::new();
            key.insert("id".into(), json!(r.id));
            let new = match (&r.op, r.values) {
                (Op::Delete, _) => None,
                (_, Value::Object(mut m)) => {
                    m.insert("id".into(), json!(r.id));
                    Some(m)
                }
                _ => None,
            };
            if !schemas.iter().any(|s| s.table == r.table) {
                schemas.push(schema(r.table));
            }
            changes.push(Change {
                op: r.op,
                table: r.table.to_string(),
                key,
                old_key: None,
                new,
                old: None,
                unchanged: Vec::new(),
            });
        }
        let deps = self.tracker.take_part();
        self.tracker.commit();
        Envelope {
            namespace: self.namespace.clone(),
            generation: 1,
            seq,
            part: 0,
            parts: Some(1),
            position: format!("test:{seq}"),
            commit_ts_us: 1_700_000_000_000_000 + seq as i64,
            txid: seq.to_string(),
            context: Context {
                sessions: session.map(|s| vec![s.to_string()]).unwrap_or_default(),
                ..Context::default()
            },
            schemas,
            changes,
            deps,
            snapshot: None,
        }
    }

    /// Publishes envelopes in one message and waits for the broker's confirm.
    pub async fn publish(&self, envelopes: &[Envelope]) {
        self.publish_raw(&kausal::bus::encode(envelopes)).await;
    }

    pub async fn publish_raw(&self, body: &[u8]) {
        let rk = kausal::bus::amqp::changes_routing_key(&self.namespace);
        self.publisher
            .publish(&rk, body)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
}
