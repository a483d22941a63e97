//! The bootstrap requests the publisher holds: taken from the control queue and not
//! acked yet, each being answered or waiting for a request of the same name to end.
//! Mirrored into the status after every change.

use crate::ops::{now_ms, BootstrapRequestStatus};
use crate::publish::Stats;
use kausal_bus::amqp::Delivery;
use kausal_bus::bootstrap::BootstrapRequest;
use std::sync::Arc;
use tokio::task::Id;

pub(super) struct Held {
    stats: Arc<Stats>,
    /// In the order the requests arrived.
    entries: Vec<Entry>,
}

struct Entry {
    delivery: Delivery,
    request: BootstrapRequest,
    /// The task answering it, once started.
    task: Option<Id>,
    since_ms: i64,
}

impl Held {
    pub(super) fn new(stats: Arc<Stats>) -> Held {
        let held = Held {
            stats,
            entries: Vec::new(),
        };
        held.publish();
        held
    }

    pub(super) fn push(&mut self, delivery: Delivery, request: BootstrapRequest) {
        self.entries.push(Entry {
            delivery,
            request,
            task: None,
            since_ms: now_ms(),
        });
        self.publish();
    }

    /// Requests that may start now, oldest first, with the handle [`Self::started`]
    /// takes: those not started whose name no started request has. Two answers of one
    /// name at once would share chunk ids.
    pub(super) fn startable(&self) -> Vec<(BootstrapRequest, usize)> {
        let mut busy: Vec<&str> = self
            .entries
            .iter()
            .filter(|e| e.task.is_some())
            .map(|e| e.request.request.as_str())
            .collect();
        let mut ready = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            if e.task.is_none() && !busy.contains(&e.request.request.as_str()) {
                busy.push(&e.request.request);
                ready.push((e.request.clone(), i));
            }
        }
        ready
    }

    pub(super) fn started(&mut self, handle: usize, task: Id) {
        if let Some(e) = self.entries.get_mut(handle) {
            e.task = Some(task);
            e.since_ms = now_ms();
        }
        self.publish();
    }

    /// The request `task` answered, to ack (or dead-letter); `None` for a task this
    /// does not know.
    pub(super) fn finish(&mut self, task: Id) -> Option<(Delivery, BootstrapRequest)> {
        let i = self.entries.iter().position(|e| e.task == Some(task))?;
        let e = self.entries.remove(i);
        self.publish();
        Some((e.delivery, e.request))
    }

    fn publish(&self) {
        let list = self
            .entries
            .iter()
            .map(|e| BootstrapRequestStatus {
                request: e.request.request.clone(),
                queue: e.request.queue.clone(),
                tables: e.request.tables.iter().map(|t| t.table.clone()).collect(),
                state: if e.task.is_some() {
                    "answering"
                } else {
                    "waiting"
                }
                .into(),
                since_ms: e.since_ms,
            })
            .collect();
        *self
            .stats
            .bootstrap
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = list;
    }
}
