//! The stream's side of a chunk: what happened between its watermarks, and which of
//! the transactions decoded before its low watermark its snapshot does not show.
//!
//! Why the second part: Postgres writes a transaction's commit record to the WAL before
//! the transaction becomes visible to other sessions (it flushes the WAL, and may wait
//! for a synchronous standby, in between). A chunk read right after its low watermark
//! can therefore miss a transaction whose commit is *before* the watermark in the WAL —
//! the stream publishes it before the chunk, so the chunk's version would claim an
//! effect its rows do not have (seen in `tests/bootstrap.rs` under load: updates lost).
//! The stream keeps the transaction ids it decoded (with the tables they touched) and
//! the reader sends the chunk's snapshot; at the high watermark a chunk whose snapshot
//! misses a transaction decoded before its low watermark that touched its table is not
//! published but read again.

use super::Rows;
use crate::publish::Item;
use kausal_bus::{Change, Envelope, Op, Snapshot, TableSchema};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use tokio::sync::oneshot;

/// What became of a chunk at its high watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Published to the subscriber's queue.
    Published,
    /// Its snapshot misses a transaction published before it: read it again.
    Stale,
}

/// Chunks between their watermarks, shared by the bootstrap task and the stream.
pub struct Windows {
    state: Mutex<State>,
    /// Whether the stream is decoding: a watermark written before that may lie before
    /// the slot's consistent point (a slot being created waits for every running
    /// transaction of the server) and would then never be decoded — the chunk would
    /// wait for its timeout. So the bootstrap task answers nothing until the stream runs.
    started: tokio::sync::watch::Sender<bool>,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            state: Mutex::default(),
            started: tokio::sync::watch::Sender::new(false),
        }
    }
}

#[derive(Default)]
struct State {
    windows: HashMap<String, Window>,
    recent: Recent,
    /// Per request being answered: the last sequence number before its first low
    /// watermark (the join point its chunks carry).
    joins: HashMap<String, u64>,
}

pub(super) struct Window {
    pub(super) queue: String,
    pub(super) snapshot: Snapshot,
    pub(super) schema: TableSchema,
    /// Decode order at the low watermark (`None` until the stream reaches it).
    low: Option<u64>,
    /// Keys (as JSON text) of the table changed since the low watermark.
    changed: HashSet<String>,
    /// The chunk's rows (key, row) and the snapshot they were read in, set before the
    /// high watermark is written.
    rows: Option<(Rows, PgSnapshot)>,
    done: Option<oneshot::Sender<Outcome>>,
}

impl Window {
    pub(super) fn new(
        queue: String,
        snapshot: Snapshot,
        schema: TableSchema,
        done: oneshot::Sender<Outcome>,
    ) -> Window {
        Window {
            queue,
            snapshot,
            schema,
            low: None,
            changed: HashSet::new(),
            rows: None,
            done: Some(done),
        }
    }
}

/// Transactions decoded by the stream whose ids a later snapshot may still show as
/// running: those not older than the floor (the `xmin` of a snapshot taken when no
/// chunk was being read — every later snapshot's `xmin` is at least that).
#[derive(Default)]
struct Recent {
    /// Decode order of the next transaction.
    next: u64,
    entries: VecDeque<Decoded>,
    floor: Option<u32>,
}

struct Decoded {
    order: u64,
    xid: u32,
    /// Published names of the tables it changed.
    tables: HashSet<String>,
}

impl Recent {
    fn prune(&mut self, floor: u32) {
        if self.floor.is_some_and(|f| precedes(floor, f)) {
            return;
        }
        self.floor = Some(floor);
        self.entries.retain(|e| !precedes(e.xid, floor));
    }
}

/// `a` comes before `b` in Postgres's circular 32-bit transaction id space.
fn precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// A snapshot as `pg_current_snapshot()` prints it: `xmin:xmax:xip,...`; 32-bit ids
/// (the stream's transaction ids have no epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSnapshot {
    pub xmin: u32,
    xmax: u32,
    xip: HashSet<u32>,
}

impl PgSnapshot {
    pub fn parse(text: &str) -> Option<PgSnapshot> {
        let mut parts = text.trim().splitn(3, ':');
        let xid = |s: &str| s.trim().parse::<u64>().ok().map(|x| x as u32);
        let xmin = xid(parts.next()?)?;
        let xmax = xid(parts.next()?)?;
        let xip = match parts.next() {
            Some(list) if !list.trim().is_empty() => {
                list.split(',').map(xid).collect::<Option<HashSet<u32>>>()?
            }
            _ => HashSet::new(),
        };
        Some(PgSnapshot { xmin, xmax, xip })
    }

    /// Whether the transaction `xid` had ended when the snapshot was taken (for a
    /// committed transaction: whether its changes are visible in it).
    pub fn shows(&self, xid: u32) -> bool {
        precedes(xid, self.xmin) || (precedes(xid, self.xmax) && !self.xip.contains(&xid))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Mark {
    pub(super) chunk: String,
    pub(super) high: bool,
}

impl State {
    /// Forgets the decoded transactions before `floor` that no open chunk may need:
    /// stops at the oldest snapshot of an open chunk, and forgets nothing while a chunk
    /// is being read (requests are answered concurrently: its snapshot, not known yet,
    /// may be older than `floor`).
    fn prune_below(&mut self, floor: u32) {
        let mut floor = floor;
        for w in self.windows.values() {
            match &w.rows {
                None => return,
                Some((_, snapshot)) if precedes(snapshot.xmin, floor) => floor = snapshot.xmin,
                Some(_) => {}
            }
        }
        self.recent.prune(floor);
    }
}

impl Windows {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stream decodes from its slot: watermarks written from now on reach it.
    pub fn stream_started(&self) {
        self.started.send_replace(true);
    }

    /// Waits until [`Self::stream_started`].
    pub(super) async fn until_stream_started(&self) {
        let mut started = self.started.subscribe();
        // The sender lives as long as `self`: the wait ends only when it was set.
        let _ = started.wait_for(|s| *s).await;
    }

    pub(super) fn open(&self, id: &str, window: Window) {
        self.lock().windows.insert(id.to_string(), window);
    }

    pub(super) fn close(&self, id: &str) {
        self.lock().windows.remove(id);
    }

    /// Every request in progress ended unanswered (serving restarts): forgets their
    /// chunks and join points.
    pub(super) fn forget_requests(&self) {
        let mut state = self.lock();
        state.windows.clear();
        state.joins.clear();
    }

    /// The request is answered: forget its join point.
    pub(super) fn end_request(&self, request: &str) {
        self.lock().joins.remove(request);
    }

    pub(super) fn set_rows(
        &self,
        id: &str,
        rows: Rows,
        snapshot: PgSnapshot,
        last_key: Option<Map<String, Value>>,
        done: bool,
    ) {
        if let Some(w) = self.lock().windows.get_mut(id) {
            w.snapshot.last_key = last_key;
            w.snapshot.done = done;
            w.rows = Some((rows, snapshot));
        }
    }

    /// Transactions with ids before `xmin` (of a snapshot just taken) are shown by every
    /// snapshot taken from now on: forgets them, as far as the chunks still open allow.
    pub(super) fn set_floor(&self, xmin: u32) {
        self.lock().prune_below(xmin);
    }

    /// The stream decoded the start of transaction `xid`. Called for every
    /// transaction, before its changes are recorded.
    pub fn begin(&self, xid: u32) {
        let mut state = self.lock();
        let recent = &mut state.recent;
        let order = recent.next;
        recent.next += 1;
        if recent.floor.is_some_and(|f| precedes(xid, f)) {
            return;
        }
        // An entry that touched none of our tables cannot make a chunk stale.
        if recent.entries.back().is_some_and(|e| e.tables.is_empty()) {
            recent.entries.pop_back();
        }
        recent.entries.push_back(Decoded {
            order,
            xid,
            tables: HashSet::new(),
        });
    }

    /// Notes the tables `changes` touch (for the transaction begun last) and, in tables
    /// with an open window, their keys. Called by the stream for every envelope it
    /// publishes.
    pub fn record(&self, changes: &[Change]) {
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(last) = state.recent.entries.back_mut() {
            if last.order + 1 == state.recent.next {
                for c in changes {
                    if !last.tables.contains(&c.table) {
                        last.tables.insert(c.table.clone());
                    }
                }
            }
        }
        for w in state.windows.values_mut().filter(|w| w.low.is_some()) {
            for c in changes.iter().filter(|c| c.table == w.snapshot.table) {
                if c.op == Op::Truncate {
                    // Everything read before it is stale: the chunk goes out empty.
                    w.changed.insert(String::new());
                }
                w.changed.insert(key_text(&c.key));
                if let Some(old) = &c.old_key {
                    w.changed.insert(key_text(old));
                }
            }
        }
    }

    /// A watermark reached the stream. At a high one, returns the chunk to publish:
    /// its rows minus those changed in the window, versioned `last_seq`.
    pub fn mark(
        &self,
        content: &[u8],
        namespace: &str,
        generation: u64,
        last_seq: u64,
    ) -> Option<Item> {
        let mark: Mark = serde_json::from_slice(content).ok()?;
        let mut state = self.lock();
        let state = &mut *state;
        if !mark.high {
            if let Some(w) = state.windows.get_mut(&mark.chunk) {
                w.low = Some(state.recent.next);
                // Every transaction after this point is published after the request
                // arrived, so after the subscriber's queue existed.
                let join = *state
                    .joins
                    .entry(w.snapshot.request.clone())
                    .or_insert(last_seq);
                w.snapshot.join_after = Some(join);
            }
            return None;
        }
        let mut w = state.windows.remove(&mark.chunk)?;
        // Its low watermark was before this stream started: the window is incomplete.
        // The task reads the chunk again after its timeout.
        let low = w.low?;
        let (rows, snapshot) = w.rows.take()?;
        let stale = state.recent.entries.iter().any(|e| {
            e.order < low && e.tables.contains(&w.snapshot.table) && !snapshot.shows(e.xid)
        });
        // Every chunk read from now on takes its snapshot after this one's; the chunks
        // of other requests still open may have older ones.
        state.prune_below(snapshot.xmin);
        if stale {
            if let Some(done) = w.done.take() {
                let _ = done.send(Outcome::Stale);
            }
            return None;
        }
        let truncated = w.changed.contains("");
        let changes = rows
            .into_iter()
            .filter(|(key, _)| !truncated && !w.changed.contains(&key_text(key)))
            .map(|(key, row)| Change {
                op: Op::Insert,
                table: w.snapshot.table.clone(),
                key,
                old_key: None,
                new: Some(row),
                old: None,
                unchanged: Vec::new(),
            })
            .collect();
        if let Some(done) = w.done.take() {
            let _ = done.send(Outcome::Published);
        }
        let envelope = Envelope {
            namespace: namespace.to_string(),
            generation,
            seq: last_seq,
            part: 0,
            parts: Some(1),
            position: "bootstrap".into(),
            commit_ts_us: now_us(),
            txid: String::new(),
            context: Default::default(),
            schemas: vec![w.schema],
            changes,
            deps: Vec::new(),
            snapshot: Some(w.snapshot),
        };
        Some(Item::Direct {
            queue: w.queue,
            envelope: Box::new(envelope),
        })
    }
}

fn key_text(key: &Map<String, Value>) -> String {
    serde_json::to_string(key).unwrap_or_default()
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_shows_ended_transactions_only() {
        let s = PgSnapshot::parse("100:110:103,107").expect("parses");
        assert!(s.shows(99));
        assert!(s.shows(104));
        assert!(!s.shows(103));
        assert!(!s.shows(107));
        assert!(!s.shows(110));
        assert!(!s.shows(200));
        let empty = PgSnapshot::parse("5:5:").expect("parses");
        assert!(empty.shows(4) && !empty.shows(5));
        assert!(PgSnapshot::parse("x:1:").is_none());
    }

    #[test]
    fn transaction_ids_compare_across_wraparound() {
        // 64-bit ids from pg_current_snapshot() keep their low 32 bits.
        let s = PgSnapshot::parse("4294967290:4294967302:4294967300").expect("parses");
        assert!(s.shows(u32::MAX - 10));
        assert!(s.shows(2)); // 4294967298 after the wrap
        assert!(!s.shows(4)); // 4294967300, running
        assert!(!s.shows(6)); // 4294967302 = xmax
    }

    fn window(done: oneshot::Sender<Outcome>) -> Window {
        let snapshot = Snapshot {
            request: "r".into(),
            table: "users".into(),
            chunk: 0,
            last_key: None,
            done: false,
            estimated_rows: 0,
            join_after: None,
        };
        let schema = TableSchema {
            table: "users".into(),
            columns: Vec::new(),
            key: vec!["id".into()],
            changed: false,
        };
        Window::new("q".into(), snapshot, schema, done)
    }

    fn change(table: &str, id: i64) -> Change {
        let key: Map<String, Value> = [("id".to_string(), Value::from(id))].into_iter().collect();
        Change {
            op: Op::Update,
            table: table.into(),
            key: key.clone(),
            old_key: None,
            new: Some(key),
            old: None,
            unchanged: Vec::new(),
        }
    }

    fn mark(chunk: &str, high: bool) -> Vec<u8> {
        serde_json::to_vec(&Mark {
            chunk: chunk.into(),
            high,
        })
        .expect("serializes")
    }

    /// A transaction committed before the low watermark that the chunk's snapshot does
    /// not show (it was still ending when the chunk was read) makes the chunk stale;
    /// one the snapshot shows, or one of another table, does not.
    fn outcome_with(xid_before_low: u32, table: &str, snapshot: &str) -> (Outcome, bool) {
        let windows = Windows::default();
        let (tx, mut rx) = oneshot::channel();
        windows.open("c", window(tx));
        windows.begin(xid_before_low);
        windows.record(&[change(table, 1)]);
        windows.mark(&mark("c", false), "ns", 1, 1);
        let rows = vec![(change("users", 1).key, Map::new())];
        let snap = PgSnapshot::parse(snapshot).expect("parses");
        windows.set_rows("c", rows, snap, None, true);
        let item = windows.mark(&mark("c", true), "ns", 1, 1);
        (rx.try_recv().expect("answered"), item.is_some())
    }

    #[test]
    fn a_chunk_whose_snapshot_misses_an_earlier_transaction_is_read_again() {
        assert_eq!(
            outcome_with(50, "users", "50:51:50"),
            (Outcome::Stale, false)
        );
        assert_eq!(
            outcome_with(50, "users", "51:51:"),
            (Outcome::Published, true)
        );
        assert_eq!(
            outcome_with(50, "messages", "50:51:50"),
            (Outcome::Published, true)
        );
    }

    #[test]
    fn a_chunk_answered_meanwhile_for_another_request_leaves_what_an_older_snapshot_needs() {
        let windows = Windows::default();
        let (a_tx, mut a_rx) = oneshot::channel();
        let (b_tx, mut b_rx) = oneshot::channel();
        windows.open("a", window(a_tx));
        windows.open("b", window(b_tx));
        windows.begin(50);
        windows.record(&[change("users", 1)]);
        windows.mark(&mark("a", false), "ns", 1, 1);
        windows.mark(&mark("b", false), "ns", 1, 1);
        let rows = || vec![(change("users", 1).key, Map::new())];
        // b was read while 50 was still ending; a later, when every snapshot showed it.
        let b_snapshot = PgSnapshot::parse("50:51:50").expect("parses");
        windows.set_rows("b", rows(), b_snapshot, None, true);
        // A floor taken now must not forget 50 either.
        windows.set_floor(60);
        windows.set_rows(
            "a",
            rows(),
            PgSnapshot::parse("60:60:").expect("parses"),
            None,
            true,
        );
        assert!(windows.mark(&mark("a", true), "ns", 1, 1).is_some());
        assert_eq!(a_rx.try_recv().expect("answered"), Outcome::Published);
        assert!(windows.mark(&mark("b", true), "ns", 1, 1).is_none());
        assert_eq!(b_rx.try_recv().expect("answered"), Outcome::Stale);
    }

    #[test]
    fn a_floor_forgets_nothing_while_a_chunk_is_being_read() {
        let windows = Windows::default();
        windows.begin(10);
        windows.record(&[change("users", 1)]);
        let (tx, _rx) = oneshot::channel();
        windows.open("c", window(tx));
        windows.set_floor(12);
        assert_eq!(windows.lock().recent.entries.len(), 1);
        windows.close("c");
        windows.set_floor(12);
        assert_eq!(windows.lock().recent.entries.len(), 0);
    }

    #[test]
    fn a_floor_forgets_transactions_every_later_snapshot_shows() {
        let windows = Windows::default();
        for xid in [10, 11, 12] {
            windows.begin(xid);
            windows.record(&[change("users", 1)]);
        }
        windows.set_floor(12);
        assert_eq!(windows.lock().recent.entries.len(), 1);
        // An older floor never brings the forgotten ones back into question.
        windows.set_floor(5);
        windows.begin(11);
        assert_eq!(windows.lock().recent.entries.len(), 1);
    }
}
