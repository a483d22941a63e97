//! Bootstrap in the worker: asking publishers for the current rows of subscribed
//! tables, applying the chunks that come back, resuming after a restart.
//!
//! The request is sent once the worker consumes its queue, so every transaction after
//! the chunks' watermarks reaches this app; chunks bypass the causal gate (they are no
//! transactions of the stream) and the store's row versions order them against the
//! stream (see `sink::sql::bootstrap` and `docs/bootstrap.md`).

use super::Worker;

mod shared;
use crate::error::SubscriberError;
use kausal_bus::bootstrap::{send_request, BootstrapRequest, TableRequest, DEFAULT_CHUNK_ROWS};
use kausal_bus::Envelope;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// A chunk not followed by another within this time: the request is sent again (the
/// publisher may have been down, or restarted and lost its place).
const RE_REQUEST_AFTER: Duration = Duration::from_secs(60);
/// The app's bootstrap lock (several workers) outlives its holder by this much.
const LOCK_TTL_MS: u64 = 30_000;

/// What to bootstrap when a subscriber starts.
#[derive(Debug, Clone, Default)]
pub struct BootstrapPlan {
    /// `(namespace, published table)`; empty: every subscribed table.
    pub tables: Vec<(String, String)>,
    /// Stop the worker once every table is bootstrapped (`kausal bootstrap`); else keep
    /// following the stream (`kausal subscribe --bootstrap`).
    pub exit_when_done: bool,
    /// Rows per chunk; 0: the default.
    pub chunk_rows: usize,
}

/// How far a bootstrap got, for a progress display (`Subscriber::bootstrap_progress`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootstrapProgress {
    /// Per `namespace.table`: rows applied so far and the publisher's estimate.
    pub tables: BTreeMap<String, TableProgress>,
    /// Every table of the bootstrap has all its rows.
    pub complete: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableProgress {
    pub rows: u64,
    /// `reltuples` at the publisher: 0 when unknown (a table never analyzed).
    pub estimated_rows: u64,
    pub done: bool,
}

impl BootstrapProgress {
    /// Rows applied and the best known total (never below what was applied).
    pub fn totals(&self) -> (u64, u64) {
        self.tables.values().fold((0, 0), |(rows, total), t| {
            let expected = if t.done {
                t.rows
            } else {
                t.estimated_rows.max(t.rows)
            };
            (rows + t.rows, total + expected)
        })
    }
}

/// The worker's bootstrap state.
#[derive(Default)]
pub(super) struct Boot {
    /// A plan not started yet (taken by the first worker of the subscriber).
    pub plan: Option<BootstrapPlan>,
    pub exit_when_done: bool,
    pub chunk_rows: usize,
    /// Tables with chunks still to come.
    pub pending: HashSet<(String, String)>,
    pub last_chunk: Option<Instant>,
    pub started: Option<Instant>,
    /// Rows applied per table (from the store, across restarts).
    pub rows: HashMap<(String, String), u64>,
    pub finished: bool,
    /// Chunks received while store transactions were in flight, with their deliveries.
    pub stash: Vec<(Envelope, kausal_bus::amqp::Delivery)>,
    /// Streams joined (or found joined) since start.
    pub joined: HashSet<(String, u64)>,
    /// Namespaces with tables the store bootstrapped (in an earlier run, say).
    pub bootstrapped: HashSet<String>,
    /// Where progress goes when something displays it (else: log lines).
    pub progress: Option<tokio::sync::watch::Sender<BootstrapProgress>>,
    /// What is known of the first stashed chunk; forgotten when it is taken.
    pub head: Option<Head>,
    /// Requests this worker sent as the holder of the app's bootstrap lock, by id.
    pub asked: HashMap<String, Instant>,
}

/// The first stashed chunk, while it waits for the stream.
pub(super) struct Head {
    /// Of the current request (read once: asked on every turn of the loop).
    current: bool,
    since: Instant,
    /// Its wait was reported.
    reported: bool,
}

/// A chunk waiting this long for the transactions before it is reported.
const CHUNK_WAIT_REPORT: std::time::Duration = std::time::Duration::from_secs(30);

impl Worker {
    /// Resumes the store's unfinished bootstraps and starts the plan's new ones.
    pub(super) async fn start_bootstraps(&mut self) -> Result<(), SubscriberError> {
        let plan = self.boot.plan.take();
        if let Some(p) = &plan {
            self.boot.exit_when_done = p.exit_when_done;
            self.boot.chunk_rows = p.chunk_rows;
        }
        let unfinished = self.store.unfinished_bootstraps().await?;
        let done = self.store.bootstrapped_tables().await?;
        self.boot.bootstrapped = done.iter().map(|(ns, _)| ns.clone()).collect();
        // Bootstraps that only wait for the watermark to pass their last chunk: on a
        // quiet stream no transaction would seed the gate (and so start the upkeep that
        // finishes them).
        for (ns, generation) in self.store.finishing_bootstraps().await? {
            if self.store.has_joined(&ns, generation).await? {
                super::apply::seed(&*self.store, &self.coord, &ns, generation).await?;
                self.streams.seeded.insert((ns.into(), generation));
            }
        }
        let mut resumed: BTreeMap<String, Vec<TableRequest>> = BTreeMap::new();
        for u in &unfinished {
            self.boot
                .rows
                .insert((u.namespace.clone(), u.table.clone()), u.rows_applied);
            resumed
                .entry(u.namespace.clone())
                .or_default()
                .push(TableRequest {
                    table: u.table.clone(),
                    after: u.last_key.clone(),
                });
        }
        for (ns, tables) in resumed {
            tracing::info!(namespace = %ns, tables = tables.len(), "resuming a bootstrap");
            if self.shared_bootstrap() {
                self.note_pending(&ns, tables.iter().map(|t| t.table.clone()).collect());
            } else {
                self.request(&ns, tables, true).await?;
            }
        }
        let Some(plan) = plan else { return Ok(()) };
        let subscribed: Vec<(String, String)> = self
            .cfg
            .tables
            .iter()
            .map(|t| (t.namespace.clone(), t.name.clone()))
            .collect();
        let wanted: Vec<(String, String)> = if plan.tables.is_empty() {
            // Every table not bootstrapped before (naming a table starts it over).
            subscribed
                .iter()
                .filter(|t| !done.contains(*t))
                .cloned()
                .collect()
        } else {
            for t in &plan.tables {
                if !subscribed.contains(t) {
                    let list: Vec<String> =
                        subscribed.iter().map(|(n, t)| format!("{n}.{t}")).collect();
                    return Err(crate::error::ConfigError::NotSubscribed {
                        table: format!("{}.{}", t.0, t.1),
                        subscribed: list.join(", "),
                    }
                    .into());
                }
            }
            plan.tables.clone()
        };
        let mut fresh: BTreeMap<String, Vec<TableRequest>> = BTreeMap::new();
        for (ns, table) in wanted {
            if unfinished
                .iter()
                .any(|u| u.namespace == ns && u.table == table)
            {
                continue;
            }
            // Configuration order: parents first, when the config lists them first.
            let list = fresh.entry(ns).or_default();
            if !list.iter().any(|t| t.table == table) {
                list.push(TableRequest { table, after: None });
            }
        }
        for (ns, tables) in fresh {
            tracing::info!(namespace = %ns, tables = tables.len(), "starting a bootstrap");
            self.request(&ns, tables, false).await?;
        }
        self.drive_bootstraps().await?;
        if self.boot.pending.is_empty() && self.boot.exit_when_done {
            self.boot.finished = true;
        }
        Ok(())
    }

    /// Records the bootstrap in the store (row versions on from here), then asks the
    /// publisher of `namespace`.
    async fn request(
        &mut self,
        namespace: &str,
        tables: Vec<TableRequest>,
        resume: bool,
    ) -> Result<(), SubscriberError> {
        self.request_as(namespace, tables, resume, None).await
    }

    /// [`Self::request`] under the id `reuse` (asking again for the same request: its
    /// chunks still count) or a new one.
    async fn request_as(
        &mut self,
        namespace: &str,
        tables: Vec<TableRequest>,
        resume: bool,
        reuse: Option<String>,
    ) -> Result<(), SubscriberError> {
        let asked_before = reuse.is_some();
        let id = reuse.unwrap_or_else(|| {
            format!(
                "{}-{}",
                self.cfg.app,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or_default()
            )
        });
        let names: Vec<String> = tables.iter().map(|t| t.table.clone()).collect();
        self.store
            .begin_bootstrap(namespace, &names, &id, resume)
            .await?;
        if self.shared_bootstrap() && !asked_before {
            // Recorded only: the worker holding the app's bootstrap lock asks
            // (`drive_bootstraps`), so that workers starting together ask once.
            self.note_pending(namespace, names);
            return Ok(());
        }
        let request = BootstrapRequest {
            request: id,
            queue: self.cfg.queue(),
            tables,
            chunk_rows: if self.boot.chunk_rows == 0 {
                DEFAULT_CHUNK_ROWS
            } else {
                self.boot.chunk_rows
            },
        };
        send_request(
            &self.cfg.broker.url,
            &self.cfg.broker.exchange,
            namespace,
            &request,
            self.cfg.broker.queue_type,
        )
        .await?;
        self.note_pending(namespace, names);
        Ok(())
    }

    /// Tables whose bootstrap this worker waits for (and shows the progress of).
    fn note_pending(&mut self, namespace: &str, names: Vec<String>) {
        for t in names {
            if let Some(progress) = &self.boot.progress {
                let rows = self.boot.rows.get(&(namespace.to_string(), t.clone()));
                let rows = rows.copied().unwrap_or(0);
                progress.send_modify(|p| {
                    p.complete = false;
                    p.tables
                        .entry(format!("{namespace}.{t}"))
                        .or_insert(TableProgress {
                            rows,
                            ..TableProgress::default()
                        });
                });
            }
            self.boot.pending.insert((namespace.to_string(), t));
        }
        self.boot.started.get_or_insert_with(Instant::now);
        self.boot.last_chunk = Some(Instant::now());
    }

    /// Applies the stashed chunks that are due, in arrival order, if no store
    /// transaction is in flight; each delivery is acked once its chunk is applied.
    pub(super) async fn take_stashed_chunks(&mut self) -> Result<(), SubscriberError> {
        if !self.gate.applying.is_empty() {
            return Ok(());
        }
        while self.chunk_due().await? {
            let (env, delivery) = self.boot.stash.remove(0);
            self.boot.head = None;
            self.take_chunk(env).await?;
            delivery.ack().await?;
        }
        Ok(())
    }

    /// Whether the first stashed chunk can be applied: the store has applied every
    /// transaction of the stream up to the chunk's version (its `seq`), so no older
    /// write can come after it and its rows need no row versions (docs/bootstrap.md).
    /// Those transactions reached the queue before the chunk, so they are here or
    /// applied. A chunk of the current request joins its stream first when the store
    /// has not (the join point is where the watermark starts). Meanwhile the stream
    /// goes on; once a chunk is due, no new group starts until it is applied.
    pub(super) async fn chunk_due(&mut self) -> Result<bool, SubscriberError> {
        let Some((env, _)) = self.boot.stash.first() else {
            return Ok(false);
        };
        let Some(snapshot) = env.snapshot.clone() else {
            return Ok(true);
        };
        let (ns, generation, version) = (env.namespace.clone(), env.generation, env.seq);
        let current = match &self.boot.head {
            Some(head) => head.current,
            None => {
                let current = self.store.chunk_is_current(&ns, &snapshot).await?;
                self.boot.head = Some(Head {
                    current,
                    since: Instant::now(),
                    reported: false,
                });
                current
            }
        };
        if !current {
            return Ok(true); // ignored when applied
        }
        if let Some(after) = snapshot.join_after {
            self.join_at_chunk(&ns, generation, after).await?;
        }
        let mut watermark = self.coord.watermark(&ns, generation).await?;
        if watermark.is_none() {
            super::apply::seed(&*self.store, &self.coord, &ns, generation).await?;
            self.streams.seeded.insert((ns.as_str().into(), generation));
            watermark = self.coord.watermark(&ns, generation).await?;
        }
        let due = watermark.is_some_and(|w| w >= version);
        if let (false, Some(head)) = (due, self.boot.head.as_mut()) {
            if head.since.elapsed() > CHUNK_WAIT_REPORT && !head.reported {
                head.reported = true;
                tracing::warn!(
                    namespace = %ns, table = %snapshot.table, chunk = snapshot.chunk,
                    version, applied_through = watermark.unwrap_or(0),
                    "a bootstrap chunk waits for the transactions before it to be applied \
                     (is one dead-lettered? see `kausal status`)"
                );
            }
        }
        Ok(due)
    }

    /// Applies a bootstrap chunk (a message of its own, acked by the caller after).
    async fn take_chunk(&mut self, env: Envelope) -> Result<(), SubscriberError> {
        let Some(snapshot) = env.snapshot.clone() else {
            return Ok(());
        };
        let ns = env.namespace.clone();
        let tx = match self.mapping.assemble(std::slice::from_ref(&env)) {
            Ok(tx) => tx,
            Err(error) => {
                tracing::error!(table = %snapshot.table, error = %error,
                    "a bootstrap chunk does not fit the subscription; skipped");
                return Ok(());
            }
        };
        let key = (ns.clone(), snapshot.table.clone());
        if self.boot.pending.contains(&key) {
            // The publisher is answering: no need to ask again yet.
            self.boot.last_chunk = Some(Instant::now());
        }
        let applied = self.store.apply_chunk(tx, &snapshot).await?;
        if !applied.current {
            tracing::debug!(table = %snapshot.table, request = %snapshot.request,
                "chunk of an earlier request or a finished table; ignored");
            return Ok(());
        }
        self.boot.rows.insert(key.clone(), applied.rows_applied);
        let elapsed = self
            .boot
            .started
            .map_or(0.0, |s| s.elapsed().as_secs_f64())
            .max(0.001);
        let rate = applied.rows_applied as f64 / elapsed;
        let left = snapshot.estimated_rows.saturating_sub(applied.rows_applied);
        if let Some(progress) = &self.boot.progress {
            progress.send_modify(|p| {
                p.tables.insert(
                    format!("{ns}.{}", snapshot.table),
                    TableProgress {
                        rows: applied.rows_applied,
                        estimated_rows: snapshot.estimated_rows,
                        done: applied.done,
                    },
                );
            });
        } else {
            tracing::info!(
                namespace = %ns,
                table = %snapshot.table,
                chunk = snapshot.chunk,
                rows = applied.rows_applied,
                estimated_rows = snapshot.estimated_rows,
                written = applied.written,
                rows_per_s = rate.round() as u64,
                eta_s = if rate > 0.0 { (left as f64 / rate).round() as u64 } else { 0 },
                "bootstrap progress"
            );
        }
        if applied.done {
            self.boot.pending.remove(&key);
            tracing::info!(namespace = %ns, table = %snapshot.table,
                rows = applied.rows_applied, "table bootstrapped");
            if self.boot.pending.is_empty() {
                if let Some(progress) = &self.boot.progress {
                    progress.send_modify(|p| p.complete = true);
                }
                tracing::info!(seconds = elapsed.round() as u64, "bootstrap complete");
                if self.boot.exit_when_done {
                    self.boot.finished = true;
                }
            }
        }
        Ok(())
    }

    /// A bootstrapping app whose store has nothing of this stream joins it at the first
    /// transaction its queue delivers (the lowest: a queue delivers in publish order):
    /// everything before is behind the chunks' watermarks, so its rows come with the
    /// chunks. So does a store that bootstrapped in an earlier run but never applied a
    /// transaction of the stream: it never acked one either, so its queue still holds
    /// everything since the request. Only with one worker process: with several, a
    /// lower transaction may sit in another worker's window.
    pub(super) async fn join_for_bootstrap(
        &mut self,
        namespace: &str,
        generation: u64,
        seq: u64,
    ) -> Result<(), SubscriberError> {
        let pending = self.boot.pending.iter().any(|(ns, _)| ns == namespace);
        let bootstrapping = pending || self.boot.bootstrapped.contains(namespace);
        if !bootstrapping
            || seq <= 1
            || !matches!(self.cfg.coordination, crate::config::Coordination::Memory)
            || !self.boot.joined.insert((namespace.to_string(), generation))
        {
            return Ok(());
        }
        if self
            .store
            .has_followed_generation(namespace, generation)
            .await?
        {
            return Ok(());
        }
        if !pending
            && self
                .store
                .has_other_generations(namespace, generation)
                .await?
        {
            // It followed an earlier generation: not a first join.
            return Ok(());
        }
        // The store first: a later seeding of the gate from the store agrees with it.
        self.store.compact(namespace, generation, seq - 1).await?;
        super::apply::seed(&*self.store, &self.coord, namespace, generation).await?;
        self.streams.seeded.insert((namespace.into(), generation));
        self.coord.join(namespace, generation, seq - 1).await?;
        tracing::info!(
            namespace,
            generation,
            first_seq = seq,
            "bootstrap: joined the stream at the first transaction this queue received"
        );
        Ok(())
    }

    /// A store that has applied nothing of the namespace joins the stream where the
    /// publisher says the bootstrap's chunks begin (`join_after`): every later
    /// transaction reached the queue, every earlier one is in the chunks. Any worker
    /// process can do it (the join goes to the shared coordination), so this needs no
    /// single worker, unlike [`Self::join_for_bootstrap`].
    async fn join_at_chunk(
        &mut self,
        namespace: &str,
        generation: u64,
        after: u64,
    ) -> Result<(), SubscriberError> {
        if self
            .boot
            .joined
            .contains(&(namespace.to_string(), generation))
        {
            return Ok(());
        }
        self.boot.joined.insert((namespace.to_string(), generation));
        // A store that compacted this stream joined it already (here, by another
        // worker, or following it from its first transaction); one that follows an
        // earlier generation is no new store. Transactions applied already (changes of
        // new rows wait for nothing) are fine either way: their effects are newer than
        // the chunks' or in them.
        if self
            .store
            .has_other_generations(namespace, generation)
            .await?
        {
            return Ok(());
        }
        if self.store.has_joined(namespace, generation).await? {
            // Joined before (an earlier run): the gate state comes from the store, and
            // the upkeep that finishes the bootstrap needs it even if no transaction
            // ever comes.
            super::apply::seed(&*self.store, &self.coord, namespace, generation).await?;
            self.streams.seeded.insert((namespace.into(), generation));
            return Ok(());
        }
        // `after` 0: the publisher had published nothing of this generation before the
        // request; the join is still recorded (a watermark of 0), so that the bootstrap
        // can finish on a quiet stream and a later chunk cannot move the join point.
        self.store.compact(namespace, generation, after).await?;
        super::apply::seed(&*self.store, &self.coord, namespace, generation).await?;
        self.streams.seeded.insert((namespace.into(), generation));
        self.coord.join(namespace, generation, after).await?;
        tracing::info!(
            namespace,
            generation,
            after,
            "bootstrap: joined the stream where the publisher's chunks begin"
        );
        Ok(())
    }
}
