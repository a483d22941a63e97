//! The publisher's metrics and live status (`[metrics] listen`): the publish loop's
//! counters, copied into the Prometheus registry once a second, with the envelope rate
//! over the last ten seconds and the age of the oldest unconfirmed transaction.

use crate::publish::Stats;
use kausal_ops::metrics::{Counter, FloatGauge, Gauge};
use kausal_ops::Metrics;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What `/status` of a publisher answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PublisherStatus {
    pub namespace: String,
    pub started_ms: i64,
    pub updated_ms: i64,
    pub envelopes_published: u64,
    pub messages_published: u64,
    /// Highest sequence number RabbitMQ confirmed.
    pub confirmed_seq: u64,
    /// Source position of the last checkpoint (Postgres: the LSN confirmed to the
    /// server; MySQL/MariaDB: a byte count that only grows within one run).
    pub checkpointed_position: String,
    /// Envelopes per second over the last 10 s.
    pub envelopes_per_s: f64,
    /// Age of the oldest transaction published but not yet confirmed by RabbitMQ; 0 when
    /// everything is confirmed.
    pub lag_s: f64,
    /// Bootstrap requests taken from the control queue and not yet answered (more may
    /// wait in the queue: `kausal status` shows its depth).
    #[serde(default)]
    pub bootstrap_requests: Vec<BootstrapRequestStatus>,
}

/// A bootstrap request the publisher holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BootstrapRequestStatus {
    pub request: String,
    /// The subscriber's queue the chunks go to.
    pub queue: String,
    pub tables: Vec<String>,
    /// `answering`, or `waiting` (a request of the same name is being answered).
    pub state: String,
    pub since_ms: i64,
}

struct Published {
    envelopes: Counter,
    messages: Counter,
    bytes: Counter,
    changes: Counter,
    confirmed_seq: Gauge,
    rate: FloatGauge,
    lag: FloatGauge,
}

/// Registers the publisher's metrics and keeps them (and the status) current until
/// the returned task is aborted.
pub fn track(
    namespace: &str,
    postgres: bool,
    stats: Arc<Stats>,
) -> (
    Metrics,
    Arc<Mutex<PublisherStatus>>,
    tokio::task::JoinHandle<()>,
) {
    let m = Metrics::default();
    let p = Published {
        envelopes: m.counter(
            "publisher_envelopes_published",
            "Envelopes (transactions or parts of one) published to RabbitMQ.",
        ),
        messages: m.counter(
            "publisher_messages_published",
            "AMQP messages published (one carries up to tuning.max_batch_envelopes envelopes).",
        ),
        bytes: m.counter(
            "publisher_bytes_published",
            "Message body bytes published to RabbitMQ (the stream, not bootstrap chunks).",
        ),
        changes: m.counter("publisher_changes_published", "Row changes published."),
        confirmed_seq: m.gauge(
            "publisher_confirmed_seq",
            "Highest sequence number RabbitMQ confirmed.",
        ),
        rate: m.float_gauge(
            "publisher_envelopes_per_second",
            "Envelopes published per second over the last 10 s.",
        ),
        lag: m.float_gauge(
            "publisher_lag_seconds",
            "Age of the oldest published transaction not yet confirmed by RabbitMQ; 0 when all are.",
        ),
    };
    let now = crate::ops::now_ms();
    let status = Arc::new(Mutex::new(PublisherStatus {
        namespace: namespace.to_string(),
        started_ms: now,
        updated_ms: now,
        ..PublisherStatus::default()
    }));
    let shared = status.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut window: VecDeque<u64> = VecDeque::new();
        let (mut seen_env, mut seen_msg, mut seen_chg, mut seen_bytes) = (0u64, 0u64, 0u64, 0u64);
        loop {
            tick.tick().await;
            let env = stats.envelopes.load(Ordering::Relaxed);
            let msg = stats.messages.load(Ordering::Relaxed);
            let chg = stats.changes.load(Ordering::Relaxed);
            let bytes = stats.bytes.load(Ordering::Relaxed);
            p.bytes.inc_by(bytes.saturating_sub(seen_bytes));
            seen_bytes = bytes;
            p.envelopes.inc_by(env.saturating_sub(seen_env));
            p.messages.inc_by(msg.saturating_sub(seen_msg));
            p.changes.inc_by(chg.saturating_sub(seen_chg));
            (seen_env, seen_msg, seen_chg) = (env, msg, chg);
            window.push_back(env);
            if window.len() > 11 {
                window.pop_front();
            }
            let rate = match (window.front(), window.len()) {
                (Some(first), n) if n > 1 => (env - first) as f64 / (n - 1) as f64,
                _ => 0.0,
            };
            let confirmed = stats.confirmed_seq.load(Ordering::Relaxed);
            let oldest = stats.oldest_unconfirmed_us.load(Ordering::Relaxed);
            let now = now_ms();
            let lag = if oldest > 0 {
                ((now * 1000 - oldest).max(0) as f64) / 1e6
            } else {
                0.0
            };
            p.confirmed_seq.set(confirmed as i64);
            p.rate.set(rate);
            p.lag.set(lag);
            let position = stats.checkpointed_position.load(Ordering::Relaxed);
            let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
            s.updated_ms = now;
            s.envelopes_published = env;
            s.messages_published = msg;
            s.confirmed_seq = confirmed;
            s.envelopes_per_s = rate;
            s.lag_s = lag;
            s.bootstrap_requests = stats
                .bootstrap
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            s.checkpointed_position = if postgres {
                format!("{:X}/{:X}", position >> 32, position & 0xffff_ffff)
            } else {
                position.to_string()
            };
        }
    });
    (m, status, task)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
