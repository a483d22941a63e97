//! The worker's queues: the app's queue, or its partition queues, declared with their
//! expiry; refused when the app's queue vanished under a store that followed it. Which
//! partitions this process consumes is worked out by [`Worker::rebalance`].

use super::{Worker, WIDEN_AFTER, WIDEN_MAX};
use crate::config::{Coordination, SubscriberConfig};
use crate::coord::Coordinator;
use crate::error::SubscriberError;
use crate::store::Store;
use kausal_bus::amqp::{AmqpConsumer, Inbox, QueueSpec};
use std::collections::BTreeSet;

/// A live worker marks itself every tick (500 ms); one not seen for [`MEMBER_TTL_MS`]
/// has its partitions taken over (its unacked messages went back to the queues the
/// moment its connection closed). Short, because the transactions of its partitions
/// wait meanwhile, and with them whatever depends on them in other partitions.
const HEARTBEAT_TICKS: u32 = 1;
const MEMBER_TTL_MS: u64 = 2_000;

/// The app's queues: one, or one per partition (partition 0 is the app's queue).
pub(super) fn specs(cfg: &SubscriberConfig, namespaces: &[&str]) -> Vec<QueueSpec> {
    let base = cfg.queue();
    let of = cfg.partitions();
    (0..of)
        .map(|i| {
            let mut spec = if of == 1 {
                QueueSpec::durable(&base, namespaces)
            } else {
                QueueSpec::partition(&base, namespaces, i, of)
            };
            spec.prefetch = cfg.broker.prefetch;
            spec.quorum = cfg.broker.queue_type == crate::config::QueueType::Quorum;
            spec
        })
        .collect()
}

/// Declares (if new) every queue of the app, consuming none yet.
pub(super) async fn open(
    cfg: &SubscriberConfig,
    specs: &mut [QueueSpec],
    store: &dyn Store,
) -> Result<Inbox, SubscriberError> {
    let expires_ms = cfg
        .broker
        .queue_expires_ms()
        .map_err(SubscriberError::Config)?;
    for spec in specs.iter_mut() {
        spec.expires_ms = expires_ms;
    }
    let base = &specs[0];
    // A queue that vanished (expired, deleted) under a store that followed it: the
    // changes published meanwhile are gone, and a new queue would hide that for good.
    if !kausal_bus::amqp::queue_exists(&cfg.broker.url, &base.name).await?
        && store.has_followed().await?
    {
        let why = match &cfg.broker.queue_expires {
            Some(e) => format!("it expires after {e} without a consumer"),
            None => "deleted".to_string(),
        };
        return Err(SubscriberError::QueueLost {
            queue: base.name.clone(),
            why,
        });
    }
    let consumer = AmqpConsumer::open(
        &cfg.broker.url,
        &cfg.broker.exchange,
        window(cfg),
        base.dead_letter_key(),
    )
    .await?;
    // Partition 0 last: declaring it unbinds the catch-all binding an unpartitioned
    // app queue had, and the other partitions must be bound by then, or messages of
    // their slots would reach no queue.
    for spec in specs.iter().rev() {
        consumer.declare(spec).await?;
    }
    tracing::info!(queue = %base.name, partitions = specs.len(), mode = ?cfg.ordering.mode, "subscriber consuming");
    if let Some(expires) = &cfg.broker.queue_expires {
        tracing::info!(queue = %base.name, expires = %expires,
            "the broker deletes this queue, and what it holds, once it had no consumer for this long");
    }
    Ok(Inbox::Amqp(Box::new(consumer)))
}

/// Unacked messages per queue: `broker.prefetch` for each partition queue. Per queue,
/// because the lowest transaction not applied yet is always at the head of its
/// partition's unacked messages (everything before it in that queue is applied and
/// acked), so a window of its own always delivers it; a shared window could be full
/// of other partitions' messages waiting for it. Not split over the partitions: the
/// publisher keeps a chain of dependent transactions in one partition, so a busy
/// stream often flows through one queue, and a split window (32 of 256 with 8
/// partitions) made every group small: 2,128 against 4,809 transactions/s on the
/// pgbench backlog with one process and Redis (BENCHMARKS.md). A process holds at most
/// `partitions × prefetch` messages (more only while a stuck window widens).
pub(super) fn window(cfg: &SubscriberConfig) -> u16 {
    cfg.broker.prefetch.max(1)
}

/// The partitions worker `me` consumes among the live `members` (sorted): every
/// `n`-th, from its own place. Deterministic, so all workers agree without talking.
pub(super) fn share(partitions: u32, members: &[String], me: &str) -> BTreeSet<u32> {
    let n = members.len().max(1) as u32;
    let place = members.iter().position(|m| m == me).unwrap_or(0) as u32;
    (0..partitions).filter(|i| i % n == place).collect()
}

impl Worker {
    /// Consumes this process's share of the app's partition queues: all of them with
    /// one queue or in-process coordination; with Redis, a share computed from the live
    /// workers, renewed every heartbeat. While shares move, two workers may briefly
    /// consume one queue: harmless, since the gate and the store's bookkeeping make
    /// every transaction apply once, in order, wherever it is delivered.
    pub(super) async fn rebalance(&mut self, force: bool) -> Result<(), SubscriberError> {
        if !force && !self.ticks.is_multiple_of(HEARTBEAT_TICKS) {
            return Ok(());
        }
        let Inbox::Amqp(consumer) = &mut self.consumer else {
            return Ok(());
        };
        let of = self.queues.len() as u32;
        let wanted: BTreeSet<u32> = match (&*self.coord, &self.cfg.coordination) {
            (Coordinator::Redis(redis), Coordination::Redis { .. }) if of > 1 => {
                let worker = self.ops.status().worker;
                let members = redis.members(&worker, MEMBER_TTL_MS).await?;
                share(of, &members, &worker)
            }
            _ => (0..of).collect(),
        };
        let consuming: BTreeSet<String> = consumer.consuming().into_iter().collect();
        for (i, spec) in self.queues.iter().enumerate() {
            let want = wanted.contains(&(i as u32));
            if want && !consuming.contains(&spec.name) {
                consumer.consume(spec).await?;
                tracing::info!(queue = %spec.name, "consuming a partition");
            } else if !want && consuming.contains(&spec.name) {
                consumer.cancel(&spec.name).await?;
                tracing::info!(queue = %spec.name, "partition handed to another worker");
            }
        }
        self.owned = wanted.into_iter().collect();
        Ok(())
    }

    /// A window full of transactions that wait, with nothing applied for
    /// [`WIDEN_AFTER`]: the transactions they wait for are behind them in the queue
    /// (requeued there when another worker stopped while this one's window held later
    /// messages, or redelivered after a crash). Consuming the queue again under a new
    /// consumer takes another window's worth from the queue's head, where those are,
    /// while the held messages stay held: no copy, no reordering (unlike a hand-back,
    /// which is left for a queue holding [`WIDEN_MAX`] windows already).
    pub(super) async fn widen_stuck_windows(&mut self) -> Result<(), SubscriberError> {
        if !self.gate.applying.is_empty()
            || self.last_progress.elapsed() < WIDEN_AFTER
            || self.last_widened.elapsed() < WIDEN_AFTER
        {
            return Ok(());
        }
        let Inbox::Amqp(consumer) = &mut self.consumer else {
            return Ok(());
        };
        let window = usize::from(window(&self.cfg));
        let per_queue = self.deliveries.per_queue();
        let consuming: BTreeSet<String> = consumer.consuming().into_iter().collect();
        let mut widened = 0;
        for spec in &self.queues {
            let held = per_queue.get(spec.name.as_str()).copied().unwrap_or(0);
            // Full again since the last widening: the newest consumer's window filled
            // (a queue that had no more to give is not consumed anew every second).
            let before = self.widened_at.get(&spec.name).copied().unwrap_or(0);
            if held < before {
                self.widened_at.remove(&spec.name);
            }
            let before = before.min(held);
            if !consuming.contains(&spec.name)
                || held < before + window
                || held >= window * WIDEN_MAX
            {
                continue;
            }
            consumer.cancel(&spec.name).await?;
            consumer.consume(spec).await?;
            self.widened_at.insert(spec.name.clone(), held);
            widened += 1;
        }
        if widened > 0 {
            self.last_widened = std::time::Instant::now();
            self.ops.widenings.inc_by(widened);
            tracing::info!(
                queues = widened,
                "window full of waiting transactions: took more messages of its queue"
            );
        }
        Ok(())
    }

    /// A clean stop: the other workers take this one's partitions at once.
    pub(super) async fn leave(&self) {
        if let (Coordinator::Redis(redis), true) = (&*self.coord, self.queues.len() > 1) {
            if let Err(error) = redis.leave(&self.ops.status().worker).await {
                tracing::debug!(error = %error, "cannot leave the live workers");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_workers_split_the_partitions_without_overlap() {
        let members: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut all = BTreeSet::new();
        for m in &members {
            let mine = share(8, &members, m);
            assert!(mine.len() >= 2, "{m} gets a fair share: {mine:?}");
            assert!(mine.iter().all(|p| all.insert(*p)), "no partition twice");
        }
        assert_eq!(all.len(), 8);
        assert_eq!(share(8, &members[..1], "a").len(), 8);
        // More workers than partitions: some consume nothing.
        let many: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
        assert!(share(8, &many, "w9").is_empty());
    }
}
