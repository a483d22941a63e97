//! Which of the namespace's slots a message goes to (routing key
//! `<namespace>.changes.<slot>`): a subscriber app with several partition queues binds
//! each to a share of the slots, and each worker process owns some partitions. The
//! point is that dependent transactions meet in one process, which applies a chain of
//! them in one store transaction, while independent ones spread over the processes.
//!
//! The rule, per message: if a transaction in it depends on a recent transaction of
//! an earlier message (its `after` lies within [`HORIZON`] sequence numbers), the
//! message follows the most recent such parent into its slot; otherwise it takes the
//! next slot in turn. A parent further back has almost surely been applied already, so
//! following it would only concentrate load. Routing is an optimisation only: any
//! message may reach any process, and the causal gate keeps the order.

use kausal_bus::Envelope;

/// How far back a parent still counts: a few windows of a busy stream.
pub const HORIZON: u64 = 4096;

pub struct Router {
    /// The slot each recent sequence number went to, at `seq % HORIZON`.
    ring: Vec<(u64, u8)>,
    next_free: u8,
    /// The message being filled: its first sequence number and best parent so far.
    first: u64,
    parent: u64,
    seqs: Vec<u64>,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            ring: vec![(0, 0); HORIZON as usize],
            next_free: 0,
            first: 0,
            parent: 0,
            seqs: Vec::new(),
        }
    }
}

impl Router {
    /// Takes one envelope of the message being filled into account.
    pub fn observe(&mut self, e: &Envelope) {
        if self.seqs.is_empty() {
            self.first = e.seq;
        }
        if self.seqs.last() != Some(&e.seq) {
            self.seqs.push(e.seq);
        }
        let floor = self.first.saturating_sub(HORIZON);
        for d in &e.deps {
            // Only parents in earlier messages: this message's own ones travel with it.
            if d.after > floor && d.after < self.first && d.after > self.parent {
                self.parent = d.after;
            }
        }
    }

    /// The slot of the message observed since the last call, remembered for the
    /// messages after it.
    pub fn finish(&mut self) -> u8 {
        let slots = kausal_bus::amqp::SLOTS as u8;
        let slot = match self.ring[(self.parent % HORIZON) as usize] {
            (seq, slot) if self.parent > 0 && seq == self.parent => slot,
            _ => {
                let s = self.next_free;
                self.next_free = (self.next_free + 1) % slots;
                s
            }
        };
        for seq in self.seqs.drain(..) {
            self.ring[(seq % HORIZON) as usize] = (seq, slot);
        }
        self.parent = 0;
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kausal_bus::{Dep, DepKind};

    fn env(seq: u64, afters: &[u64]) -> Envelope {
        Envelope {
            namespace: "ns".into(),
            generation: 1,
            seq,
            part: 0,
            parts: Some(1),
            position: String::new(),
            commit_ts_us: 0,
            txid: String::new(),
            context: Default::default(),
            schemas: Vec::new(),
            changes: Vec::new(),
            deps: afters
                .iter()
                .enumerate()
                .map(|(i, a)| Dep {
                    k: i as u32,
                    v: 1,
                    kind: DepKind::Write,
                    after: *a,
                })
                .collect(),
            snapshot: None,
        }
    }

    fn route(r: &mut Router, message: &[Envelope]) -> u8 {
        for e in message {
            r.observe(e);
        }
        r.finish()
    }

    #[test]
    fn independent_messages_take_the_slots_in_turn() {
        let mut r = Router::default();
        let slots: Vec<u8> = (1..=3).map(|s| route(&mut r, &[env(s, &[])])).collect();
        assert_eq!(slots, vec![0, 1, 2]);
    }

    #[test]
    fn a_message_follows_its_most_recent_parent() {
        let mut r = Router::default();
        let a = route(&mut r, &[env(1, &[])]);
        let b = route(&mut r, &[env(2, &[])]);
        assert_ne!(a, b);
        // Depends on 1 and 2: the more recent one, 2, wins.
        assert_eq!(route(&mut r, &[env(3, &[1, 2])]), b);
        // A parent inside the same message does not count; 1 does.
        assert_eq!(route(&mut r, &[env(4, &[]), env(5, &[4, 1])]), a);
    }

    #[test]
    fn a_parent_beyond_the_horizon_is_not_followed() {
        let mut r = Router::default();
        let a = route(&mut r, &[env(1, &[])]);
        let far = 2 + HORIZON;
        assert_ne!(route(&mut r, &[env(far, &[1])]), a);
    }
}
