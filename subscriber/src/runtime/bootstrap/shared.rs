//! Bootstrap with several worker processes: the holder of the app's bootstrap lock
//! asks the publishers; whoever asked follows the bootstrap's progress in the store,
//! since the chunks reach whichever worker consumes the app's queue.

use super::super::Worker;
use super::{LOCK_TTL_MS, RE_REQUEST_AFTER};
use crate::error::SubscriberError;
use kausal_bus::bootstrap::TableRequest;
use std::collections::BTreeMap;
use std::time::Instant;

impl Worker {
    /// Several worker processes share the app (Redis coordination): one of them, the
    /// holder of the app's bootstrap lock, asks the publishers.
    pub(in crate::runtime) fn shared_bootstrap(&self) -> bool {
        matches!(*self.coord, crate::coord::Coordinator::Redis(_))
    }

    /// With several workers: the holder of the app's bootstrap lock (taken by whoever
    /// finds it free, renewed every few seconds, so a dead holder's successor takes
    /// over within [`LOCK_TTL_MS`]) asks for every unfinished bootstrap the store
    /// records, once, under its recorded request id, and asks again when its rows
    /// stopped moving for [`RE_REQUEST_AFTER`].
    pub(in crate::runtime) async fn drive_bootstraps(&mut self) -> Result<(), SubscriberError> {
        let crate::coord::Coordinator::Redis(redis) = &*self.coord else {
            return Ok(());
        };
        let unfinished = self.store.unfinished_bootstraps().await?;
        if unfinished.is_empty() {
            return Ok(());
        }
        let me = self.ops.status().worker;
        if !redis.hold("bootstrap", &me, LOCK_TTL_MS).await? {
            return Ok(());
        }
        let mut moved = false;
        for u in &unfinished {
            let key = (u.namespace.clone(), u.table.clone());
            if self.boot.rows.insert(key, u.rows_applied) != Some(u.rows_applied) {
                moved = true;
            }
        }
        let by_request = by_request(unfinished);
        if moved {
            self.boot.last_chunk = Some(Instant::now());
        }
        let silent = self
            .boot
            .last_chunk
            .is_none_or(|t| t.elapsed() >= RE_REQUEST_AFTER);
        for ((ns, id), tables) in by_request {
            let asked = self.boot.asked.get(&id).copied();
            if asked.is_some_and(|t| t.elapsed() < RE_REQUEST_AFTER || !silent) {
                continue;
            }
            tracing::info!(namespace = %ns, request = %id, tables = tables.len(),
                "asking the publisher for a bootstrap (this worker holds the app's bootstrap lock)");
            self.boot.asked.insert(id.clone(), Instant::now());
            self.request_as(&ns, tables, true, Some(id)).await?;
        }
        Ok(())
    }

    /// With several worker processes, a bootstrap's chunks reach whichever worker
    /// consumes the app's queue, not necessarily the one that asked: the one that
    /// asked follows the bootstrap in the store instead (rows applied move: the answer
    /// is coming; a table no longer unfinished: done), to know when to ask again and
    /// when `kausal bootstrap` is finished.
    pub(in crate::runtime) async fn follow_bootstraps_in_store(
        &mut self,
    ) -> Result<(), SubscriberError> {
        if self.boot.pending.is_empty()
            || matches!(self.cfg.coordination, crate::config::Coordination::Memory)
        {
            return Ok(());
        }
        let unfinished = self.store.unfinished_bootstraps().await?;
        let mut moved = false;
        for u in &unfinished {
            let key = (u.namespace.clone(), u.table.clone());
            if self.boot.pending.contains(&key)
                && self.boot.rows.insert(key, u.rows_applied) != Some(u.rows_applied)
            {
                moved = true;
            }
        }
        if moved {
            self.boot.last_chunk = Some(Instant::now());
            if let Some(progress) = &self.boot.progress {
                let rows = &self.boot.rows;
                progress.send_modify(|p| {
                    for ((ns, t), n) in rows {
                        if let Some(table) = p.tables.get_mut(&format!("{ns}.{t}")) {
                            table.rows = *n;
                        }
                    }
                });
            }
        }
        let before = self.boot.pending.len();
        self.boot.pending.retain(|(ns, t)| {
            unfinished
                .iter()
                .any(|u| &u.namespace == ns && &u.table == t)
        });
        if before > 0 && self.boot.pending.is_empty() {
            if let Some(progress) = &self.boot.progress {
                progress.send_modify(|p| {
                    for t in p.tables.values_mut() {
                        t.done = true;
                    }
                    p.complete = true;
                });
            }
            tracing::info!("bootstrap complete (chunks applied by the app's workers)");
            if self.boot.exit_when_done {
                self.boot.finished = true;
            }
        }
        Ok(())
    }

    /// Asks again when chunks stopped coming (publisher down or restarted).
    pub(in crate::runtime) async fn re_request_if_silent(&mut self) -> Result<(), SubscriberError> {
        if self.shared_bootstrap() {
            return Ok(()); // `drive_bootstraps` asks again
        }
        let silent = self
            .boot
            .last_chunk
            .is_some_and(|t| t.elapsed() >= RE_REQUEST_AFTER);
        // Chunks waiting in the stash for the stream are no silence.
        if self.boot.pending.is_empty() || !silent || !self.boot.stash.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            waited_s = RE_REQUEST_AFTER.as_secs(),
            "no bootstrap chunk for a while (is the publisher running?): asking again"
        );
        // The same request id: chunks of the answer in progress keep counting, so a
        // slow answer is not superseded by every retry.
        for ((ns, id), tables) in by_request(self.store.unfinished_bootstraps().await?) {
            self.request_as(&ns, tables, true, Some(id)).await?;
        }
        Ok(())
    }
}

/// Unfinished bootstraps grouped by namespace and recorded request id, each table asked
/// from where it stopped: what a request under that id asks again.
fn by_request(
    unfinished: Vec<crate::sink::sql::Unfinished>,
) -> BTreeMap<(String, String), Vec<TableRequest>> {
    let mut out: BTreeMap<(String, String), Vec<TableRequest>> = BTreeMap::new();
    for u in unfinished {
        out.entry((u.namespace, u.request))
            .or_default()
            .push(TableRequest {
                table: u.table,
                after: u.last_key,
            });
    }
    out
}
