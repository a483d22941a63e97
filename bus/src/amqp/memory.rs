//! An in-process queue with a subscriber queue's behaviour — deliveries in order, acks,
//! dead letters with their reason, hand-back to the tail — for the test kit and tests
//! that run the real subscriber without a broker.

use super::delivery::{Acker, Delivery, LocalAcker};

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// A queue in this process. Clones share it: one side publishes and watches, the
/// subscriber consumes.
#[derive(Clone)]
pub struct MemoryQueue {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::UnboundedSender<(u64, Vec<u8>)>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<(u64, Vec<u8>)>>,
    state: Mutex<State>,
    settled: Notify,
}

#[derive(Default)]
struct State {
    next_tag: u64,
    /// Delivered or waiting, not yet acked or dead-lettered.
    open: HashSet<u64>,
    dead: Vec<(Vec<u8>, String)>,
}

/// Settles one delivery of a [`MemoryQueue`].
struct MemoryAcker {
    queue: MemoryQueue,
    tag: u64,
}

impl LocalAcker for MemoryAcker {
    fn ack(&self) {
        self.queue.settle(self.tag);
    }

    fn dead_letter(&self, body: &[u8], reason: &str) {
        self.queue.dead_letter(body.to_vec(), reason);
        self.queue.settle(self.tag);
    }

    fn requeue(&self, body: &[u8]) {
        self.queue.publish(body.to_vec());
        self.queue.settle(self.tag);
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryQueue {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        MemoryQueue {
            inner: Arc::new(Inner {
                tx,
                rx: tokio::sync::Mutex::new(rx),
                state: Mutex::new(State::default()),
                settled: Notify::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a message (an encoded batch of envelopes, as a publisher sends) at the tail.
    pub fn publish(&self, body: Vec<u8>) {
        let tag = {
            let mut state = self.state();
            state.next_tag += 1;
            let tag = state.next_tag;
            state.open.insert(tag);
            tag
        };
        // The receiver lives as long as `inner`: sending cannot fail.
        let _ = self.inner.tx.send((tag, body));
    }

    fn settle(&self, tag: u64) {
        let empty = {
            let mut state = self.state();
            state.open.remove(&tag);
            state.open.is_empty()
        };
        if empty {
            self.inner.settled.notify_waiters();
        }
    }

    pub(super) fn dead_letter(&self, body: Vec<u8>, reason: &str) {
        self.state().dead.push((body, reason.to_string()));
    }

    /// Messages published and not yet acked or dead-lettered.
    pub fn unsettled(&self) -> usize {
        self.state().open.len()
    }

    /// Waits until every message published so far is acked or dead-lettered (the
    /// subscriber applied it, or gave up on it); `false` after `timeout`.
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.settled.notified();
            if self.unsettled() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.unsettled() == 0;
            }
        }
    }

    /// What was dead-lettered, with the reason, in order.
    pub fn dead_letters(&self) -> Vec<(Vec<u8>, String)> {
        self.state().dead.clone()
    }

    pub(super) async fn next(&self) -> Option<Delivery> {
        let (tag, body) = self.inner.rx.lock().await.recv().await?;
        Some(Delivery {
            body,
            control: None,
            retried: false,
            signature: None,
            redelivered: false,
            queue: "memory".into(),
            routing_key: String::new(),
            acker: Acker::Memory(Box::new(MemoryAcker {
                queue: self.clone(),
                tag,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::inbox::Inbox;
    use super::*;

    #[tokio::test]
    async fn deliveries_settle_by_ack_dead_letter_or_hand_back() {
        let queue = MemoryQueue::new();
        let mut inbox = Inbox::Memory(queue.clone());
        queue.publish(b"one".to_vec());
        queue.publish(b"two".to_vec());
        queue.publish(b"three".to_vec());
        let one = inbox.next().await.unwrap().unwrap();
        assert_eq!(one.body, b"one");
        one.ack().await.unwrap();
        let two = inbox.next().await.unwrap().unwrap();
        inbox.move_to_tail(&two).await.unwrap();
        let three = inbox.next().await.unwrap().unwrap();
        three.dead_letter().await.unwrap();
        assert_eq!(queue.unsettled(), 1);
        assert!(!queue.wait_settled(Duration::from_millis(20)).await);
        let again = inbox.next().await.unwrap().unwrap();
        assert_eq!(again.body, b"two");
        again.ack().await.unwrap();
        assert!(queue.wait_settled(Duration::from_millis(20)).await);
        assert_eq!(queue.dead_letters()[0].0, b"three");
    }
}
