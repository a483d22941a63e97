//! The worker loop: consume, assemble, gate, apply, ack.
//!
//! One task owns the AMQP consumer and all bookkeeping (which deliveries hold which
//! envelopes, which transactions wait); appliers run store transactions concurrently and
//! report back. Acks happen only here, and only once every envelope of a delivery has
//! been applied (or found applied, or dead-lettered on its own).

mod apply;
mod bootstrap;
mod gate;
mod held;
mod ops;
mod queue;
mod receive;
mod settle;
mod subscriber;
mod upkeep;

pub use bootstrap::{BootstrapPlan, BootstrapProgress, TableProgress};
pub use ops::{Ops, Release};
use subscriber::stopped;
pub use subscriber::{run, Subscriber};

use crate::config::{Coordination, SubscriberConfig};
use crate::coord::{memory::MemoryCoord, redis::RedisCoord, Coordinator};
use crate::error::{CoordError, SubscriberError};
use crate::mapping::Mapping;
use crate::sink::{Callbacks, SqlStore};
use crate::store::Store;
use crate::txn::{Transaction, TxId};
use apply::{error_chain, seed, Applier, Outcome};
use kausal_bus::amqp::{Inbox, MemoryQueue};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Mutex};

/// Re-check waiting transactions at least this often, even without a wake-up (Redis
/// pub/sub can lose one across a reconnect).
const RECHECK: Duration = Duration::from_millis(500);
/// A full window with nothing applied for this long hands back its highest deliveries so
/// the lower transactions they wait for can be delivered (docs/subscriber.md).
const HAND_BACK_AFTER: Duration = Duration::from_secs(3);
/// A full window with nothing applied for this long takes more messages of its queue
/// (up to [`WIDEN_MAX`] windows) before anything is handed back: see
/// [`Worker::widen_stuck_windows`].
const WIDEN_AFTER: Duration = Duration::from_secs(1);
/// At most this many windows' worth of one queue's messages held at once.
const WIDEN_MAX: usize = 4;
/// A Redis error pauses checking for this long at first, doubling up to 2 s.
const COORD_PAUSE: Duration = Duration::from_millis(100);
/// A subscriber whose store has nothing of a namespace/generation, and whose lowest held
/// transaction (above 1) has waited this long, joins the stream there: see
/// [`Worker::join_if_stuck`].
const JOIN_AFTER: Duration = Duration::from_secs(5);
/// Deliveries already received are taken into the gate together, up to this many.
const BURST: usize = 256;
/// How often the store's bookkeeping is compacted up to the watermark.
const COMPACT_EVERY: Duration = Duration::from_secs(5);
/// Recheck ticks between two writes of the worker's live status.
const STATUS_TICKS: u32 = (crate::status::STATUS_EVERY_MS as u32) / (RECHECK.as_millis() as u32);

type Stream = (Arc<str>, u64);

/// What a worker knows of each stream (namespace, generation) it has seen.
#[derive(Default)]
struct Streams {
    /// The lowest sequence number received since start: where a subscriber joining a
    /// running stream joins.
    min_seen: HashMap<Stream, u64>,
    /// Since when transactions have been held with none of the stream applied
    /// (cleared by each apply); hand-backs do not reset it.
    stuck_since: HashMap<Stream, Instant>,
    /// The highest sequence number known applied: the base of the implausible-number
    /// check.
    highest: HashMap<Stream, u64>,
    /// Streams whose gate state this worker seeded from the store.
    seeded: HashSet<Stream>,
    /// The coordinator's watermark at the last compaction round: a stream whose
    /// watermark stands still while transactions wait is healed from the store.
    last_watermark: HashMap<Stream, u64>,
}

struct Worker {
    cfg: SubscriberConfig,
    consumer: Inbox,
    /// The app's queues (one, or one per partition) and the partitions consumed now.
    queues: Vec<kausal_bus::amqp::QueueSpec>,
    owned: Vec<u32>,
    store: Arc<dyn Store>,
    coord: Arc<Coordinator>,
    mapping: Mapping,
    applier: Arc<Applier>,
    /// What this worker holds unacked.
    deliveries: held::Deliveries,
    /// Complete transactions, waiting or being applied.
    gate: gate::Gate,
    /// Split transactions in the gate, with their number of parts: acked once staged,
    /// so a dead letter is rebuilt from the staging table, not from the messages.
    split: HashMap<TxId, u32>,
    /// What this worker knows of each stream (namespace, generation).
    streams: Streams,
    /// Chain dependent transactions into one store transaction (no callbacks, or
    /// `callbacks.chain`).
    chain: bool,
    /// Dead-lettered in this run: not admitted again (a staged split transaction would
    /// otherwise come back with every recovery scan).
    dead: HashSet<TxId>,
    boot: bootstrap::Boot,
    ops: Ops,
    /// Set when the app accepts signed messages only.
    verifier: Option<kausal_bus::signing::Verifier>,
    ticks: u32,
    last_progress: Instant,
    /// When a stuck window last took more messages, and per queue how many of its
    /// messages were held then.
    last_widened: Instant,
    widened_at: HashMap<String, usize>,
    /// Checking paused after a Redis error until then, and the next pause's length.
    coord_paused: Option<Instant>,
    coord_pause: Duration,
}

impl Worker {
    async fn start(
        cfg: &SubscriberConfig,
        callbacks: Callbacks,
        inbox: Option<MemoryQueue>,
        ops: Ops,
    ) -> Result<Worker, SubscriberError> {
        let mut sinks: Vec<Arc<dyn crate::sink::Sink>> = Vec::new();
        for sink in &cfg.sinks {
            sinks.push(sink.open().await?);
        }
        let store = SqlStore::connect(&cfg.store.url)
            .await?
            .with_sinks(crate::sink::Sinks::new(sinks));
        if matches!(cfg.coordination, Coordination::Redis { .. }) {
            store.set_shared();
        }
        // From here on the runtime knows the store only by what it needs of it.
        let store: Arc<dyn Store> = Arc::new(store);
        let coord = Arc::new(match &cfg.coordination {
            Coordination::Memory => Coordinator::Memory(MemoryCoord::new()),
            Coordination::Redis { url, prefix } => {
                Coordinator::Redis(RedisCoord::connect(url, prefix, &cfg.app).await?)
            }
        });
        let namespaces = cfg.namespaces();
        let ns: Vec<&str> = namespaces.iter().map(String::as_str).collect();
        let mut queues = queue::specs(cfg, &ns);
        let consumer = match inbox {
            Some(queue) => Inbox::Memory(queue),
            None => queue::open(cfg, &mut queues, &*store).await?,
        };

        let applier_callbacks_empty = callbacks.is_empty();
        let applier = Arc::new(Applier {
            store: store.clone(),
            coord: coord.clone(),
            callbacks,
            attempts: cfg.callbacks.attempts.max(1),
            max_group: cfg.store.max_group,
            backoff: Duration::from_millis(cfg.callbacks.backoff_ms),
            commits: ops.commits.clone(),
            coord_calls: matches!(*coord, Coordinator::Redis(_)).then(|| ops.coord_calls.clone()),
        });
        Ok(Worker {
            mapping: Mapping::new(cfg),
            cfg: cfg.clone(),
            consumer,
            queues,
            owned: Vec::new(),
            store,
            coord,
            dead: HashSet::new(),
            streams: Streams::default(),
            chain: applier_callbacks_empty || cfg.callbacks.chain,
            split: HashMap::new(),
            applier,
            deliveries: held::Deliveries::default(),
            gate: gate::Gate::new(cfg.ordering.key_space),
            ops,
            verifier: if cfg.signing.keys.is_empty() {
                None
            } else {
                Some(
                    kausal_bus::signing::Verifier::new(&cfg.signing.keys)
                        .map_err(crate::error::ConfigError::from)?,
                )
            },
            ticks: 0,
            last_progress: Instant::now(),
            last_widened: Instant::now(),
            widened_at: HashMap::new(),
            coord_paused: None,
            coord_pause: COORD_PAUSE,
            boot: bootstrap::Boot::default(),
        })
    }

    async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        plan_started: &std::sync::atomic::AtomicBool,
    ) -> Result<(), SubscriberError> {
        // Ready transactions, one by one; a free applier takes all that are there (up to
        // max_group) as one store transaction, so groups grow exactly when the store is
        // the bottleneck. Bounded by the prefetch window, which bounds what we hold.
        let (group_tx, group_rx) = mpsc::unbounded_channel::<Vec<Arc<Transaction>>>();
        let group_rx = Arc::new(Mutex::new(group_rx));
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let mut appliers = Vec::new();
        for _ in 0..self.cfg.store.appliers {
            appliers.push(tokio::spawn(
                self.applier.clone().run(group_rx.clone(), out_tx.clone()),
            ));
        }
        drop(out_tx);
        self.rebalance(true).await?;
        self.recover_staged().await?;
        self.start_bootstraps().await?;
        plan_started.store(true, std::sync::atomic::Ordering::Relaxed);
        let wake = self.coord.wakeups();
        let mut recheck = tokio::time::interval(RECHECK);
        let mut compact = tokio::time::interval(COMPACT_EVERY);
        let result: Result<(), SubscriberError> = loop {
            // Chunks first, once due and nothing is in flight; no new groups while a
            // due one waits for those in flight.
            if let Err(e) = self.take_stashed_chunks().await {
                break Err(e);
            }
            if self.boot.finished {
                break Ok(());
            }
            // Every event below can make a waiting transaction ready.
            match self.chunk_due().await {
                Err(e) => break Err(e),
                Ok(true) => {}
                Ok(false)
                    if self
                        .coord_paused
                        .is_some_and(|until| Instant::now() < until) => {}
                Ok(false) => {
                    let dispatched = self.dispatch(&group_tx).await;
                    if let Some(e) = self.pause_on_redis_error(dispatched) {
                        break Err(e);
                    }
                }
            }
            tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => break Ok(()),
                Some(outcome) = out_rx.recv() => {
                    let mut result = self.finish(outcome).await;
                    while let (Ok(()), Ok(o)) = (&result, out_rx.try_recv()) {
                        result = self.finish(o).await;
                    }
                    if let Err(e) = result { break Err(e); }
                }
                delivery = self.consumer.next() => match delivery {
                    None => break Err(SubscriberError::ConsumerCancelled),
                    Some(Err(e)) => break Err(e.into()),
                    Some(Ok(d)) => {
                        if let Err(e) = self.receive(d).await { break Err(e); }
                        // What else the broker has delivered already goes into the
                        // gate before the next check: one check (with Redis, one round
                        // trip over every waiting transaction) per burst, not per
                        // message. Not with callbacks that are not chained: a callback
                        // failing in a group makes the group's other callbacks run
                        // again, so such groups are kept as small as the load allows.
                        if self.chain {
                            if let Err(e) = self.receive_burst().await { break Err(e); }
                        }
                        if self.boot.finished { break Ok(()); }
                    }
                },
                _ = wake.notified() => {}
                _ = recheck.tick() => {
                    self.ticks = self.ticks.wrapping_add(1);
                    if self.ticks.is_multiple_of(STATUS_TICKS) {
                        self.write_status().await;
                    }
                    self.report_waits();
                    let rebalanced = self.rebalance(false).await;
                    if let Some(e) = self.pause_on_redis_error(rebalanced) { break Err(e); }
                    if let Err(e) = self.join_if_stuck().await { break Err(e); }
                    if let Err(e) = self.widen_stuck_windows().await { break Err(e); }
                    if let Err(e) = self.hand_back().await { break Err(e); }
                    if let Err(e) = self.re_request_if_silent().await { break Err(e); }
                    if self.boot.finished { break Ok(()); }
                }
                _ = compact.tick() => {
                    self.compact().await;
                    if let Err(e) = self.follow_bootstraps_in_store().await { break Err(e); }
                    let driven = self.drive_bootstraps().await;
                    if let Some(e) = self.pause_on_redis_error(driven) { break Err(e); }
                    if self.boot.finished { break Ok(()); }
                    if let Err(e) = self.recover_staged().await { break Err(e); }
                }
            }
        };
        // Drain: no new groups; finish those in flight and ack what they applied.
        drop(group_tx);
        let deadline = tokio::time::sleep(Duration::from_secs(30));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                o = out_rx.recv() => match o {
                    Some(o) => { let _ = self.finish(o).await; }
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        // The appliers are done when their outcomes ended; one still in a store
        // transaction or retrying the coordinator past the deadline is stopped (its
        // uncommitted group rolls back; a committed one is found applied when its
        // messages come again).
        for applier in appliers {
            applier.abort();
            if let Err(error) = applier.await {
                if !error.is_cancelled() {
                    tracing::warn!(error = %error, "an applier task failed");
                }
            }
        }
        // Unacked deliveries go back to the queue when the channel closes.
        self.leave().await;
        self.consumer.close().await;
        let worker = self.ops.status().worker;
        if let Err(error) = self.store.remove_status(&worker).await {
            tracing::debug!(error = %error, "cannot remove the worker's status row");
        }
        result
    }

    /// A Redis that is restarting, failing over or briefly unreachable pauses checking
    /// (with a backoff) instead of stopping the worker. A restart would hand every held
    /// message back to its queue, and messages requeued while another worker's window
    /// holds later ones of the same queue come *behind* them: that window then waits
    /// for them and cannot take them (seen as minutes of waits after Redis restarts).
    /// Answers the error that must stop the worker, if any.
    fn pause_on_redis_error(
        &mut self,
        result: Result<(), SubscriberError>,
    ) -> Option<SubscriberError> {
        match result {
            Ok(()) => {
                if self.coord_paused.take().is_some() {
                    tracing::info!("coordination back");
                }
                self.coord_pause = COORD_PAUSE;
                None
            }
            Err(SubscriberError::Coord(
                e @ (CoordError::Redis { .. } | CoordError::Unreachable { .. }),
            )) => {
                if self.coord_paused.is_none() {
                    tracing::warn!(error = %error_chain(&e), "coordination unavailable; holding what we have and retrying");
                }
                self.coord_paused = Some(Instant::now() + self.coord_pause);
                self.coord_pause = (self.coord_pause * 2).min(Duration::from_secs(2));
                None
            }
            Err(e) => Some(e),
        }
    }

    /// Checks every waiting transaction and hands the ready ones to appliers in groups.
    async fn dispatch(
        &mut self,
        groups: &mpsc::UnboundedSender<Vec<Arc<Transaction>>>,
    ) -> Result<(), SubscriberError> {
        // Twice at most: a first sight of a namespace/generation seeds its state and
        // checks again.
        for _ in 0..2 {
            if !self.dispatch_once(groups).await? {
                break;
            }
        }
        Ok(())
    }

    /// Returns true when state was seeded and another round is due.
    async fn dispatch_once(
        &mut self,
        groups: &mpsc::UnboundedSender<Vec<Arc<Transaction>>>,
    ) -> Result<bool, SubscriberError> {
        if self.gate.waiting.is_empty() {
            return Ok(false);
        }
        // The appliers have a full group each waiting already: checking again now
        // would only cost a round over every waiting transaction (with Redis, a round
        // trip); their outcomes trigger the next check.
        let backlog = self.cfg.store.appliers * self.cfg.store.max_group;
        if self.gate.applying.len() >= backlog + self.cfg.store.max_group {
            return Ok(false);
        }
        if matches!(*self.coord, Coordinator::Redis(_)) {
            self.ops.coord_calls.inc();
        }
        // Dependent transactions chained into one store transaction save a commit per
        // link. Not with callbacks unless `callbacks.chain`: one that reads the store
        // through its own connection would not see the uncommitted rows of the link
        // before it (through `Event::store` it does).
        let (units, unknown) = self
            .gate
            .ready(
                &self.coord,
                self.cfg.ordering.mode,
                self.chain,
                self.cfg.store.max_group,
            )
            .await?;
        // A first sight of a namespace/generation (or Redis lost its state): seed it
        // from the store and check again.
        let mut again = false;
        for key in unknown {
            if !again || !self.streams.seeded.contains(&key) {
                seed(&*self.store, &self.coord, &key.0, key.1).await?;
                self.streams.seeded.insert(key);
                again = true;
            }
        }
        for txs in units {
            if groups.send(txs).is_err() {
                break;
            }
        }
        Ok(again)
    }

    async fn finish(&mut self, outcome: Outcome) -> Result<(), SubscriberError> {
        self.last_progress = Instant::now();
        match outcome {
            Outcome::Retry(tx) => {
                // Its group failed before it: back to the gate.
                self.gate.enter(tx);
            }
            Outcome::Done(id) => {
                self.ops.applied.inc();
                let top = self
                    .streams
                    .highest
                    .entry((id.namespace.clone(), id.generation))
                    .or_insert(0);
                *top = (*top).max(id.seq);
                self.streams
                    .stuck_since
                    .remove(&(id.namespace.clone(), id.generation));
                self.gate.applying.remove(&id);
                self.split.remove(&id);
                self.release(&id);
            }
            Outcome::Rejected(id, reason) => {
                self.gate.applying.remove(&id);
                // The dead letter holds this transaction's envelopes only, taken from its
                // staged parts or from the messages that carried it.
                match self.split.remove(&id) {
                    Some(total) => self.dead_letter_staged(&id, total, &reason).await?,
                    None => {
                        let envelopes = self.envelopes_of(&id);
                        self.dead_letter(&id, &envelopes, &reason).await?;
                    }
                }
            }
        }
        self.ack_finished().await
    }
}
