//! The worker loop: consume, assemble, gate, apply, ack.
//!
//! One task owns the AMQP consumer and all bookkeeping (which deliveries hold which
//! envelopes, which transactions wait); appliers run store transactions concurrently and
//! report back. Acks happen only here, and only once every envelope of a delivery has
//! been applied (or found applied, or dead-lettered on its own).

mod apply;
mod bootstrap;
mod ops;
mod queue;
mod settle;
mod subscriber;
mod upkeep;

pub use bootstrap::{BootstrapPlan, BootstrapProgress, TableProgress};
pub use ops::{Ops, Release};
use subscriber::stopped;
pub use subscriber::{run, Subscriber};

use crate::config::{Coordination, SubscriberConfig};
use crate::coord::{memory::MemoryCoord, redis::RedisCoord, Check, Coordinator, Query};
use crate::error::SubscriberError;
use crate::schedule::Wait;
use crate::sink::{Callbacks, SqlStore};
use crate::txn::{Mapping, StagedFold, Transaction, TxId};
use apply::{error_chain, seed, Applier, Outcome};
use kausal_bus::amqp::{Delivery, Inbox, MemoryQueue};
use kausal_bus::deps::table_key;
use kausal_bus::Envelope;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Mutex};

/// Re-check waiting transactions at least this often, even without a wake-up (Redis
/// pub/sub can lose one across a reconnect).
const RECHECK: Duration = Duration::from_millis(500);
/// A full window with nothing applied for this long hands back its highest deliveries so
/// the lower transactions they wait for can be delivered (docs/subscriber.md).
const HAND_BACK_AFTER: Duration = Duration::from_secs(3);
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

struct Held {
    delivery: Delivery,
    /// Envelopes of this delivery not yet applied or dead-lettered.
    remaining: usize,
    received: Instant,
    /// Highest sequence number in it: hand-back order.
    max_seq: u64,
}

struct Waiting {
    tx: Arc<Transaction>,
    table_keys: Vec<u32>,
    since: Instant,
    reported: Option<Instant>,
    wait: Option<Wait>,
}

struct Worker {
    cfg: SubscriberConfig,
    consumer: Inbox,
    /// The app's queues (one, or one per partition) and the partitions consumed now.
    queues: Vec<kausal_bus::amqp::QueueSpec>,
    owned: Vec<u32>,
    store: SqlStore,
    coord: Arc<Coordinator>,
    mapping: Mapping,
    applier: Arc<Applier>,
    next_delivery: u64,
    held: BTreeMap<u64, Held>,
    /// Which deliveries hold envelopes of a transaction (with the count per delivery).
    owners: HashMap<TxId, Vec<(u64, usize)>>,
    waiting: HashMap<TxId, Waiting>,
    /// Split transactions in the gate, with their number of parts: acked once staged,
    /// so a dead letter is rebuilt from the staging table, not from the messages.
    split: HashMap<TxId, u32>,
    /// The lowest sequence number received per namespace/generation since start: where
    /// a subscriber joining a running stream joins.
    min_seen: HashMap<(Arc<str>, u64), u64>,
    /// Since when transactions of a namespace/generation have been held with none of
    /// it applied (cleared by each apply); hand-backs do not reset it.
    stuck_since: HashMap<(Arc<str>, u64), Instant>,
    /// Chain dependent transactions into one store transaction (no callbacks, or
    /// `callbacks.chain`).
    chain: bool,
    /// Dead-lettered in this run: not admitted again (a staged split transaction would
    /// otherwise come back with every recovery scan).
    dead: HashSet<TxId>,
    /// Transactions in a store transaction, with their commit time (for the lag).
    applying: HashMap<TxId, i64>,
    boot: bootstrap::Boot,
    ops: Ops,
    /// Set when the app accepts signed messages only.
    verifier: Option<kausal_bus::signing::Verifier>,
    /// The highest sequence number known applied per namespace/generation: the base of
    /// the implausible-number check.
    highest: HashMap<(Arc<str>, u64), u64>,
    ticks: u32,
    seeded: HashSet<(Arc<str>, u64)>,
    last_progress: Instant,
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
            match sink {
                crate::config::SinkConfig::Redis(r) => {
                    sinks.push(Arc::new(crate::sink::redis::RedisSink::connect(r).await?))
                }
                #[cfg(feature = "search")]
                crate::config::SinkConfig::Search(s) => {
                    sinks.push(Arc::new(crate::sink::search::SearchSink::open(s)?))
                }
                #[cfg(feature = "mongo")]
                crate::config::SinkConfig::Mongo(m) => {
                    sinks.push(Arc::new(crate::sink::mongo::MongoSink::connect(m).await?))
                }
            }
        }
        let store = SqlStore::connect(&cfg.store.url)
            .await?
            .with_sinks(crate::sink::Sinks::new(sinks));
        if matches!(cfg.coordination, Coordination::Redis { .. }) {
            store.set_shared();
        }
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
            None => queue::open(cfg, &mut queues, &store).await?,
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
            min_seen: HashMap::new(),
            stuck_since: HashMap::new(),
            chain: applier_callbacks_empty || cfg.callbacks.chain,
            split: HashMap::new(),
            applier,
            next_delivery: 0,
            held: BTreeMap::new(),
            owners: HashMap::new(),
            waiting: HashMap::new(),
            applying: HashMap::new(),
            ops,
            verifier: if cfg.signing.keys.is_empty() {
                None
            } else {
                Some(
                    kausal_bus::signing::Verifier::new(&cfg.signing.keys)
                        .map_err(|e| SubscriberError::Config(e.to_string()))?,
                )
            },
            highest: HashMap::new(),
            ticks: 0,
            seeded: HashSet::new(),
            last_progress: Instant::now(),
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
                Ok(false) => {
                    if let Err(e) = self.dispatch(&group_tx).await {
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
                    if let Err(e) = self.rebalance(false).await { break Err(e); }
                    if let Err(e) = self.join_if_stuck().await { break Err(e); }
                    if let Err(e) = self.hand_back().await { break Err(e); }
                    if let Err(e) = self.re_request_if_silent().await { break Err(e); }
                    if self.boot.finished { break Ok(()); }
                }
                _ = compact.tick() => {
                    self.compact().await;
                    if let Err(e) = self.follow_bootstraps_in_store().await { break Err(e); }
                    if let Err(e) = self.drive_bootstraps().await { break Err(e); }
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
        // Unacked deliveries go back to the queue when the channel closes.
        self.leave().await;
        self.consumer.close().await;
        let worker = self.ops.status().worker;
        if let Err(error) = self.store.remove_status(&worker).await {
            tracing::debug!(error = %error, "cannot remove the worker's status row");
        }
        result
    }

    /// Takes up to [`BURST`] deliveries that are there already, without waiting.
    async fn receive_burst(&mut self) -> Result<(), SubscriberError> {
        use futures_util::FutureExt;
        for _ in 0..BURST {
            match self.consumer.next().now_or_never() {
                Some(Some(Ok(d))) => self.receive(d).await?,
                Some(Some(Err(e))) => return Err(e.into()),
                Some(None) => return Err(SubscriberError::ConsumerCancelled),
                None => break,
            }
            if self.boot.finished {
                break;
            }
        }
        Ok(())
    }

    async fn receive(&mut self, delivery: Delivery) -> Result<(), SubscriberError> {
        let id = self.next_delivery;
        self.next_delivery += 1;
        self.ops.messages.inc();
        if let Some(verifier) = &self.verifier {
            // Before anything of it is read: an unsigned, forged or altered message.
            if let Err(reason) = verifier.verify(&delivery.body, delivery.signature.as_ref()) {
                tracing::error!(reason = %reason, "dead-lettering a message that fails its signature check");
                self.consumer
                    .send_to_dead_letters(delivery.body.clone(), &reason)
                    .await?;
                self.ops.dead_lettered.inc();
                delivery.ack().await?;
                return Ok(());
            }
        }
        if let Some(kind) = delivery.control.clone() {
            return self.receive_control(id, &kind, delivery).await;
        }
        let envelopes = match kausal_bus::decode(&delivery.body) {
            Ok(e) => e,
            Err(error) => {
                let reason = format!("cannot decode the message: {}", error_chain(&error));
                tracing::error!(reason = %reason, "dead-lettering an undecodable message");
                let body = delivery.body.clone();
                self.consumer.send_to_dead_letters(body, &reason).await?;
                self.ops.dead_lettered.inc();
                delivery.ack().await?;
                return Ok(());
            }
        };
        let retried = delivery.retried;
        if envelopes.len() == 1 && envelopes[0].snapshot.is_some() {
            // A bootstrap chunk: no transaction of the stream, not gated. Applied once
            // the transactions before it are, and when no store transaction is in
            // flight (its row versions are read once: a group committing meanwhile
            // could be overwritten).
            self.boot.last_chunk = Some(Instant::now());
            let env = envelopes.into_iter().next().expect("one envelope");
            self.boot.stash.push((env, delivery));
            return self.take_stashed_chunks().await;
        }
        let max_seq = envelopes.iter().map(|e| e.seq).max().unwrap_or(0);
        self.held.insert(
            id,
            Held {
                delivery,
                remaining: envelopes.len(),
                received: Instant::now(),
                max_seq,
            },
        );
        for env in envelopes {
            self.join_for_bootstrap(&env.namespace, env.generation, env.seq)
                .await?;
            let tx_id = TxId {
                namespace: env.namespace.as_str().into(),
                generation: env.generation,
                seq: env.seq,
            };
            if retried && self.dead.remove(&tx_id) {
                tracing::info!(tx = %tx_id, "an operator sent a dead-lettered transaction back");
            }
            if let Some(reason) = self.implausible(&tx_id).await? {
                tracing::error!(tx = %tx_id, reason = %reason, "dead-lettering an implausible envelope");
                let body = kausal_bus::encode(std::slice::from_ref(&env));
                self.consumer.send_to_dead_letters(body, &reason).await?;
                self.ops.dead_lettered.inc();
                if let Some(h) = self.held.get_mut(&id) {
                    h.remaining = h.remaining.saturating_sub(1);
                }
                continue;
            }
            if !(env.part == 0 && env.parts == Some(1)) {
                // A part of a split transaction: staged in the store, where whichever
                // worker stages the last part completes it. Once staged, this message's
                // share is done.
                let complete = self.store.stage_part(&env).await?;
                if let Some(h) = self.held.get_mut(&id) {
                    h.remaining = h.remaining.saturating_sub(1);
                }
                if let Some(total) = complete {
                    self.admit_staged(tx_id, total).await?;
                }
                continue;
            }
            let owners = self.owners.entry(tx_id.clone()).or_default();
            match owners.iter_mut().find(|(d, _)| *d == id) {
                Some((_, n)) => *n += 1,
                None => owners.push((id, 1)),
            }
            self.admit(tx_id, env).await?;
        }
        self.ack_finished().await
    }

    /// Whether a complete transaction is new to the gate: not waiting, applying or
    /// dead-lettered in this run (a duplicate is settled with the one held).
    fn arrives(&mut self, tx_id: &TxId) -> bool {
        let stream = (tx_id.namespace.clone(), tx_id.generation);
        let seen = self.min_seen.entry(stream.clone()).or_insert(tx_id.seq);
        *seen = (*seen).min(tx_id.seq);
        self.stuck_since.entry(stream).or_insert_with(Instant::now);
        if self.waiting.contains_key(tx_id) || self.applying.contains_key(tx_id) {
            return false;
        }
        if self.dead.contains(tx_id) {
            self.release(tx_id);
            return false;
        }
        true
    }

    /// A transaction of one envelope enters the gate (unless it is already in it).
    async fn admit(&mut self, tx_id: TxId, envelope: Envelope) -> Result<(), SubscriberError> {
        if !self.arrives(&tx_id) {
            return Ok(());
        }
        match self.mapping.assemble(std::slice::from_ref(&envelope)) {
            Ok(tx) => self.enter(tx_id, tx),
            Err(error) => {
                let reason = error.to_string();
                tracing::error!(tx = %tx_id, reason = %reason, "transaction does not fit the subscription");
                self.dead_letter(&tx_id, &[envelope], &reason).await?;
            }
        }
        Ok(())
    }

    /// A split transaction whose `total` parts are all staged enters the gate. Its
    /// parts are read from the store one at a time, for its dependencies and tables;
    /// its changes stay staged until it is applied (part by part, too).
    async fn admit_staged(&mut self, tx_id: TxId, total: u32) -> Result<(), SubscriberError> {
        if !self.arrives(&tx_id) {
            return Ok(());
        }
        let mut fold = StagedFold::default();
        for part in 0..total {
            let Some(envelope) = self.store.staged_part(&tx_id, part).await? else {
                // Applied or dead-lettered by another worker since it was complete.
                tracing::debug!(tx = %tx_id, part, "staged part gone, not admitted");
                return Ok(());
            };
            if let Err(error) = self.mapping.stage(&mut fold, &envelope) {
                let reason = error.to_string();
                tracing::error!(tx = %tx_id, reason = %reason, "transaction does not fit the subscription");
                return self.dead_letter_staged(&tx_id, total, &reason).await;
            }
        }
        self.split.insert(tx_id.clone(), total);
        let tx = self.mapping.finish_staged(fold);
        self.enter(tx_id, tx);
        Ok(())
    }

    fn enter(&mut self, tx_id: TxId, tx: Transaction) {
        let table_keys = tx
            .tables
            .iter()
            .map(|t| table_key(t, self.cfg.ordering.key_space))
            .collect();
        self.waiting.insert(
            tx_id,
            Waiting {
                tx: Arc::new(tx),
                table_keys,
                since: Instant::now(),
                reported: None,
                wait: None,
            },
        );
    }

    /// Split transactions whose parts are all staged but which are not applied: a worker
    /// staged the last part and stopped before applying it.
    async fn recover_staged(&mut self) -> Result<(), SubscriberError> {
        for (tx_id, total) in self.store.staged_complete().await? {
            self.admit_staged(tx_id, total).await?;
        }
        Ok(())
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
        if self.waiting.is_empty() {
            return Ok(false);
        }
        // The appliers have a full group each waiting already: checking again now
        // would only cost a round over every waiting transaction (with Redis, a round
        // trip); their outcomes trigger the next check.
        let backlog = self.cfg.store.appliers * self.cfg.store.max_group;
        if self.applying.len() >= backlog + self.cfg.store.max_group {
            return Ok(false);
        }
        let mut again = false;
        let mut ids: Vec<TxId> = self.waiting.keys().cloned().collect();
        ids.sort();
        let (chain, checks) = {
            let queries: Vec<Query<'_>> = ids
                .iter()
                .map(|id| {
                    let w = &self.waiting[id];
                    Query {
                        id,
                        deps: &w.tx.deps,
                        table_keys: &w.table_keys,
                    }
                })
                .collect();
            let mode = self.cfg.ordering.mode;
            // Dependent transactions chained into one store transaction save a commit
            // per link. Not with callbacks unless `callbacks.chain`: one that reads the
            // store through its own connection would not see the uncommitted rows of
            // the link before it (through `Event::store` it does).
            if matches!(*self.coord, Coordinator::Redis(_)) {
                self.ops.coord_calls.inc();
            }
            if self.chain {
                let (chain, checks) = self
                    .coord
                    .plan(mode, &queries, self.cfg.store.max_group)
                    .await?;
                (Some(chain), checks)
            } else {
                (None, self.coord.check(mode, &queries).await?)
            }
        };
        let mut ready = Vec::new();
        for (id, check) in ids.iter().zip(checks) {
            match check {
                Check::Ready => ready.push(id.clone()),
                Check::Waiting(w) => {
                    if let Some(x) = self.waiting.get_mut(id) {
                        x.wait = Some(w);
                    }
                }
                Check::Unknown => {
                    let key = (id.namespace.clone(), id.generation);
                    if !again || !self.seeded.contains(&key) {
                        seed(&self.store, &self.coord, &id.namespace, id.generation).await?;
                        self.seeded.insert(key);
                        again = true;
                    }
                }
            }
        }
        let units: Vec<Vec<TxId>> = match chain {
            // One unit, in chain order.
            Some(chain) => vec![chain.into_iter().map(|i| ids[i].clone()).collect()],
            None => ready.into_iter().map(|id| vec![id]).collect(),
        };
        for unit in units {
            let mut txs = Vec::with_capacity(unit.len());
            for id in unit {
                if let Some(w) = self.waiting.remove(&id) {
                    self.applying.insert(id, w.tx.commit_ts_us);
                    txs.push(w.tx);
                }
            }
            if !txs.is_empty() && groups.send(txs).is_err() {
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
                let id = tx.id.clone();
                self.applying.remove(&id);
                let table_keys = tx
                    .tables
                    .iter()
                    .map(|t| table_key(t, self.cfg.ordering.key_space))
                    .collect();
                self.waiting.insert(
                    id,
                    Waiting {
                        tx,
                        table_keys,
                        since: Instant::now(),
                        reported: None,
                        wait: None,
                    },
                );
            }
            Outcome::Done(id) => {
                self.ops.applied.inc();
                let top = self
                    .highest
                    .entry((id.namespace.clone(), id.generation))
                    .or_insert(0);
                *top = (*top).max(id.seq);
                self.stuck_since
                    .remove(&(id.namespace.clone(), id.generation));
                self.applying.remove(&id);
                self.split.remove(&id);
                self.release(&id);
            }
            Outcome::Rejected(id, reason) => {
                self.applying.remove(&id);
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
