//! Redis coordination: worker processes on any host share gate state.
//!
//! Keys, per app, namespace and generation (`<p>` = `<prefix>:<app>:<namespace>:<gen>`):
//! - `<p>:i` — present once the state was seeded from a store; `1` while complete
//!   (nothing was ever applied before seeding, so absent counters are 0);
//! - `<p>:w` — the applied-through watermark;
//! - `<p>:a` — sorted set of applied sequence numbers above the watermark;
//! - `<p>:c` — hash of known counters.
//!
//! and, per app, `<prefix>:<app>:epoch`, created when missing (seeding from a store read
//! taken under another epoch is refused: state lost in between may have recorded
//! applies the read does not show), and `<prefix>:<app>:members`, the live worker
//! processes (sorted set by last heartbeat), from which each works out its share of the
//! partition queues.
//!
//! Checks and updates are Lua scripts (atomic per transaction) sent in one pipeline per
//! batch. After a flush `<p>:i` is gone, a script answers "unknown", and the worker seeds
//! the state again from its store: the watermark and applied set are exact, counters
//! start unknown and are re-learned (see [`crate::schedule`]). Applies that a Redis lost
//! without losing the rest (a failover to a replica that lagged) are healed by merging
//! the store's record into the state when a stream stalls ([`RedisCoord::merge`]).
//! Wake-ups go through a pub/sub channel, `<prefix>:<app>:wake`.

use super::{Check, Query, Seeded};
use crate::config::Mode;
use crate::error::CoordError;
use crate::schedule::{relevant, Wait};
use crate::txn::TxId;
use kausal_bus::{Dep, DepKind};
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

use lua::{APPLIED, CHECK, EPOCH, HOLD, INIT, JOIN, MEMBERS, MERGE, PLAN};

mod lua;
mod sentinel;

use sentinel::{master_may_have_moved, Sentinels};

pub struct RedisCoord {
    /// The connection to the master; replaced when the sentinels name another one.
    conn: std::sync::Mutex<ConnectionManager>,
    /// Set when `coordination.url` names sentinels.
    sentinels: Option<Arc<Sentinels>>,
    base: String,
    channel: String,
    pub(crate) wake: Arc<Notify>,
    /// The scripts run on every check and apply, sent by hash (`EVALSHA`): the text of
    /// `PLAN` alone is 2 KB, which every call would otherwise carry.
    hot: Arc<Hot>,
}

struct Hot {
    check: redis::Script,
    plan: redis::Script,
    applied: redis::Script,
}

impl Hot {
    fn new() -> Hot {
        Hot {
            check: redis::Script::new(CHECK),
            plan: redis::Script::new(PLAN),
            applied: redis::Script::new(APPLIED),
        }
    }
}

impl RedisCoord {
    /// Connects and starts listening for wake-ups.
    pub async fn connect(url: &str, prefix: &str, app: &str) -> Result<Self, CoordError> {
        let endpoint = kausal_bus::amqp::redact_url(url);
        let unreachable = |source| CoordError::Unreachable {
            endpoint: endpoint.clone(),
            source,
        };
        let tls_failed = |detail: String| CoordError::Tls {
            endpoint: endpoint.clone(),
            detail,
        };
        let sentinels = match Sentinels::parse(url) {
            Some(Ok(s)) => Some(Arc::new(s)),
            Some(Err(reason)) => {
                return Err(CoordError::Url { reason });
            }
            None => None,
        };
        let client = match &sentinels {
            Some(s) => s.master().await.map_err(unreachable)?,
            None => crate::tls::redis_client(url).map_err(|e| match e {
                crate::tls::RedisClientError::Settings(e) => tls_failed(e.to_string()),
                crate::tls::RedisClientError::Redis(e) => unreachable(e),
            })?,
        };
        let conn = ConnectionManager::new(client.clone()).await.map_err(|e| {
            let detail = kausal_bus::tls::describe(&e);
            match kausal_bus::tls::hint(&detail) {
                Some(_) if url.starts_with("rediss://") => tls_failed(detail),
                _ => unreachable(e),
            }
        })?;
        let wake = Arc::new(Notify::new());
        let channel = format!("{prefix}:{app}:wake");
        tokio::spawn(listen(
            client,
            sentinels.clone(),
            channel.clone(),
            wake.clone(),
        ));
        Ok(RedisCoord {
            conn: std::sync::Mutex::new(conn),
            sentinels,
            base: format!("{prefix}:{app}"),
            channel,
            wake,
            hot: Arc::new(Hot::new()),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// After a failure a failover explains: connects to the master the sentinels name
    /// now (the caller's retry then reaches it). Without sentinels, or when they cannot
    /// say, the connection stays (it reconnects to its address by itself).
    async fn follow_master(&self, error: &redis::RedisError) {
        let Some(sentinels) = &self.sentinels else {
            return;
        };
        if !master_may_have_moved(error) {
            return;
        }
        match sentinels.master().await {
            Ok(client) => match ConnectionManager::new(client).await {
                Ok(conn) => {
                    *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = conn;
                    tracing::info!("connected to the master the Redis sentinels name");
                }
                Err(e) => tracing::warn!(error = %e, "cannot reach the master the sentinels name"),
            },
            Err(e) => tracing::warn!(error = %e, "the Redis sentinels name no master yet"),
        }
    }

    /// Runs a pipeline of `EVALSHA`s; when Redis does not know a script (it restarted,
    /// or `SCRIPT FLUSH`), loads the scripts and runs it again. Every script is safe to
    /// run again. A few rounds: Redis may forget the scripts again between the load and
    /// the next run (a restart loop, an operator's flush).
    async fn run<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        operation: &'static str,
    ) -> Result<T, CoordError> {
        let mut round = 0;
        loop {
            match pipe.query_async(&mut self.conn()).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                        && round < 5 =>
                {
                    round += 1;
                    for code in [CHECK, PLAN, APPLIED] {
                        let _: String = self
                            .query(redis::cmd("SCRIPT").arg("LOAD").arg(code), operation)
                            .await?;
                    }
                }
                Err(source) => {
                    self.follow_master(&source).await;
                    return Err(CoordError::Redis { operation, source });
                }
                Ok(answer) => return Ok(answer),
            }
        }
    }

    /// Runs one command on the shared connection; a failure names the operation.
    async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        operation: &'static str,
    ) -> Result<T, CoordError> {
        match cmd.query_async(&mut self.conn()).await {
            Ok(answer) => Ok(answer),
            Err(source) => {
                self.follow_master(&source).await;
                Err(CoordError::Redis { operation, source })
            }
        }
    }

    fn keys(&self, namespace: &str, generation: u64) -> [String; 4] {
        let p = format!("{}:{namespace}:{generation}", self.base);
        [
            format!("{p}:i"),
            format!("{p}:w"),
            format!("{p}:a"),
            format!("{p}:c"),
        ]
    }

    pub async fn check(&self, mode: Mode, queries: &[Query<'_>]) -> Result<Vec<Check>, CoordError> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        let mut relevant_deps: Vec<Vec<Dep>> = Vec::with_capacity(queries.len());
        for q in queries {
            let [i, w, a, c] = self.keys(&q.id.namespace, q.id.generation);
            let deps: Vec<Dep> = q
                .deps
                .iter()
                .filter(|d| mode != Mode::Serial && relevant(mode, d, q.table_keys))
                .copied()
                .collect();
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.hot.check.get_hash())
                .arg(4)
                .arg(i)
                .arg(w)
                .arg(c)
                .arg(a);
            cmd.arg(if mode == Mode::Serial { "s" } else { "c" })
                .arg(q.id.seq);
            for d in &deps {
                cmd.arg(d.k).arg(d.v).arg(kind(d.kind)).arg(d.after);
            }
            relevant_deps.push(deps);
        }
        let answers: Vec<i64> = self.run(&pipe, "check").await?;
        Ok(answers
            .into_iter()
            .zip(queries.iter().zip(&relevant_deps))
            .map(|(a, (q, deps))| match a {
                -1 => Check::Unknown,
                0 => Check::Ready,
                n if mode == Mode::Serial => {
                    let _ = n;
                    Check::Waiting(Wait::Previous { seq: q.id.seq - 1 })
                }
                n => {
                    let d = deps[(n - 1) as usize];
                    Check::Waiting(Wait::Dep {
                        k: d.k,
                        v: d.v,
                        after: d.after,
                    })
                }
            })
            .collect())
    }

    /// A chain for one store transaction, planned in Redis: indices into `queries`
    /// (sorted by id) in apply order, each ready once those before it are applied; at
    /// most `max`. One script per stream, all in one pipeline. Sound although other
    /// workers move the state meanwhile: the state only ever moves forward (a
    /// transaction once ready stays ready), and a chain is applied in order in one
    /// store transaction.
    pub async fn plan(
        &self,
        mode: Mode,
        queries: &[Query<'_>],
        max: usize,
    ) -> Result<(Vec<usize>, Vec<Check>), CoordError> {
        let mut streams: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, q) in queries.iter().enumerate() {
            match streams.last_mut() {
                Some(r)
                    if queries[r.start].id.namespace == q.id.namespace
                        && queries[r.start].id.generation == q.id.generation =>
                {
                    r.end = i + 1
                }
                _ => streams.push(i..i + 1),
            }
        }
        if streams.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut pipe = redis::pipe();
        for r in &streams {
            let first = &queries[r.start];
            let [i, w, a, c] = self.keys(&first.id.namespace, first.id.generation);
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.hot.plan.get_hash())
                .arg(4)
                .arg(i)
                .arg(w)
                .arg(c)
                .arg(a);
            cmd.arg(if mode == Mode::Serial { "s" } else { "c" })
                .arg(max)
                .arg(pack_plan(mode, &queries[r.clone()]));
        }
        let answers: Vec<Vec<i64>> = self.run(&pipe, "plan").await?;
        let mut chain = Vec::new();
        let mut checks = Vec::with_capacity(queries.len());
        for (r, codes) in streams.iter().zip(answers) {
            if codes.first() == Some(&-1) {
                checks.extend(r.clone().map(|_| Check::Unknown));
                continue;
            }
            for (i, code) in r
                .clone()
                .zip(codes.into_iter().chain(std::iter::repeat(-2)))
            {
                let q = &queries[i];
                let full = Check::Waiting(Wait::Previous {
                    seq: q.id.seq.saturating_sub(1),
                });
                checks.push(match code {
                    0 if chain.len() < max => {
                        chain.push(i);
                        Check::Ready
                    }
                    0 | -2 => full,
                    _ if mode == Mode::Serial => full,
                    n => match q.deps.get((n - 1) as usize) {
                        Some(d) => Check::Waiting(Wait::Dep {
                            k: d.k,
                            v: d.v,
                            after: d.after,
                        }),
                        None => full,
                    },
                });
            }
        }
        Ok((chain, checks))
    }

    /// The app's epoch (`<prefix>:<app>:epoch`): gone with the rest of the state when
    /// Redis restarts empty or the app's keys are deleted, and then created anew.
    pub async fn epoch(&self) -> Result<String, CoordError> {
        self.query(
            redis::cmd("EVAL")
                .arg(EPOCH)
                .arg(1)
                .arg(format!("{}:epoch", self.base)),
            "epoch",
        )
        .await
    }

    pub async fn init(
        &self,
        epoch: &str,
        namespace: &str,
        generation: u64,
        through: u64,
        applied: &[u64],
    ) -> Result<Seeded, CoordError> {
        let [i, w, a, _] = self.keys(namespace, generation);
        let complete = through == 0 && applied.is_empty();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(INIT)
            .arg(4)
            .arg(i)
            .arg(w)
            .arg(a)
            .arg(format!("{}:epoch", self.base))
            .arg(through)
            .arg(if complete { "1" } else { "0" })
            .arg(epoch);
        for s in applied {
            cmd.arg(*s);
        }
        let answer: i64 = self.query(&cmd, "init").await?;
        if answer == -2 {
            return Ok(Seeded::Stale);
        }
        self.wake.notify_waiters();
        Ok(Seeded::Done)
    }

    pub async fn merge(
        &self,
        namespace: &str,
        generation: u64,
        through: u64,
        applied: &[u64],
    ) -> Result<bool, CoordError> {
        let [i, w, a, _] = self.keys(namespace, generation);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(MERGE).arg(3).arg(i).arg(w).arg(a).arg(through);
        for s in applied {
            cmd.arg(*s);
        }
        let answer: i64 = self.query(&cmd, "merge").await?;
        if answer == 1 {
            tracing::warn!(
                namespace,
                generation,
                "coordination state had missed applied transactions (Redis lost writes); healed from the store"
            );
            self.wake_others().await;
            self.wake.notify_waiters();
        }
        Ok(answer >= 0)
    }

    pub async fn applied(&self, done: &[(&TxId, Option<&[Dep]>)]) -> Result<Vec<TxId>, CoordError> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (id, deps) in done {
            let [i, w, a, c] = self.keys(&id.namespace, id.generation);
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.hot.applied.get_hash())
                .arg(4)
                .arg(i)
                .arg(w)
                .arg(a)
                .arg(c);
            cmd.arg(id.seq);
            for d in deps.unwrap_or(&[]) {
                cmd.arg(d.k).arg(d.v).arg(kind(d.kind));
            }
        }
        pipe.cmd("PUBLISH").arg(&self.channel).arg(1).ignore();
        let answers: Vec<i64> = self.run(&pipe, "applied").await?;
        self.wake.notify_waiters();
        Ok(answers
            .into_iter()
            .zip(done)
            .filter(|(a, _)| *a == -1)
            .map(|(_, (id, _))| (*id).clone())
            .collect())
    }

    pub async fn join(
        &self,
        namespace: &str,
        generation: u64,
        through: u64,
    ) -> Result<(), CoordError> {
        let [i, w, a, _] = self.keys(namespace, generation);
        let _: i64 = self
            .query(
                redis::cmd("EVAL")
                    .arg(JOIN)
                    .arg(3)
                    .arg(i)
                    .arg(w)
                    .arg(a)
                    .arg(through),
                "join",
            )
            .await?;
        self.wake_others().await;
        self.wake.notify_waiters();
        Ok(())
    }

    /// Wakes the other workers (best effort: they also re-check on a timer).
    async fn wake_others(&self) {
        let _: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(1)
            .query_async(&mut self.conn())
            .await;
    }

    /// Marks `worker` alive now and answers the live workers of the app, sorted: the
    /// ones whose last mark is younger than `ttl_ms` (by Redis's clock, so hosts'
    /// clocks do not matter). Key `<prefix>:<app>:members`, a sorted set by last mark.
    pub async fn members(&self, worker: &str, ttl_ms: u64) -> Result<Vec<String>, CoordError> {
        let mut members: Vec<String> = self
            .query(
                redis::cmd("EVAL")
                    .arg(MEMBERS)
                    .arg(1)
                    .arg(format!("{}:members", self.base))
                    .arg(worker)
                    .arg(ttl_ms),
                "members",
            )
            .await?;
        members.sort();
        Ok(members)
    }

    /// Removes `worker` from the live workers (a clean stop): its partitions move at
    /// the others' next heartbeat instead of after the expiry.
    pub async fn leave(&self, worker: &str) -> Result<(), CoordError> {
        let _: i64 = self
            .query(
                redis::cmd("ZREM")
                    .arg(format!("{}:members", self.base))
                    .arg(worker),
                "leave",
            )
            .await?;
        self.wake_others().await;
        Ok(())
    }

    /// Takes the app's lock `name` for `worker`, or renews it if `worker` holds it;
    /// false while another worker holds it. It expires `ttl_ms` after the last renewal.
    pub async fn hold(&self, name: &str, worker: &str, ttl_ms: u64) -> Result<bool, CoordError> {
        let held: i64 = self
            .query(
                redis::cmd("EVAL")
                    .arg(HOLD)
                    .arg(1)
                    .arg(format!("{}:lock:{name}", self.base))
                    .arg(worker)
                    .arg(ttl_ms),
                "lock",
            )
            .await?;
        Ok(held == 1)
    }

    pub async fn watermark(
        &self,
        namespace: &str,
        generation: u64,
    ) -> Result<Option<u64>, CoordError> {
        let [i, w, _, _] = self.keys(namespace, generation);
        let (init, w): (Option<String>, Option<u64>) = match redis::pipe()
            .get(i)
            .get(w)
            .query_async(&mut self.conn())
            .await
        {
            Ok(answer) => answer,
            Err(source) => {
                self.follow_master(&source).await;
                return Err(CoordError::Redis {
                    operation: "watermark",
                    source,
                });
            }
        };
        Ok(init.map(|_| w.unwrap_or(0)))
    }
}

/// The transactions of one stream for `PLAN`, in the layout its doc comment gives.
fn pack_plan(mode: Mode, queries: &[Query<'_>]) -> Vec<u8> {
    let deps: usize = queries.iter().map(|q| q.deps.len()).sum();
    let mut blob = Vec::with_capacity(queries.len() * 12 + deps * 22);
    for q in queries {
        blob.extend_from_slice(&q.id.seq.to_le_bytes());
        blob.extend_from_slice(&(q.deps.len() as u32).to_le_bytes());
        for d in q.deps {
            let on = mode != Mode::Serial && relevant(mode, d, q.table_keys);
            blob.extend_from_slice(&d.k.to_le_bytes());
            blob.extend_from_slice(&d.v.to_le_bytes());
            blob.extend_from_slice(&d.after.to_le_bytes());
            blob.push(u8::from(d.kind == DepKind::Write));
            blob.push(u8::from(on));
        }
    }
    blob
}

fn kind(k: DepKind) -> &'static str {
    match k {
        DepKind::Read => "r",
        DepKind::Write => "w",
    }
}

/// Forwards wake-ups from other workers. Pub/sub is at-most-once (a reconnect loses
/// messages), so the runtime also re-checks on a slow timer; this only makes the common
/// case immediate.
async fn listen(
    mut client: redis::Client,
    sentinels: Option<Arc<Sentinels>>,
    channel: String,
    wake: Arc<Notify>,
) {
    use futures_util::StreamExt;
    let mut first = true;
    loop {
        // Behind sentinels, the master may have changed since the last subscription:
        // wake-ups are published there.
        if let (Some(s), false) = (&sentinels, first) {
            if let Ok(master) = s.master().await {
                client = master;
            }
        }
        first = false;
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&channel).await.is_ok() {
                    wake.notify_waiters();
                    let mut messages = pubsub.on_message();
                    while messages.next().await.is_some() {
                        wake.notify_waiters();
                    }
                }
            }
            Err(error) => {
                tracing::debug!(error = %error, "redis pub/sub unavailable; retrying");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
