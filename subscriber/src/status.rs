//! What a running worker reports about itself: written to the store every few seconds
//! (`kausal status` reads it there) and served at `/status` when `[metrics] listen` is
//! set. Row values never appear here: transactions are named by
//! `<namespace>/<generation>/<seq>`.

use serde::{Deserialize, Serialize};

/// A worker writes its status this often.
pub const STATUS_EVERY_MS: i64 = 2_000;
/// A worker row older than this is shown as gone (the worker crashed or was killed:
/// a clean stop removes its row).
pub const GONE_AFTER_MS: i64 = 10_000;
/// Waiting transactions listed per worker (the lowest first); the count is complete.
pub const MAX_LISTED_WAITS: usize = 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    /// `<host>:<pid>:<random>`: one per process start.
    pub worker: String,
    pub app: String,
    pub started_ms: i64,
    pub updated_ms: i64,
    /// Deliveries taken from the queue and not yet acked.
    pub held_deliveries: usize,
    /// Transactions being applied in a store transaction right now.
    pub in_flight: usize,
    /// Transactions in the gate, waiting for a dependency.
    pub waiting_count: usize,
    pub waiting: Vec<WaitingTx>,
    /// Counted since the process started.
    pub applied: u64,
    pub dead_lettered: u64,
    pub released: u64,
    pub streams: Vec<StreamStatus>,
    /// The partition queues this worker consumes (see `broker.partitions`).
    #[serde(default)]
    pub partitions: Vec<u32>,
    /// Counted since the process started: messages received, store transactions
    /// committed, round trips to the Redis coordinator (the cost model of scale-out).
    #[serde(default)]
    pub messages: u64,
    #[serde(default)]
    pub store_commits: u64,
    #[serde(default)]
    pub coord_round_trips: u64,
    /// Where this process serves `/metrics` and `/status` (the port it took of a
    /// `[metrics] listen` range), if it does.
    #[serde(default)]
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WaitingTx {
    /// `<namespace>/<generation>/<seq>`.
    pub tx: String,
    /// The transaction whose application releases it at the latest (what
    /// `kausal subscriber release --seq` takes when that one never comes).
    pub waits_for_seq: Option<u64>,
    pub waited_s: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamStatus {
    pub namespace: String,
    pub generation: u64,
    /// Every transaction up to this one is applied.
    pub applied_through: u64,
    /// Age of the oldest transaction this worker holds unapplied (0 when it holds none).
    pub lag_s: f64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
