//! Where the gate's state lives: in this process, or in Redis for several worker
//! processes sharing one queue. Both implement the same rule ([`crate::schedule`]); the
//! Redis one evaluates it in Lua scripts, pipelined, so one wake-up costs one round trip
//! however many transactions it re-checks.

pub mod memory;
pub mod redis;

use crate::config::Mode;
use crate::error::CoordError;
use crate::schedule::Wait;
use crate::txn::TxId;
use kausal_bus::Dep;
use std::sync::Arc;
use tokio::sync::Notify;

/// Result of checking one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Ready,
    Waiting(Wait),
    /// The namespace/generation has no state here yet (first sight, or Redis lost it):
    /// load it from the store with [`Coordinator::init`] and check again.
    Unknown,
}

/// An incarnation of the coordinator's state ([`Coordinator::epoch`]).
#[derive(Debug, Clone)]
pub struct Epoch(Option<String>);

/// What [`Coordinator::init`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seeded {
    /// The state exists now (seeded by this call or another).
    Done,
    /// The state was lost after the epoch was taken: nothing was seeded.
    Stale,
}

/// A transaction to check: its id, its dependencies and the table keys it reads.
pub struct Query<'a> {
    pub id: &'a TxId,
    pub deps: &'a [Dep],
    pub table_keys: &'a [u32],
}

/// Gate state, shared by the workers of one subscriber app.
pub enum Coordinator {
    Memory(memory::MemoryCoord),
    Redis(redis::RedisCoord),
}

impl Coordinator {
    pub async fn check(&self, mode: Mode, queries: &[Query<'_>]) -> Result<Vec<Check>, CoordError> {
        match self {
            Coordinator::Memory(c) => Ok(c.check(mode, queries)),
            Coordinator::Redis(c) => c.check(mode, queries).await,
        }
    }

    /// A chain of transactions to apply in order in one store transaction: indices
    /// into `queries` (sorted by id), each ready once those before it are applied, at
    /// most `max`; the others get their check as in [`Coordinator::check`]. Planned on a
    /// throw-away overlay of the gate state (in this process, or in one Lua script per
    /// stream in Redis), which is sound because the state only moves forward.
    pub async fn plan(
        &self,
        mode: Mode,
        queries: &[Query<'_>],
        max: usize,
    ) -> Result<(Vec<usize>, Vec<Check>), CoordError> {
        match self {
            Coordinator::Memory(c) => Ok(c.plan(mode, queries, max)),
            Coordinator::Redis(c) => c.plan(mode, queries, max).await,
        }
    }

    /// The coordinator's current incarnation, taken before reading the store for
    /// [`Coordinator::init`]: state lost between the read and the seeding (a Redis
    /// restart or flush) would otherwise be replaced by a read older than what the lost
    /// state had recorded, and the transactions applied in between would never count as
    /// applied again (their deliveries are acked).
    pub async fn epoch(&self) -> Result<Epoch, CoordError> {
        match self {
            Coordinator::Memory(_) => Ok(Epoch(None)),
            Coordinator::Redis(c) => Ok(Epoch(Some(c.epoch().await?))),
        }
    }

    /// Seeds the state of a namespace/generation from what the store recorded (the
    /// contiguous `through` and the applied sequence numbers above it), read after
    /// `epoch` was taken. A no-op when the state exists. [`Seeded::Stale`] when the
    /// state was lost since `epoch`: take a new epoch and read the store again.
    pub async fn init(
        &self,
        epoch: &Epoch,
        namespace: &str,
        generation: u64,
        through: u64,
        applied: &[u64],
    ) -> Result<Seeded, CoordError> {
        match self {
            Coordinator::Memory(c) => {
                c.init(namespace, generation, through, applied);
                Ok(Seeded::Done)
            }
            Coordinator::Redis(c) => {
                let epoch = epoch.0.as_deref().unwrap_or_default();
                c.init(epoch, namespace, generation, through, applied).await
            }
        }
    }

    /// Adds what the store recorded as applied (read at any time) to existing state:
    /// raises the watermark to `through`, marks `applied`. Always sound, since the store
    /// is the truth and only grows; it heals state that missed applies (recorded in a
    /// Redis that then lost them, or seeded from an older read). False when the state
    /// does not exist (nothing to heal: it is seeded on first sight).
    pub async fn merge(
        &self,
        namespace: &str,
        generation: u64,
        through: u64,
        applied: &[u64],
    ) -> Result<bool, CoordError> {
        match self {
            Coordinator::Memory(c) => Ok(c.merge(namespace, generation, through, applied)),
            Coordinator::Redis(c) => c.merge(namespace, generation, through, applied).await,
        }
    }

    /// Moves a namespace/generation whose watermark is still 0 to `through` (a
    /// subscriber joining a running stream, or joining where its bootstrap's chunks
    /// begin); transactions applied above it stay applied, those below are covered by
    /// the join. Counters become unknown unless learned. A no-op once the watermark
    /// moved: the store applied transaction 1, so it follows the stream from its start.
    pub async fn join(
        &self,
        namespace: &str,
        generation: u64,
        through: u64,
    ) -> Result<(), CoordError> {
        match self {
            Coordinator::Memory(c) => {
                c.join(namespace, generation, through);
                Ok(())
            }
            Coordinator::Redis(c) => c.join(namespace, generation, through).await,
        }
    }

    /// Records transactions the store applied (`Some(deps)`: this worker applied it and
    /// its counters move) or found already applied (`None`). Wakes waiting workers.
    /// Returns the ids whose state was missing (to `init` and repeat).
    pub async fn applied(&self, done: &[(&TxId, Option<&[Dep]>)]) -> Result<Vec<TxId>, CoordError> {
        match self {
            Coordinator::Memory(c) => Ok(c.applied(done)),
            Coordinator::Redis(c) => c.applied(done).await,
        }
    }

    /// The applied-through watermark of a namespace/generation, if known.
    pub async fn watermark(
        &self,
        namespace: &str,
        generation: u64,
    ) -> Result<Option<u64>, CoordError> {
        match self {
            Coordinator::Memory(c) => Ok(c.watermark(namespace, generation)),
            Coordinator::Redis(c) => c.watermark(namespace, generation).await,
        }
    }

    /// Notified whenever any worker applied something: time to re-check waiters.
    pub fn wakeups(&self) -> Arc<Notify> {
        match self {
            Coordinator::Memory(c) => c.wake.clone(),
            Coordinator::Redis(c) => c.wake.clone(),
        }
    }
}
