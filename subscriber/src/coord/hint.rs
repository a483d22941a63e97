//! What a worker knows of the shared gate state without asking Redis: the state it
//! seeded from its store, the watermarks Redis answered, and everything its own store
//! transactions applied. Each of these only ever moves forward, and the true state is
//! at least as far (the store holds what was applied), so a transaction this knowledge
//! finds ready is ready: the check that lets a counter or the watermark meet a
//! dependency needs a lower bound of the truth, nothing more (`docs/subscriber.md`).
//!
//! A worker whose partition holds a whole chain (every link is its own transaction)
//! therefore plans it without a round trip; only when another worker applied something
//! (its wake-up arrives) or on the periodic re-check does it ask Redis, which knows
//! what the others applied.

use super::memory::MemoryCoord;
use std::sync::atomic::{AtomicBool, Ordering};

pub(super) struct Hint {
    /// The in-process gate, over this worker's knowledge.
    pub(super) local: MemoryCoord,
    /// Another worker moved the shared state since Redis was last asked.
    stale: AtomicBool,
}

impl Hint {
    pub(super) fn new() -> Self {
        Hint {
            local: MemoryCoord::new(),
            stale: AtomicBool::new(true),
        }
    }

    /// Something this worker does not know of may have happened: ask Redis next.
    pub(super) fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    /// Whether Redis must be asked (and from now on it is not, until marked again).
    pub(super) fn take_stale(&self) -> bool {
        self.stale.swap(false, Ordering::Relaxed)
    }

    /// Redis answered the watermark of a stream: at least this is applied.
    pub(super) fn raise(&self, namespace: &str, generation: u64, watermark: u64) {
        self.local.raise(namespace, generation, watermark);
    }
}
