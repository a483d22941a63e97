//! In-process coordination: one worker process, gate state in a map.

use super::{Check, Query};
use crate::config::Mode;
use crate::schedule::{Plan, Progress};
use crate::txn::TxId;
use kausal_bus::Dep;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Default)]
pub struct MemoryCoord {
    state: Mutex<HashMap<(Arc<str>, u64), Progress>>,
    pub(crate) wake: Arc<Notify>,
}

impl MemoryCoord {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Arc<str>, u64), Progress>> {
        // A panic while holding the lock cannot leave Progress half-updated in a way
        // that breaks the rule (every update is a single insert/max), so poison is moot.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn check(&self, mode: Mode, queries: &[Query<'_>]) -> Vec<Check> {
        let state = self.lock();
        queries
            .iter()
            .map(
                |q| match state.get(&(q.id.namespace.clone(), q.id.generation)) {
                    None => Check::Unknown,
                    Some(p) => match p.check(mode, q.id.seq, q.deps, q.table_keys) {
                        None => Check::Ready,
                        Some(w) => Check::Waiting(w),
                    },
                },
            )
            .collect()
    }

    /// A chain for one store transaction: indices into `queries` (which must be sorted
    /// by sequence number) in apply order, each ready once those before it are applied;
    /// at most `max`. The others get their check as in [`MemoryCoord::check`].
    pub fn plan(&self, mode: Mode, queries: &[Query<'_>], max: usize) -> (Vec<usize>, Vec<Check>) {
        let state = self.lock();
        let mut plans: HashMap<(Arc<str>, u64), Plan<'_>> = HashMap::new();
        let mut chain = Vec::new();
        let mut checks = Vec::with_capacity(queries.len());
        for (i, q) in queries.iter().enumerate() {
            let key = (q.id.namespace.clone(), q.id.generation);
            let Some(base) = state.get(&key) else {
                checks.push(Check::Unknown);
                continue;
            };
            let plan = plans.entry(key).or_insert_with(|| Plan::new(base));
            match plan.check(mode, q.id.seq, q.deps, q.table_keys) {
                None if chain.len() < max => {
                    plan.add(q.id.seq, q.deps);
                    chain.push(i);
                    checks.push(Check::Ready);
                }
                None => checks.push(Check::Waiting(crate::schedule::Wait::Previous {
                    seq: q.id.seq.saturating_sub(1),
                })),
                Some(w) => checks.push(Check::Waiting(w)),
            }
        }
        (chain, checks)
    }

    pub fn init(&self, namespace: &str, generation: u64, through: u64, applied: &[u64]) {
        self.lock()
            .entry((namespace.into(), generation))
            .or_insert_with(|| Progress::from_store(through, applied.iter().copied()));
    }

    /// Marks what the store recorded as applied; false when the state does not exist.
    pub fn merge(&self, namespace: &str, generation: u64, through: u64, applied: &[u64]) -> bool {
        let mut state = self.lock();
        let Some(p) = state.get_mut(&(namespace.into(), generation)) else {
            return false;
        };
        if p.merge(through, applied) {
            drop(state);
            self.wake.notify_waiters();
        }
        true
    }

    pub fn join(&self, namespace: &str, generation: u64, through: u64) {
        if let Some(p) = self.lock().get_mut(&(namespace.into(), generation)) {
            if p.watermark == 0 && through > 0 {
                let above: Vec<u64> = p.above.iter().copied().filter(|s| *s > through).collect();
                *p = Progress::from_store(through, above);
            }
        }
        self.wake.notify_waiters();
    }

    pub fn applied(&self, done: &[(&TxId, Option<&[Dep]>)]) -> Vec<TxId> {
        let mut missing = Vec::new();
        {
            let mut state = self.lock();
            for (id, deps) in done {
                match state.get_mut(&(id.namespace.clone(), id.generation)) {
                    Some(p) => {
                        p.applied(id.seq, *deps);
                    }
                    None => missing.push((*id).clone()),
                }
            }
        }
        self.wake.notify_waiters();
        missing
    }

    pub fn watermark(&self, namespace: &str, generation: u64) -> Option<u64> {
        self.lock()
            .get(&(namespace.into(), generation))
            .map(|p| p.watermark)
    }
}
