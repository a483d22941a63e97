//! The deliveries a worker holds unacked, and which transactions keep each of them: a
//! delivery is acked once every envelope in it is settled (applied, staged or
//! dead-lettered), whichever transactions they belong to.

use crate::txn::TxId;
use kausal_bus::amqp::Delivery;
use kausal_bus::Envelope;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

pub(super) struct Held {
    pub(super) delivery: Delivery,
    /// Envelopes of this delivery not yet applied or dead-lettered.
    pub(super) remaining: usize,
    pub(super) received: Instant,
    /// Highest sequence number in it: hand-back order.
    pub(super) max_seq: u64,
}

#[derive(Default)]
pub(super) struct Deliveries {
    next: u64,
    /// By delivery number, in the order received.
    pub(super) held: BTreeMap<u64, Held>,
    /// Which deliveries hold envelopes of a transaction (with the count per delivery).
    owners: HashMap<TxId, Vec<(u64, usize)>>,
}

impl Deliveries {
    /// A number for the next delivery received.
    pub(super) fn number(&mut self) -> u64 {
        self.next += 1;
        self.next - 1
    }

    /// Holds delivery `d` until `remaining` envelopes of it are settled.
    pub(super) fn hold(&mut self, d: u64, delivery: Delivery, remaining: usize, max_seq: u64) {
        self.held.insert(
            d,
            Held {
                delivery,
                remaining,
                received: Instant::now(),
                max_seq,
            },
        );
    }

    /// One envelope of delivery `d` is settled on its own (staged, dead-lettered).
    pub(super) fn settle_one(&mut self, d: u64) {
        if let Some(h) = self.held.get_mut(&d) {
            h.remaining = h.remaining.saturating_sub(1);
        }
    }

    /// One more envelope of delivery `d` belongs to transaction `id`.
    pub(super) fn own(&mut self, id: TxId, d: u64) {
        let owners = self.owners.entry(id).or_default();
        match owners.iter_mut().find(|(o, _)| *o == d) {
            Some((_, n)) => *n += 1,
            None => owners.push((d, 1)),
        }
    }

    /// The transaction is settled: its envelopes no longer keep deliveries unacked.
    pub(super) fn release(&mut self, id: &TxId) {
        for (d, n) in self.owners.remove(id).unwrap_or_default() {
            if let Some(h) = self.held.get_mut(&d) {
                h.remaining = h.remaining.saturating_sub(n);
            }
        }
    }

    /// The deliveries with nothing left to settle, removed: to be acked.
    pub(super) fn take_finished(&mut self) -> Vec<Held> {
        let done: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| h.remaining == 0)
            .map(|(d, _)| *d)
            .collect();
        done.into_iter()
            .filter_map(|d| self.held.remove(&d))
            .collect()
    }

    /// How many deliveries are held per queue.
    pub(super) fn per_queue(&self) -> HashMap<&str, usize> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for h in self.held.values() {
            *counts.entry(&h.delivery.queue).or_default() += 1;
        }
        counts
    }

    /// Takes delivery `d` back (to move it to the tail of its queue), with the
    /// transactions no other held delivery has envelopes of: they come back with it.
    pub(super) fn give_back(&mut self, d: u64) -> Option<(Held, Vec<TxId>)> {
        let h = self.held.remove(&d)?;
        let mut gone = Vec::new();
        for (id, owners) in self.owners.iter_mut() {
            owners.retain(|(o, _)| *o != d);
            if owners.is_empty() {
                gone.push(id.clone());
            }
        }
        for id in &gone {
            self.owners.remove(id);
        }
        Some((h, gone))
    }

    /// The envelopes of a transaction that the held deliveries carry, by part.
    pub(super) fn envelopes_of(&self, id: &TxId) -> Vec<Envelope> {
        let mut out = Vec::new();
        for (d, _) in self.owners.get(id).into_iter().flatten() {
            if let Some(h) = self.held.get(d) {
                if let Ok(envs) = kausal_bus::decode(&h.delivery.body) {
                    out.extend(envs.into_iter().filter(|e| {
                        *e.namespace == *id.namespace
                            && e.generation == id.generation
                            && e.seq == id.seq
                    }));
                }
            }
        }
        out.sort_by_key(|e| e.part);
        out.dedup_by_key(|e| e.part);
        out
    }

    /// The body and signature of the one signed message that carries a whole
    /// transaction, if it came so.
    pub(super) fn signed_alone(&self, id: &TxId) -> Option<(Vec<u8>, (String, String))> {
        match self.owners.get(id).map(Vec::as_slice) {
            Some([(d, _)]) => self
                .held
                .get(d)
                .and_then(|h| Some((h.delivery.body.clone(), h.delivery.signature.clone()?))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kausal_bus::amqp::{Inbox, MemoryQueue};

    fn tx(seq: u64) -> TxId {
        TxId {
            namespace: "shop".into(),
            generation: 1,
            seq,
        }
    }

    async fn received(queue: &MemoryQueue, n: usize) -> Vec<Delivery> {
        let mut inbox = Inbox::Memory(queue.clone());
        let mut out = Vec::new();
        for i in 0..n {
            queue.publish(vec![i as u8]);
            out.push(inbox.next().await.unwrap().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_delivery_is_finished_once_every_transaction_in_it_is_released() {
        let queue = MemoryQueue::new();
        let mut ds = Deliveries::default();
        let mut got = received(&queue, 2).await.into_iter();
        // Delivery a carries seq 1 and the first part of seq 2; b the rest of seq 2.
        let (a, b) = (ds.number(), ds.number());
        ds.hold(a, got.next().unwrap(), 2, 2);
        ds.hold(b, got.next().unwrap(), 1, 2);
        ds.own(tx(1), a);
        ds.own(tx(2), a);
        ds.own(tx(2), b);
        ds.release(&tx(2));
        assert!(
            ds.take_finished().len() == 1,
            "b is done, a still holds seq 1"
        );
        ds.release(&tx(1));
        assert_eq!(ds.take_finished().len(), 1);
        assert!(ds.held.is_empty());
    }

    #[tokio::test]
    async fn a_delivery_given_back_takes_along_only_what_no_other_delivery_holds() {
        let queue = MemoryQueue::new();
        let mut ds = Deliveries::default();
        let mut got = received(&queue, 2).await.into_iter();
        let (a, b) = (ds.number(), ds.number());
        ds.hold(a, got.next().unwrap(), 2, 3);
        ds.hold(b, got.next().unwrap(), 1, 3);
        ds.own(tx(3), a);
        ds.own(tx(4), a);
        ds.own(tx(3), b);
        let (_, gone) = ds.give_back(a).unwrap();
        assert_eq!(gone, vec![tx(4)]);
        assert!(ds.give_back(a).is_none());
        ds.release(&tx(3));
        assert_eq!(ds.take_finished().len(), 1, "b settles without a");
    }
}
