//! The dependency tracker: per-key counters kept in the publisher's memory, in commit
//! order (the protocol of ARCHITECTURE.md and docs/wire-format.md, after Promiscuous/Synapse).
//!
//! For each hashed key `k`: `rw` counts operations (reads and writes), `w` is `rw` at the
//! last write, and the sequence numbers of the last transaction that touched / wrote it.
//! A transaction performs at most one operation per key: its first touch assigns the
//! version, and a later write to a key it only read upgrades that operation to a write
//! (same version). A subscriber therefore counts each key once per transaction.
//!
//! - write: `v = ++rw; w = v` → dep `(k, v, write, after = last_seq)`; satisfied at a
//!   subscriber when `rw' >= v - 1`.
//! - read: `++rw` → dep `(k, w, read, after = last_write_seq)`; satisfied when `rw' >= w`.

use kausal_bus::{Dep, DepKind};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyState {
    pub rw: u64,
    pub w: u64,
    pub last_seq: u64,
    pub last_write_seq: u64,
}

/// Counters and sequence state; what a checkpoint stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerState {
    pub generation: u64,
    /// Size of the hashed key space the counters were computed in; fixed for a
    /// generation (a different space would give the same rows different keys).
    pub key_space: u32,
    /// Sequence number the next transaction gets.
    pub next_seq: u64,
    pub keys: HashMap<u32, KeyState>,
    /// Fingerprint of each table's published schema, to flag schema changes.
    pub schemas: HashMap<String, u64>,
}

impl TrackerState {
    /// The state of a new generation (numbered by the current time in milliseconds, so
    /// later generations have higher numbers), logged loudly: subscribers of the
    /// namespace start over.
    pub fn new_generation(key_space: u32, checkpoint: &std::path::Path) -> Self {
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        tracing::warn!(
            generation,
            checkpoint = %checkpoint.display(),
            "no checkpoint found: starting a NEW GENERATION (sequence numbers restart at 1; \
             subscribers of this namespace reset their dependency state)"
        );
        TrackerState::new(generation, key_space)
    }

    pub fn new(generation: u64, key_space: u32) -> Self {
        TrackerState {
            generation,
            key_space,
            next_seq: 1,
            keys: HashMap::new(),
            schemas: HashMap::new(),
        }
    }
}

#[derive(Clone, Copy)]
struct Seen {
    kind: DepKind,
    version: u64,
    prev_last_seq: u64,
}

/// Computes the dependencies of the transaction being decoded.
pub struct Tracker {
    pub state: TrackerState,
    /// The open transaction's sequence number, once it has one.
    current: Option<u64>,
    seen: HashMap<u32, Seen>,
    /// Deps of the part being built; index by key to upgrade in place.
    part: Vec<Dep>,
    part_index: HashMap<u32, usize>,
}

impl Tracker {
    pub fn new(state: TrackerState) -> Self {
        Tracker {
            state,
            current: None,
            seen: HashMap::new(),
            part: Vec::new(),
            part_index: HashMap::new(),
        }
    }

    /// The sequence number of the open transaction, assigning one on first use.
    pub fn seq(&mut self) -> u64 {
        *self.current.get_or_insert(self.state.next_seq)
    }

    pub fn in_transaction(&self) -> bool {
        self.current.is_some()
    }

    pub fn read(&mut self, k: u32) {
        let seq = self.seq();
        if self.seen.contains_key(&k) {
            return;
        }
        let st = self.state.keys.entry(k).or_default();
        st.rw += 1;
        let dep = Dep {
            k,
            v: st.w,
            kind: DepKind::Read,
            after: st.last_write_seq,
        };
        self.seen.insert(
            k,
            Seen {
                kind: DepKind::Read,
                version: st.rw,
                prev_last_seq: st.last_seq,
            },
        );
        st.last_seq = seq;
        self.push(dep);
    }

    pub fn write(&mut self, k: u32) {
        let seq = self.seq();
        let st = self.state.keys.entry(k).or_default();
        let dep = match self.seen.get_mut(&k) {
            Some(seen) if seen.kind == DepKind::Write => return,
            Some(seen) => {
                // Upgrade this transaction's read of k to a write at the same version.
                seen.kind = DepKind::Write;
                st.w = seen.version;
                st.last_write_seq = seq;
                Dep {
                    k,
                    v: seen.version,
                    kind: DepKind::Write,
                    after: seen.prev_last_seq,
                }
            }
            None => {
                st.rw += 1;
                st.w = st.rw;
                let dep = Dep {
                    k,
                    v: st.rw,
                    kind: DepKind::Write,
                    after: st.last_seq,
                };
                self.seen.insert(
                    k,
                    Seen {
                        kind: DepKind::Write,
                        version: st.rw,
                        prev_last_seq: st.last_seq,
                    },
                );
                st.last_seq = seq;
                st.last_write_seq = seq;
                dep
            }
        };
        self.push(dep);
    }

    fn push(&mut self, dep: Dep) {
        match self.part_index.get(&dep.k) {
            Some(&i) => self.part[i] = dep,
            None => {
                self.part_index.insert(dep.k, self.part.len());
                self.part.push(dep);
            }
        }
    }

    /// Deps of the part being built; starts the next part.
    pub fn take_part(&mut self) -> Vec<Dep> {
        self.part_index.clear();
        std::mem::take(&mut self.part)
    }

    /// Closes the open transaction.
    pub fn commit(&mut self) {
        if self.current.take().is_some() {
            self.state.next_seq += 1;
        }
        self.seen.clear();
        self.part.clear();
        self.part_index.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(k: u32, v: u64, kind: DepKind, after: u64) -> Dep {
        Dep { k, v, kind, after }
    }

    #[test]
    fn writes_chain_and_reads_between_writes_share_a_version() {
        let mut t = Tracker::new(TrackerState::new(1, 1 << 20));
        t.write(5);
        assert_eq!(t.take_part(), vec![dep(5, 1, DepKind::Write, 0)]);
        t.commit();
        t.read(5);
        assert_eq!(t.take_part(), vec![dep(5, 1, DepKind::Read, 1)]);
        t.commit();
        t.read(5);
        assert_eq!(t.take_part(), vec![dep(5, 1, DepKind::Read, 1)]);
        t.commit();
        // The next write waits for both reads: v - 1 = 3 operations.
        t.write(5);
        assert_eq!(t.take_part(), vec![dep(5, 4, DepKind::Write, 3)]);
        t.commit();
        assert_eq!(t.state.next_seq, 5);
    }

    #[test]
    fn one_operation_per_key_per_transaction() {
        let mut t = Tracker::new(TrackerState::new(1, 1 << 20));
        t.read(9);
        t.write(9);
        t.write(9);
        t.read(9);
        assert_eq!(t.take_part(), vec![dep(9, 1, DepKind::Write, 0)]);
        t.commit();
        assert_eq!(t.state.keys[&9].rw, 1);
        assert_eq!(t.state.keys[&9].w, 1);
    }

    #[test]
    fn a_read_upgraded_in_a_later_part_keeps_its_version() {
        let mut t = Tracker::new(TrackerState::new(1, 1 << 20));
        t.write(1);
        t.commit();
        t.read(1);
        assert_eq!(t.take_part(), vec![dep(1, 1, DepKind::Read, 1)]);
        t.write(1);
        assert_eq!(t.take_part(), vec![dep(1, 2, DepKind::Write, 1)]);
        t.commit();
        t.read(1);
        assert_eq!(t.take_part(), vec![dep(1, 2, DepKind::Read, 2)]);
    }
}
