//! The causal gate: when may a transaction be applied?
//!
//! Per namespace and generation a subscriber keeps
//! - the *watermark* `W`: every transaction `1..=W` has been applied, and the set of
//!   applied sequence numbers above it;
//! - a *counter* `rw'[k]` per key, which may be **unknown**.
//!
//! A dependency `{k, v, kind, after}` is met when `W >= after` (the sequence fallback:
//! always sound, needs no counters), or when `rw'[k]` is known and `rw'[k] >= v` for a
//! read, `rw'[k] >= v - 1` for a write (the version-vector rule of ARCHITECTURE.md, which lets
//! independent transactions overtake a slow one).
//!
//! Counters need no persistence. Applying a write of `k` at version `v` happens only
//! after every earlier operation on `k` (both rules guarantee it), and no later one can
//! run before it, so afterwards `rw'[k]` is exactly `v`: the counter becomes known. A
//! read adds 1 to a known counter and leaves an unknown one unknown. After a restart or a
//! Redis flush all counters are unknown, the watermark (read back from the store, where
//! it is written in the same transaction as the rows) carries the gate, and counters
//! are re-learned from the next write of each key. A counter may be *lower* than the
//! truth (a crash between the store commit and the counter update): that only makes a
//! transaction wait for the watermark. It is never higher: counters are only bumped by
//! the worker whose store transaction actually applied the transaction, once.
//!
//! `docs/subscriber.md` has the argument in full.

use crate::config::Mode;
use kausal_bus::{Dep, DepKind};
use std::collections::{BTreeSet, HashMap};

/// What a waiting transaction waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// A dependency on this key, met at the latest when transaction `after` is applied.
    Dep { k: u32, v: u64, after: u64 },
    /// `serial` mode: the previous transaction.
    Previous { seq: u64 },
}

impl Wait {
    /// The sequence number whose application will release this wait at the latest.
    pub fn seq(&self) -> u64 {
        match self {
            Wait::Dep { after, .. } => *after,
            Wait::Previous { seq } => *seq,
        }
    }
}

/// Which dependencies a mode honours.
pub fn relevant(mode: Mode, dep: &Dep, table_keys: &[u32]) -> bool {
    match mode {
        Mode::Causal => true,
        // Writes keep per-key order; the table key read keeps row changes after an earlier
        // truncate of their table.
        Mode::Key => dep.kind == DepKind::Write || table_keys.contains(&dep.k),
        Mode::Serial => false,
    }
}

/// Whether one dependency is met, given the watermark and the key's counter.
pub fn dep_met(dep: &Dep, watermark: u64, counter: Option<u64>) -> bool {
    if watermark >= dep.after {
        return true;
    }
    match (counter, dep.kind) {
        (Some(c), DepKind::Read) => c >= dep.v,
        (Some(c), DepKind::Write) => c + 1 >= dep.v,
        (None, _) => false,
    }
}

/// Gate state of one namespace and generation, in memory.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    pub watermark: u64,
    /// Applied sequence numbers above the watermark.
    pub above: BTreeSet<u64>,
    /// Known counters; absent means unknown, or 0 while `complete`.
    pub counters: HashMap<u32, u64>,
    /// Nothing was lost since the generation began (fresh state, nothing applied before):
    /// every counter is known, an absent one is 0.
    pub complete: bool,
}

impl Progress {
    /// Starts from what a store recorded.
    pub fn from_store(watermark: u64, applied: impl IntoIterator<Item = u64>) -> Self {
        let mut p = Progress {
            watermark,
            ..Progress::default()
        };
        for s in applied {
            p.mark(s);
        }
        // Nothing applied yet: every true counter is 0.
        p.complete = p.watermark == 0 && p.above.is_empty();
        p
    }

    /// The counter of `k`, if known.
    pub fn counter(&self, k: u32) -> Option<u64> {
        match self.counters.get(&k) {
            Some(c) => Some(*c),
            None if self.complete => Some(0),
            None => None,
        }
    }

    pub fn is_applied(&self, seq: u64) -> bool {
        seq <= self.watermark || self.above.contains(&seq)
    }

    /// Marks seqs the store recorded as applied (everything through `through`, and
    /// `applied`) that this state missed; their counter updates are lost, so counters
    /// become unknown unless learned. Returns whether anything changed.
    pub fn merge(&mut self, through: u64, applied: &[u64]) -> bool {
        let before = (self.watermark, self.above.len());
        if through > self.watermark {
            self.above.retain(|s| *s > through);
            self.watermark = through;
            while self.above.remove(&(self.watermark + 1)) {
                self.watermark += 1;
            }
        }
        for s in applied {
            self.mark(*s);
        }
        let changed = before != (self.watermark, self.above.len());
        if changed {
            self.complete = false;
        }
        changed
    }

    /// `None` when the transaction may be applied now, else the first thing it waits for.
    pub fn check(&self, mode: Mode, seq: u64, deps: &[Dep], table_keys: &[u32]) -> Option<Wait> {
        check_in(self, mode, seq, deps, table_keys)
    }

    /// Records that the store applied `seq`. With `deps` the counters move too; pass
    /// `None` when the store found it already applied (a redelivery), whose counter
    /// updates may or may not have happened: leaving them alone can only leave a
    /// counter low. Returns false when `seq` was already recorded.
    pub fn applied(&mut self, seq: u64, deps: Option<&[Dep]>) -> bool {
        apply_in(self, seq, deps.unwrap_or(&[]))
    }
}

/// Plans a chain: transactions to apply one after the other in one store transaction,
/// each ready once those before it are applied. An overlay on [`Progress`] that is
/// thrown away: the real state moves only when the store committed.
pub struct Plan<'a> {
    base: &'a Progress,
    watermark: u64,
    above: BTreeSet<u64>,
    counters: HashMap<u32, u64>,
}

impl<'a> Plan<'a> {
    pub fn new(base: &'a Progress) -> Self {
        Plan {
            base,
            watermark: base.watermark,
            above: base.above.clone(),
            counters: HashMap::new(),
        }
    }

    pub fn check(&self, mode: Mode, seq: u64, deps: &[Dep], table_keys: &[u32]) -> Option<Wait> {
        check_in(self, mode, seq, deps, table_keys)
    }

    /// Takes `seq` into the chain: later checks see it as applied.
    pub fn add(&mut self, seq: u64, deps: &[Dep]) {
        apply_in(self, seq, deps);
    }
}

/// What the rule needs of gate state; shared by [`Progress`] and [`Plan`].
trait State {
    fn watermark(&self) -> u64;
    fn is_applied(&self, seq: u64) -> bool;
    fn counter(&self, k: u32) -> Option<u64>;
    fn set_counter(&mut self, k: u32, c: u64);
    fn mark(&mut self, seq: u64);
}

impl State for Progress {
    fn watermark(&self) -> u64 {
        self.watermark
    }
    fn is_applied(&self, seq: u64) -> bool {
        Progress::is_applied(self, seq)
    }
    fn counter(&self, k: u32) -> Option<u64> {
        Progress::counter(self, k)
    }
    fn set_counter(&mut self, k: u32, c: u64) {
        self.counters.insert(k, c);
    }
    fn mark(&mut self, seq: u64) {
        mark(&mut self.watermark, &mut self.above, seq)
    }
}

impl State for Plan<'_> {
    fn watermark(&self) -> u64 {
        self.watermark
    }
    fn is_applied(&self, seq: u64) -> bool {
        seq <= self.watermark || self.above.contains(&seq)
    }
    fn counter(&self, k: u32) -> Option<u64> {
        self.counters
            .get(&k)
            .copied()
            .or_else(|| self.base.counter(k))
    }
    fn set_counter(&mut self, k: u32, c: u64) {
        self.counters.insert(k, c);
    }
    fn mark(&mut self, seq: u64) {
        mark(&mut self.watermark, &mut self.above, seq)
    }
}

fn check_in<S: State>(
    s: &S,
    mode: Mode,
    seq: u64,
    deps: &[Dep],
    table_keys: &[u32],
) -> Option<Wait> {
    if s.is_applied(seq) {
        // A redelivery: the store will recognise it; nothing to wait for.
        return None;
    }
    if mode == Mode::Serial {
        return (s.watermark() + 1 < seq).then_some(Wait::Previous { seq: seq - 1 });
    }
    deps.iter()
        .filter(|d| relevant(mode, d, table_keys))
        .find(|d| !dep_met(d, s.watermark(), s.counter(d.k)))
        .map(|d| Wait::Dep {
            k: d.k,
            v: d.v,
            after: d.after,
        })
}

fn apply_in<S: State>(s: &mut S, seq: u64, deps: &[Dep]) -> bool {
    if s.is_applied(seq) {
        return false;
    }
    s.mark(seq);
    for d in deps {
        match d.kind {
            DepKind::Write => {
                let c = s.counter(d.k).unwrap_or(0).max(d.v);
                s.set_counter(d.k, c);
            }
            DepKind::Read => {
                // Only a read that ran after the write it saw is counted: in `key` mode
                // a read may run early, and counting it then would let the next write
                // pass before the one this read saw. Not counting leaves the counter
                // low, which is safe.
                if let Some(c) = s.counter(d.k).filter(|c| *c >= d.v) {
                    s.set_counter(d.k, c + 1);
                }
            }
        }
    }
    true
}

fn mark(watermark: &mut u64, above: &mut BTreeSet<u64>, seq: u64) {
    if seq <= *watermark {
        return;
    }
    above.insert(seq);
    while above.remove(&(*watermark + 1)) {
        *watermark += 1;
    }
}

#[cfg(test)]
mod tests;
