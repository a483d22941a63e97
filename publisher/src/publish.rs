//! The publish loop: packs envelopes into AMQP messages, keeps many in flight awaiting
//! confirms, and writes the checkpoint once every envelope before a checkpoint marker is
//! confirmed — only then may the source position be confirmed to the database.

use crate::checkpoint::{self, Checkpoint};
use crate::config::Tuning;
use crate::error::PublisherError;
use futures_util::stream::{FuturesOrdered, StreamExt};
use kausal_bus::amqp::AmqpPublisher;
use kausal_bus::{BatchWriter, Envelope};
use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// What the source hands the publish loop, in source order. Envelopes dominate the
/// traffic, so they are not boxed; markers come once a second.
#[allow(clippy::large_enum_variant)]
pub enum Item {
    Envelope(Envelope),
    /// Everything before this is to be checkpointed with this state.
    Marker(Box<Checkpoint>),
    /// A bootstrap chunk for one subscriber's queue (not part of the stream: it is
    /// published straight to that queue, after everything before it).
    Direct {
        queue: String,
        envelope: Box<Envelope>,
    },
}

/// Counters for logs and status.
#[derive(Default)]
pub struct Stats {
    pub envelopes: AtomicU64,
    pub messages: AtomicU64,
    /// Message body bytes published (stream messages, not bootstrap chunks).
    pub bytes: AtomicU64,
    pub changes: AtomicU64,
    pub confirmed_seq: AtomicU64,
    pub checkpointed_position: AtomicU64,
    /// Commit time (µs) of the oldest published transaction RabbitMQ has not confirmed
    /// yet; 0 when none is waiting.
    pub oldest_unconfirmed_us: AtomicI64,
    /// Bootstrap requests held by the bootstrap task, for the status.
    pub bootstrap: std::sync::Mutex<Vec<crate::ops::BootstrapRequestStatus>>,
}

type Pending =
    Pin<Box<dyn Future<Output = Result<Option<Box<Checkpoint>>, PublisherError>> + Send>>;

pub struct PublishLoop {
    pub bus: AmqpPublisher,
    /// Routing key per slot (see [`crate::route`]).
    pub routing_keys: Vec<String>,
    pub router: crate::route::Router,
    pub tuning: Tuning,
    pub checkpoint_path: PathBuf,
    pub durable: watch::Sender<u64>,
    pub stats: Arc<Stats>,
}

impl PublishLoop {
    /// Runs until the source closes the channel and everything is confirmed.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Item>) -> Result<(), PublisherError> {
        let mut inflight: FuturesOrdered<Pending> = FuturesOrdered::new();
        let mut open = true;
        let mut held: Option<Item> = None;
        // Commit time of the first transaction of each in-flight entry (0: not a
        // stream message), in the same order as `inflight`.
        let mut pending: VecDeque<i64> = VecDeque::new();
        loop {
            let oldest = pending.iter().copied().find(|t| *t > 0).unwrap_or(0);
            self.stats
                .oldest_unconfirmed_us
                .store(oldest, Ordering::Relaxed);
            if !open && held.is_none() && inflight.is_empty() {
                break;
            }
            let room = inflight.len() < self.tuning.max_in_flight;
            tokio::select! {
                biased;
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    pending.pop_front();
                    if let Some(cp) = done? {
                        self.save(*cp).await?;
                    }
                }
                item = async { match held.take() { Some(i) => Some(i), None => rx.recv().await } },
                    if room && (open || held.is_some()) =>
                {
                    match item {
                        None => open = false,
                        Some(Item::Marker(cp)) => {
                            pending.push_back(0);
                            inflight.push_back(Box::pin(async move { Ok(Some(cp)) }));
                        }
                        Some(Item::Direct { queue, envelope }) => {
                            let body = kausal_bus::encode_as(
                                self.tuning.wire_format,
                                std::slice::from_ref(&*envelope),
                            );
                            let confirm = self.bus.publish_to_queue(&queue, &body).await?;
                            pending.push_back(0);
                            inflight.push_back(Box::pin(async move {
                                confirm.wait().await?;
                                Ok(None)
                            }));
                        }
                        Some(Item::Envelope(first)) => {
                            pending.push_back(first.commit_ts_us.max(1));
                            let mut batch = BatchWriter::with_format(self.tuning.wire_format);
                            let last_seq = self.fill(&mut batch, first, &mut rx, &mut held);
                            let body = batch.finish();
                            let slot = self.router.finish() as usize;
                            let confirm = self.bus.publish(&self.routing_keys[slot], &body).await?;
                            self.stats.messages.fetch_add(1, Ordering::Relaxed);
                            self.stats
                                .bytes
                                .fetch_add(body.len() as u64, Ordering::Relaxed);
                            let stats = self.stats.clone();
                            inflight.push_back(Box::pin(async move {
                                confirm.wait().await?;
                                stats.confirmed_seq.fetch_max(last_seq, Ordering::Relaxed);
                                Ok(None)
                            }));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Packs `first` and whatever else is ready into one message, up to the limits; at
    /// low load that is just `first`, so nothing waits for a batch to fill.
    fn fill(
        &mut self,
        batch: &mut BatchWriter,
        first: Envelope,
        rx: &mut mpsc::Receiver<Item>,
        held: &mut Option<Item>,
    ) -> u64 {
        let mut last_seq = self.add(batch, first);
        while batch.count() < self.tuning.max_batch_envelopes
            && batch.bytes() < self.tuning.max_batch_bytes
        {
            match rx.try_recv() {
                Ok(Item::Envelope(e)) => last_seq = self.add(batch, e),
                Ok(other) => {
                    *held = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        last_seq
    }

    fn add(&mut self, batch: &mut BatchWriter, e: Envelope) -> u64 {
        self.router.observe(&e);
        self.stats.envelopes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .changes
            .fetch_add(e.changes.len() as u64, Ordering::Relaxed);
        batch.push(&e);
        e.seq
    }

    async fn save(&self, cp: Checkpoint) -> Result<(), PublisherError> {
        let position = cp.position;
        checkpoint::persist(&self.checkpoint_path, cp).await?;
        self.stats
            .checkpointed_position
            .store(position, Ordering::Relaxed);
        let _ = self.durable.send(position);
        Ok(())
    }
}
