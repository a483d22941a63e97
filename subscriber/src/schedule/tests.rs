//! Property test of the gate: random histories, random delivery orders with duplicates
//! and lost counters; the result must equal serial application and no dependency may be
//! violated.

use super::*;
use proptest::prelude::*;

/// One operation of a generated transaction: read or write of a small key.
#[derive(Debug, Clone, Copy)]
struct Touch {
    key: u32,
    write: bool,
}

/// The publisher's rule (tracker.rs), restated: one operation per key per transaction,
/// a read upgraded to a write keeps its version.
fn publish(history: &[Vec<Touch>]) -> Vec<Vec<Dep>> {
    let mut rw: HashMap<u32, u64> = HashMap::new();
    let mut w: HashMap<u32, u64> = HashMap::new();
    let mut last: HashMap<u32, u64> = HashMap::new();
    let mut last_write: HashMap<u32, u64> = HashMap::new();
    let mut out = Vec::new();
    for (i, txn) in history.iter().enumerate() {
        let seq = i as u64 + 1;
        let mut deps: Vec<Dep> = Vec::new();
        for t in txn {
            if let Some(d) = deps.iter_mut().find(|d| d.k == t.key) {
                if t.write && d.kind == DepKind::Read {
                    // Upgrade: the version this transaction took becomes a write.
                    d.kind = DepKind::Write;
                    d.v = rw[&t.key];
                    d.after = last.get(&t.key).copied().unwrap_or(0);
                }
                continue;
            }
            let before = last.get(&t.key).copied().unwrap_or(0);
            let c = rw.entry(t.key).or_insert(0);
            *c += 1;
            if t.write {
                deps.push(Dep {
                    k: t.key,
                    v: *c,
                    kind: DepKind::Write,
                    after: before,
                });
            } else {
                let seen = w.get(&t.key).copied().unwrap_or(0);
                let after = last_write.get(&t.key).copied().unwrap_or(0);
                deps.push(Dep {
                    k: t.key,
                    v: seen,
                    kind: DepKind::Read,
                    after,
                });
            }
        }
        for d in &deps {
            last.insert(d.k, seq);
            if d.kind == DepKind::Write {
                w.insert(d.k, d.v);
                last_write.insert(d.k, seq);
            }
        }
        // `last` must reflect only earlier transactions while computing `after`, which
        // holds because it is updated after the loop.
        out.push(deps);
    }
    out
}

/// For each transaction, the value each key holds when it runs (the seq of the last
/// writer), plus the final state: what serial application observes.
type Observed = Vec<Vec<(u32, u64)>>;

fn run_serial(history: &[Vec<Touch>]) -> (Observed, HashMap<u32, u64>) {
    let mut state = HashMap::new();
    let mut seen = Vec::new();
    for (i, txn) in history.iter().enumerate() {
        seen.push(observe(txn, &state));
        for t in txn.iter().filter(|t| t.write) {
            state.insert(t.key, i as u64 + 1);
        }
    }
    (seen, state)
}

fn observe(txn: &[Touch], state: &HashMap<u32, u64>) -> Vec<(u32, u64)> {
    let mut keys: Vec<u32> = txn.iter().map(|t| t.key).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|k| (k, state.get(&k).copied().unwrap_or(0)))
        .collect()
}

fn history() -> impl Strategy<Value = Vec<Vec<Touch>>> {
    let touch = (0u32..6, any::<bool>()).prop_map(|(key, write)| Touch { key, write });
    prop::collection::vec(prop::collection::vec(touch, 0..4), 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_delivery_order_equals_serial_application(
        history in history(),
        seed in any::<u64>(),
    ) {
        let deps = publish(&history);
        let (serial_seen, serial_state) = run_serial(&history);
        let n = history.len();
        // A delivery order: a random permutation with some duplicates; the gate must
        // cope with anything the broker can do.
        let mut rng = seed;
        let mut next = || {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            rng
        };
        let mut pending: Vec<usize> = (0..n).collect();
        for _ in 0..n / 3 {
            pending.push((next() % n as u64) as usize);
        }
        let mut progress = Progress::from_store(0, []);
        let mut store_applied: BTreeSet<u64> = BTreeSet::new();
        let mut state: HashMap<u32, u64> = HashMap::new();
        let mut seen: Vec<Option<Vec<(u32, u64)>>> = vec![None; n];
        let mut steps = 0;
        while !pending.is_empty() {
            steps += 1;
            prop_assert!(steps < 100_000, "livelock");
            // Sometimes the worker restarts: counters are lost, the store's record stays.
            if next() % 17 == 0 {
                progress = Progress::from_store(0, store_applied.iter().copied());
            }
            // Sometimes a planned chain: transactions applied in order in one store
            // transaction, each planned as if those before it were applied.
            if next() % 4 == 0 {
                let mut candidates = pending.clone();
                candidates.sort();
                candidates.dedup();
                let mut plan = Plan::new(&progress);
                let mut chain = Vec::new();
                for i in candidates {
                    let seq = i as u64 + 1;
                    if plan.check(Mode::Causal, seq, &deps[i], &[]).is_none() {
                        plan.add(seq, &deps[i]);
                        chain.push(i);
                    }
                }
                prop_assert!(!chain.is_empty(), "nothing can run: {:?}", pending);
                for i in chain {
                    let j = pending.iter().position(|&p| p == i).unwrap();
                    pending.swap_remove(j);
                    let seq = i as u64 + 1;
                    if store_applied.insert(seq) {
                        seen[i] = Some(observe(&history[i], &state));
                        for t in history[i].iter().filter(|t| t.write) {
                            state.insert(t.key, seq);
                        }
                    }
                }
                // The chain committed; the coordinator learns it afterwards.
                for &seq in store_applied.iter() {
                    let i = seq as usize - 1;
                    if !progress.is_applied(seq) {
                        progress.applied(seq, Some(&deps[i]));
                    }
                }
                continue;
            }
            let ready: Vec<usize> = pending
                .iter()
                .enumerate()
                .filter(|(_, &i)| progress.check(Mode::Causal, i as u64 + 1, &deps[i], &[]).is_none())
                .map(|(j, _)| j)
                .collect();
            prop_assert!(!ready.is_empty(), "nothing can run: {:?}", pending);
            let j = ready[(next() % ready.len() as u64) as usize];
            let i = pending.swap_remove(j);
            let seq = i as u64 + 1;
            if store_applied.insert(seq) {
                seen[i] = Some(observe(&history[i], &state));
                for t in history[i].iter().filter(|t| t.write) {
                    state.insert(t.key, seq);
                }
                // Sometimes the crash falls between the store commit and the counters:
                // the message was not acked, so it comes again.
                if next() % 13 != 0 {
                    progress.applied(seq, Some(&deps[i]));
                } else {
                    pending.push(i);
                }
            } else {
                progress.applied(seq, None);
            }
        }
        prop_assert_eq!(state, serial_state);
        for i in 0..n {
            prop_assert_eq!(seen[i].as_ref(), Some(&serial_seen[i]), "transaction {} saw a different world", i + 1);
        }
    }

    #[test]
    fn key_mode_keeps_every_key_s_writes_in_order(history in history(), seed in any::<u64>()) {
        let deps = publish(&history);
        let (_, serial_state) = run_serial(&history);
        let n = history.len();
        let mut rng = seed | 1;
        let mut next = || {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            rng
        };
        let mut pending: Vec<usize> = (0..n).collect();
        let mut progress = Progress::from_store(0, []);
        let mut state: HashMap<u32, u64> = HashMap::new();
        let mut steps = 0;
        while !pending.is_empty() {
            steps += 1;
            prop_assert!(steps < 100_000, "livelock");
            let ready: Vec<usize> = pending.iter().enumerate()
                .filter(|(_, &i)| progress.check(Mode::Key, i as u64 + 1, &deps[i], &[]).is_none())
                .map(|(j, _)| j).collect();
            prop_assert!(!ready.is_empty(), "nothing can run");
            let i = pending.swap_remove(ready[(next() % ready.len() as u64) as usize]);
            for t in history[i].iter().filter(|t| t.write) {
                // A write never lands on a newer one.
                prop_assert!(state.get(&t.key).copied().unwrap_or(0) <= i as u64 + 1);
                state.insert(t.key, i as u64 + 1);
            }
            progress.applied(i as u64 + 1, Some(&deps[i]));
        }
        prop_assert_eq!(state, serial_state);
    }

    #[test]
    fn serial_mode_applies_in_commit_order(history in history(), seed in any::<u64>()) {
        let deps = publish(&history);
        let n = history.len() as u64;
        let mut progress = Progress::from_store(0, []);
        let mut order = Vec::new();
        let mut pending: Vec<u64> = (1..=n).collect();
        let mut rng = seed | 1;
        while !pending.is_empty() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
            let ready: Vec<usize> = pending.iter().enumerate()
                .filter(|(_, &s)| progress.check(Mode::Serial, s, &deps[s as usize - 1], &[]).is_none())
                .map(|(j, _)| j).collect();
            prop_assert_eq!(ready.len(), 1);
            let s = pending.swap_remove(ready[(rng >> 33) as usize % ready.len()]);
            progress.applied(s, Some(&deps[s as usize - 1]));
            order.push(s);
        }
        prop_assert_eq!(order, (1..=n).collect::<Vec<_>>());
    }
}

#[test]
fn a_read_waits_for_the_write_it_saw() {
    let mut p = Progress::from_store(0, []);
    let write = [Dep {
        k: 7,
        v: 1,
        kind: DepKind::Write,
        after: 0,
    }];
    let read = [Dep {
        k: 7,
        v: 1,
        kind: DepKind::Read,
        after: 1,
    }];
    assert_eq!(
        p.check(Mode::Causal, 2, &read, &[]),
        Some(Wait::Dep {
            k: 7,
            v: 1,
            after: 1
        })
    );
    assert_eq!(
        p.check(Mode::Key, 2, &read, &[]),
        None,
        "key mode ignores reads"
    );
    assert_eq!(
        p.check(Mode::Key, 2, &read, &[7]),
        Some(Wait::Dep {
            k: 7,
            v: 1,
            after: 1
        }),
        "but not table keys"
    );
    assert_eq!(p.check(Mode::Causal, 1, &write, &[]), None);
    assert!(p.applied(1, Some(&write)));
    assert_eq!(p.check(Mode::Causal, 2, &read, &[]), None);
    assert!(!p.applied(1, Some(&write)), "a duplicate is recognised");
}

#[test]
fn lost_counters_fall_back_to_the_watermark_and_are_relearned() {
    // Transactions 1..=3 write key 1 in turn; 2 and 3 were applied out of a crash's view.
    let w = |v, after| {
        [Dep {
            k: 1,
            v,
            kind: DepKind::Write,
            after,
        }]
    };
    let mut p = Progress::from_store(0, [1, 2]);
    assert_eq!(p.watermark, 2);
    assert_eq!(p.counter(1), None, "counters are unknown after a restart");
    assert_eq!(
        p.check(Mode::Causal, 3, &w(3, 2), &[]),
        None,
        "the watermark carries it"
    );
    assert!(p.applied(3, Some(&w(3, 2))));
    assert_eq!(
        p.counter(1),
        Some(3),
        "a write makes the counter known again"
    );
    // Transaction 5 waits for 4 and can say so.
    assert_eq!(
        p.check(Mode::Causal, 5, &w(5, 4), &[]),
        Some(Wait::Dep {
            k: 1,
            v: 5,
            after: 4
        })
    );
}

#[test]
fn merging_the_stores_record_marks_missed_applies_and_forgets_counters() {
    let mut p = Progress::from_store(0, []);
    assert!(p.complete);
    p.applied(1, Some(&[]));
    // The store applied 2 and 4 without this state hearing of it.
    assert!(p.merge(2, &[4]));
    assert_eq!(p.watermark, 2);
    assert!(p.is_applied(4) && !p.is_applied(3));
    assert!(
        !p.complete,
        "counters the missed applies moved are unknown now"
    );
    assert_eq!(p.counter(9), None);
    p.applied(3, None);
    assert_eq!(p.watermark, 4);
    // An older record changes nothing.
    assert!(!p.merge(1, &[2, 3]));
    assert_eq!(p.watermark, 4);
}
