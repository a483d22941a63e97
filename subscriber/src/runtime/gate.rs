//! The gate of one worker: the transactions it holds complete, waiting for their
//! dependencies or being applied, and the step that asks the coordinator which can go.
//! What a transaction is waiting for is the coordinator's business ([`Coordinator`]);
//! the gate only keeps the two sets and moves transactions between them.

use crate::config::Mode;
use crate::coord::{Check, Coordinator, Query};
use crate::error::CoordError;
use crate::schedule::Wait;
use crate::txn::{Transaction, TxId};
use kausal_bus::deps::table_key;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// A complete transaction waiting for its dependencies.
pub(super) struct Waiting {
    pub(super) tx: Arc<Transaction>,
    pub(super) table_keys: Vec<u32>,
    pub(super) since: Instant,
    /// When it was last reported as waiting long.
    pub(super) reported: Option<Instant>,
    /// What it waited for at the last check.
    pub(super) wait: Option<Wait>,
}

/// Units of transactions to apply (each unit in order, in one store transaction), and
/// the streams (namespace, generation) whose gate state is unknown to the coordinator.
pub(super) type Ready = (Vec<Vec<Arc<Transaction>>>, Vec<(Arc<str>, u64)>);

pub(super) struct Gate {
    pub(super) waiting: HashMap<TxId, Waiting>,
    /// Transactions handed to appliers, with their commit time (for the lag).
    pub(super) applying: HashMap<TxId, i64>,
    key_space: u32,
}

impl Gate {
    pub(super) fn new(key_space: u32) -> Gate {
        Gate {
            waiting: HashMap::new(),
            applying: HashMap::new(),
            key_space,
        }
    }

    /// Whether the transaction is waiting or being applied.
    pub(super) fn holds(&self, id: &TxId) -> bool {
        self.waiting.contains_key(id) || self.applying.contains_key(id)
    }

    /// A complete transaction enters (or, after a failed group, enters again).
    pub(super) fn enter(&mut self, tx: Arc<Transaction>) {
        let table_keys = tx
            .tables
            .iter()
            .map(|t| table_key(t, self.key_space))
            .collect();
        self.applying.remove(&tx.id);
        self.waiting.insert(
            tx.id.clone(),
            Waiting {
                tx,
                table_keys,
                since: Instant::now(),
                reported: None,
                wait: None,
            },
        );
    }

    /// Asks the coordinator about every waiting transaction (in id order) and moves the
    /// ready ones to `applying`: one chain of at most `max` (when `chain`), or each ready
    /// one as a unit of its own.
    pub(super) async fn ready(
        &mut self,
        coord: &Coordinator,
        mode: Mode,
        chain: bool,
        max: usize,
    ) -> Result<Ready, CoordError> {
        let mut ids: Vec<TxId> = self.waiting.keys().cloned().collect();
        ids.sort();
        // The lowest `2 × max` of each stream: enough to fill a chain (or a round of
        // groups), and the lowest transaction of the stream held here, which is the one
        // that can always go, is among them. Checking every held transaction each time
        // cost more than it found once windows grew (with Redis, each one's
        // dependencies travel to the script): the others wait for the next round,
        // which every applied group starts.
        let per_stream = max.saturating_mul(2).max(1);
        let mut last: Option<(Arc<str>, u64)> = None;
        let mut taken = 0;
        ids.retain(|id| {
            let stream = (id.namespace.clone(), id.generation);
            if last.as_ref() != Some(&stream) {
                last = Some(stream);
                taken = 0;
            }
            taken += 1;
            taken <= per_stream
        });
        let (planned, checks) = {
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
            if chain {
                let (planned, checks) = coord.plan(mode, &queries, max).await?;
                (Some(planned), checks)
            } else {
                (None, coord.check(mode, &queries).await?)
            }
        };
        let mut ready = Vec::new();
        let mut unknown: Vec<(Arc<str>, u64)> = Vec::new();
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
                    if !unknown.contains(&key) {
                        unknown.push(key);
                    }
                }
            }
        }
        let units: Vec<Vec<TxId>> = match planned {
            // One unit, in chain order.
            Some(planned) => vec![planned.into_iter().map(|i| ids[i].clone()).collect()],
            None => ready.into_iter().map(|id| vec![id]).collect(),
        };
        let mut out = Vec::with_capacity(units.len());
        for unit in units {
            let mut txs = Vec::with_capacity(unit.len());
            for id in unit {
                if let Some(w) = self.waiting.remove(&id) {
                    self.applying.insert(id, w.tx.commit_ts_us);
                    txs.push(w.tx);
                }
            }
            if !txs.is_empty() {
                out.push(txs);
            }
        }
        Ok((out, unknown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::memory::MemoryCoord;
    use kausal_bus::{Dep, DepKind};

    fn tx(seq: u64, key: u32, version: u64, after: u64) -> Arc<Transaction> {
        Arc::new(Transaction {
            id: TxId {
                namespace: "shop".into(),
                generation: 1,
                seq,
            },
            position: String::new(),
            commit_ts_us: 0,
            txid: String::new(),
            context: Default::default(),
            changes: Vec::new(),
            deps: vec![Dep {
                k: key,
                v: version,
                kind: DepKind::Write,
                after,
            }],
            tables: Vec::new(),
            parts: 1,
            staged: None,
            part: None,
        })
    }

    fn seqs(units: &[Vec<Arc<Transaction>>]) -> Vec<Vec<u64>> {
        units
            .iter()
            .map(|u| u.iter().map(|t| t.id.seq).collect())
            .collect()
    }

    #[tokio::test]
    async fn an_unseen_stream_is_reported_unknown_and_nothing_leaves() {
        let coord = Coordinator::Memory(MemoryCoord::new());
        let mut gate = Gate::new(1 << 20);
        gate.enter(tx(1, 7, 1, 0));
        let (units, unknown) = gate.ready(&coord, Mode::Causal, false, 8).await.unwrap();
        assert!(units.is_empty());
        assert_eq!(unknown, vec![(Arc::from("shop"), 1)]);
        assert!(gate.holds(&tx(1, 7, 1, 0).id) && gate.applying.is_empty());
    }

    #[tokio::test]
    async fn a_dependent_transaction_waits_for_its_dependency_unless_chained_after_it() {
        let coord = Coordinator::Memory(MemoryCoord::new());
        let epoch = coord.epoch().await.unwrap();
        coord.init(&epoch, "shop", 1, 0, &[]).await.unwrap();
        // Seq 2 writes key 7 after seq 1 did.
        let mut gate = Gate::new(1 << 20);
        gate.enter(tx(2, 7, 2, 1));
        gate.enter(tx(1, 7, 1, 0));
        let (units, _) = gate.ready(&coord, Mode::Causal, false, 8).await.unwrap();
        assert_eq!(seqs(&units), vec![vec![1]]);
        assert!(gate.waiting[&tx(2, 7, 2, 1).id].wait.is_some());
        assert!(gate.applying.contains_key(&tx(1, 7, 1, 0).id));

        let mut chained = Gate::new(1 << 20);
        chained.enter(tx(2, 7, 2, 1));
        chained.enter(tx(1, 7, 1, 0));
        let (units, _) = chained.ready(&coord, Mode::Causal, true, 8).await.unwrap();
        assert_eq!(seqs(&units), vec![vec![1, 2]], "one chain, in order");
        assert!(chained.waiting.is_empty());
    }

    #[tokio::test]
    async fn a_failed_transaction_enters_again_and_leaves_applying() {
        let coord = Coordinator::Memory(MemoryCoord::new());
        let epoch = coord.epoch().await.unwrap();
        coord.init(&epoch, "shop", 1, 0, &[]).await.unwrap();
        let mut gate = Gate::new(1 << 20);
        gate.enter(tx(1, 7, 1, 0));
        let (mut units, _) = gate.ready(&coord, Mode::Causal, false, 8).await.unwrap();
        let again = units.remove(0).remove(0);
        gate.enter(again);
        assert!(gate.applying.is_empty() && gate.waiting.len() == 1);
    }
}
