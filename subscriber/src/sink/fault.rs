//! A test-only fault hook: a worker that dies after its store committed a group and
//! before it told the coordinator or acked the messages (the window in which a crash
//! leaves a transaction applied in the store but still in the queue).
//!
//! Off unless `KAUSAL_FAULT_ABORT_AFTER_COMMITS=<n>` is set in the worker's environment:
//! then the process aborts (SIGABRT, like a crash: no cleanup, no acks) right after its
//! n-th store commit. Used by `tests/faults.rs`; see docs/faults.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const ENV: &str = "KAUSAL_FAULT_ABORT_AFTER_COMMITS";

static COMMITS: AtomicU64 = AtomicU64::new(0);
static LIMIT: OnceLock<Option<u64>> = OnceLock::new();

/// Called after each store commit of a group; aborts the process at the configured one.
pub fn after_commit() {
    let limit = *LIMIT.get_or_init(|| std::env::var(ENV).ok().and_then(|v| v.parse().ok()));
    if let Some(n) = limit {
        if COMMITS.fetch_add(1, Ordering::Relaxed) + 1 >= n {
            eprintln!("{ENV}={n}: aborting after store commit {n}, before the ack");
            std::process::abort();
        }
    }
}
