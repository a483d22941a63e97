//! The worker's side of operations: its metrics (stable names, listed in
//! `docs/operations.md`), its live status (store row and `/status`), and the
//! operator's commands that reach it through its queue (`release`).

use super::Worker;
use crate::error::SubscriberError;
use crate::status::{now_ms, StreamStatus, WaitingTx, WorkerStatus, MAX_LISTED_WAITS};
use crate::txn::{Transaction, TxId};
use kausal_ops::metrics::{Counter, FloatGauge, Gauge};
use kausal_ops::Metrics;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// `kausal subscriber release --seq N`, sent to the app's queue with the header
/// `kausal_bus::amqp::CONTROL_HEADER` = `release`: mark a transaction that never arrives as
/// applied (without its changes), so the transactions waiting for it proceed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Release {
    pub namespace: String,
    pub generation: u64,
    pub seq: u64,
    /// Who asked (user@host), for the log.
    #[serde(default)]
    pub by: String,
}

/// Metrics and live status of one subscriber process; outlives worker restarts.
#[derive(Clone)]
pub struct Ops {
    pub metrics: Metrics,
    pub(super) applied: Counter,
    pub(super) dead_lettered: Counter,
    pub(super) released: Counter,
    pub(super) hand_backs: Counter,
    pub(super) widenings: Counter,
    pub(super) messages: Counter,
    pub(super) commits: Counter,
    pub(super) coord_calls: Counter,
    pub(super) wait_reports: Counter,
    pub(super) waiting: Gauge,
    pub(super) in_flight: Gauge,
    pub(super) held: Gauge,
    pub(super) lag: FloatGauge,
    pub(super) applied_through: Gauge,
    pub(super) live: Arc<Mutex<WorkerStatus>>,
}

impl Ops {
    pub fn new(app: &str) -> Ops {
        let m = Metrics::default();
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let started = now_ms();
        let live = WorkerStatus {
            worker: format!("{host}:{}:{:x}", std::process::id(), started & 0xffff),
            app: app.to_string(),
            started_ms: started,
            updated_ms: started,
            ..WorkerStatus::default()
        };
        Ops {
            applied: m.counter(
                "subscriber_transactions_applied",
                "Source transactions settled in the store (applied, or found applied after a redelivery).",
            ),
            dead_lettered: m.counter(
                "subscriber_dead_letters",
                "Transactions or messages sent to the app's dead-letter queue.",
            ),
            released: m.counter(
                "subscriber_releases",
                "Transactions an operator released (marked applied without their changes).",
            ),
            hand_backs: m.counter(
                "subscriber_hand_backs",
                "Deliveries moved to the tail of the queue because the window was full of waiting transactions.",
            ),
            widenings: m.counter(
                "subscriber_window_widenings",
                "Times a queue's full window of waiting transactions took another window's worth of messages.",
            ),
            messages: m.counter(
                "subscriber_messages_received",
                "Messages delivered by the broker (each holds one or more envelopes).",
            ),
            commits: m.counter(
                "subscriber_store_commits",
                "Store transactions committed with source transactions in them (one per group or chain).",
            ),
            coord_calls: m.counter(
                "subscriber_coordinator_round_trips",
                "Round trips to the Redis coordinator (checks, plans, applied records); 0 with in-process coordination.",
            ),
            wait_reports: m.counter(
                "subscriber_wait_reports",
                "Reports of a transaction still waiting for a dependency after ordering.report_wait_ms.",
            ),
            waiting: m.gauge(
                "subscriber_transactions_waiting",
                "Transactions in the causal gate waiting for a dependency.",
            ),
            in_flight: m.gauge(
                "subscriber_transactions_in_flight",
                "Transactions being applied in a store transaction.",
            ),
            held: m.gauge(
                "subscriber_deliveries_held",
                "Messages taken from the queue and not yet acknowledged (at most the prefetch).",
            ),
            lag: m.float_gauge(
                "subscriber_lag_seconds",
                "Age of the oldest transaction this worker holds unapplied; 0 when it holds none.",
            ),
            applied_through: m.gauge(
                "subscriber_applied_through",
                "Highest sequence number up to which every transaction is applied (the latest stream).",
            ),
            metrics: m,
            live: Arc::new(Mutex::new(live)),
        }
    }

    pub fn status(&self) -> WorkerStatus {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The process serves its endpoint at `addr` (shown in its status).
    pub(super) fn serving_at(&self, addr: std::net::SocketAddr) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).endpoint = Some(addr.to_string());
    }
}

impl Worker {
    /// Refreshes gauges and the live status; returns it for the store.
    pub(super) async fn refresh_status(&mut self) -> Result<WorkerStatus, SubscriberError> {
        let now = Instant::now();
        let now_us = now_ms() * 1000;
        let mut oldest: HashMap<(Arc<str>, u64), i64> = HashMap::new();
        let held_ts = self
            .gate
            .waiting
            .iter()
            .map(|(id, w)| (id, w.tx.commit_ts_us))
            .chain(self.gate.applying.iter().map(|(id, ts)| (id, *ts)));
        for (id, ts) in held_ts {
            let e = oldest
                .entry((id.namespace.clone(), id.generation))
                .or_insert(ts);
            *e = (*e).min(ts);
        }
        let mut streams = Vec::new();
        let mut keys: Vec<(Arc<str>, u64)> = self.streams.seeded.iter().cloned().collect();
        keys.sort();
        for (ns, generation) in keys {
            let through = self.coord.watermark(&ns, generation).await?.unwrap_or(0);
            let lag_s = oldest
                .get(&(ns.clone(), generation))
                .map_or(0.0, |ts| ((now_us - ts).max(0) as f64) / 1e6);
            streams.push(StreamStatus {
                namespace: ns.to_string(),
                generation,
                applied_through: through,
                lag_s,
            });
        }
        let mut waits: Vec<(&TxId, WaitingTx)> = self
            .gate
            .waiting
            .iter()
            .map(|(id, w)| {
                (
                    id,
                    WaitingTx {
                        tx: id.to_string(),
                        waits_for_seq: w.wait.map(|x| x.seq()),
                        waited_s: now.duration_since(w.since).as_secs(),
                    },
                )
            })
            .collect();
        waits.sort_by(|a, b| a.0.cmp(b.0));
        let ops = &self.ops;
        ops.waiting.set(self.gate.waiting.len() as i64);
        ops.in_flight.set(self.gate.applying.len() as i64);
        ops.held.set(self.deliveries.held.len() as i64);
        ops.lag
            .set(streams.iter().map(|s| s.lag_s).fold(0.0, f64::max));
        if let Some(s) = streams.iter().max_by_key(|s| s.generation) {
            ops.applied_through.set(s.applied_through as i64);
        }
        let mut live = ops.live.lock().unwrap_or_else(|p| p.into_inner());
        live.updated_ms = now_ms();
        live.held_deliveries = self.deliveries.held.len();
        live.in_flight = self.gate.applying.len();
        live.waiting_count = self.gate.waiting.len();
        live.waiting = waits
            .into_iter()
            .take(MAX_LISTED_WAITS)
            .map(|(_, w)| w)
            .collect();
        live.applied = ops.applied.get();
        live.dead_lettered = ops.dead_lettered.get();
        live.released = ops.released.get();
        live.streams = streams;
        live.partitions = self.owned.clone();
        live.messages = ops.messages.get();
        live.store_commits = ops.commits.get();
        live.coord_round_trips = ops.coord_calls.get();
        Ok(live.clone())
    }

    /// An operator's command from the queue. Returns the transaction the delivery now
    /// stands for, if any (the caller holds the delivery until it is settled).
    pub(super) fn control(&mut self, kind: &str, body: &[u8]) -> Result<TxId, String> {
        if kind != "release" {
            return Err(format!(
                "unknown operator command {kind:?} (this worker knows \"release\"): \
                 sent by a newer kausal?"
            ));
        }
        let r: Release = serde_json::from_slice(body)
            .map_err(|e| format!("a release command that does not parse: {e}"))?;
        let id = TxId {
            namespace: r.namespace.as_str().into(),
            generation: r.generation,
            seq: r.seq,
        };
        tracing::warn!(
            tx = %id,
            by = %r.by,
            "operator released a transaction: it counts as applied without its changes; \
             the transactions waiting for it proceed"
        );
        self.ops.released.inc();
        // Whatever held it is dropped: the release wins.
        self.gate.waiting.remove(&id);
        // An empty transaction: the store records it applied (or finds it applied), no
        // callback runs (callbacks run per change).
        let tx = Transaction {
            id: id.clone(),
            position: String::new(),
            commit_ts_us: now_ms() * 1000,
            txid: String::new(),
            context: Default::default(),
            changes: Vec::new(),
            deps: Vec::new(),
            tables: Vec::new(),
            parts: 1,
            staged: None,
            part: None,
        };
        self.gate.enter(Arc::new(tx));
        Ok(id)
    }

    /// Whether `id` is numbered implausibly far above what this app has applied of its
    /// stream (see `OrderingConfig::max_seq_ahead`); returns the reason.
    pub(super) async fn implausible(
        &mut self,
        id: &TxId,
    ) -> Result<Option<String>, SubscriberError> {
        let limit = self.cfg.ordering.max_seq_ahead;
        let key = (id.namespace.clone(), id.generation);
        let mut top = match self.streams.highest.get(&key) {
            Some(t) => *t,
            None => {
                let t = self.applied_through(&id.namespace, id.generation).await?;
                self.streams.highest.insert(key.clone(), t);
                t
            }
        };
        // A store with nothing of this stream joins wherever the stream is.
        if top == 0 || id.seq <= top.saturating_add(limit) {
            return Ok(None);
        }
        // Other workers may have gone far ahead meanwhile.
        top = top.max(self.applied_through(&id.namespace, id.generation).await?);
        self.streams.highest.insert(key, top);
        if id.seq <= top.saturating_add(limit) {
            return Ok(None);
        }
        Ok(Some(format!(
            "transaction {id} is numbered {} above the highest applied ({top}); the queue \
             delivers in publish order, so it is forged or corrupt (limit: \
             ordering.max_seq_ahead = {limit})",
            id.seq - top
        )))
    }

    async fn applied_through(&self, ns: &str, generation: u64) -> Result<u64, SubscriberError> {
        // The store when the coordinator has no state or cannot answer (Redis away: a
        // delivery is not refused, nor the worker stopped, for that).
        match self.coord.watermark(ns, generation).await {
            Ok(Some(w)) => Ok(w),
            Ok(None) | Err(_) => Ok(self.store.progress(ns, generation).await?.0),
        }
    }
}
