//! What every source's stream does around its log, written once: where the stream
//! starts (the checkpoint's generation, or a new one written down at once), the loop that
//! applies events, checkpoint markers after commits, confirming positions to the server,
//! and shutdown. The two logs differ (a replication slot, a binlog read as a replica);
//! these rules must not, or a replay after a crash would stop being byte-identical for
//! one of them.
//!
//! Starting is two shared functions ([`Start::decide`], [`new_generation`]) rather than
//! trait methods: each source must know its start position in its own type (an LSN, a
//! parsed GTID state) before it opens the log, and between deciding and beginning it has
//! its own work (Postgres: create the slot; MySQL: read the server's current position).
//! The running stream is the [`ChangeLog`] trait, driven by [`run`].

use crate::checkpoint::{self, Checkpoint};
use crate::config::{PublisherConfig, TableConfig};
use crate::error::{PublisherError, SourceError};
use crate::publish::Item;
use crate::source::assemble::Assembler;
use crate::source::change::TableMeta;
use crate::tracker::{Tracker, TrackerState};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How often a source reports its lag. Each report is a catalog query, and lag grows
/// slowly enough that twice a minute shows a trend.
const LAG_REPORT: Duration = Duration::from_secs(30);
/// Shortest pause between two checks for a due checkpoint marker, however short the
/// configured interval: a check is cheap, but not free when the stream is idle.
const MIN_TICK: Duration = Duration::from_millis(100);

/// What the supervisor hands a source's stream besides the checkpoint: where the
/// checkpoint lives and the channels to the publish loop.
pub(crate) struct Wiring {
    pub checkpoint_path: PathBuf,
    /// Envelopes, bootstrap chunks and checkpoint markers, in commit order.
    pub tx: mpsc::Sender<Item>,
    /// Positions whose checkpoint is on disk (everything before them confirmed by
    /// RabbitMQ).
    pub durable: watch::Receiver<u64>,
    pub shutdown: watch::Receiver<bool>,
}

/// Where a stream starts, decided from the checkpoint.
pub(crate) enum Start {
    /// The checkpoint's generation, at its position.
    Resume(Checkpoint),
    /// No checkpoint: a new generation at the server's current position, which the
    /// source looks up and hands to [`new_generation`].
    Begin,
}

impl Start {
    /// Resumes a checkpoint unless it was written with another key space: its counters
    /// would hash keys differently from the envelopes about to be published.
    pub fn decide(
        cfg: &PublisherConfig,
        checkpoint: Option<Checkpoint>,
        path: &Path,
    ) -> Result<Start, SourceError> {
        match checkpoint {
            Some(cp) if cp.state.key_space != cfg.tuning.key_space => {
                Err(SourceError::KeySpaceChanged {
                    configured: cfg.tuning.key_space,
                    checkpointed: cp.state.key_space,
                    checkpoint: path.display().to_string(),
                })
            }
            Some(cp) => Ok(Start::Resume(cp)),
            None => Ok(Start::Begin),
        }
    }
}

/// Starts a new generation at a source position (`position` and `resume` as a
/// [`Checkpoint`] holds them) and writes it down before streaming.
///
/// Written first because a publisher stopped before it published anything (a quiet
/// source, a bootstrap answered from an idle stream) must resume this generation, not
/// start yet another one: that would make every subscriber reset its dependency state and
/// leave bootstraps answered so far in a generation nobody continues. For a binlog,
/// which has no slot holding the position, it also keeps a publisher stopped before its
/// first transaction from starting the next time at a later position and skipping what
/// was committed in between.
pub(crate) async fn new_generation(
    cfg: &PublisherConfig,
    path: &Path,
    position: u64,
    resume: String,
) -> Result<TrackerState, PublisherError> {
    let state = TrackerState::new_generation(cfg.tuning.key_space, path);
    let first = Checkpoint {
        position,
        resume,
        state: state.clone(),
    };
    checkpoint::persist(path, first).await?;
    Ok(state)
}

/// Published key columns of each published table, for the assembler's read hints.
/// `qualified` names a configured table the way `metas` is keyed.
pub(crate) fn key_columns(
    cfg: &PublisherConfig,
    metas: &HashMap<(String, String), TableMeta>,
    qualified: impl Fn(&TableConfig) -> (String, String),
) -> HashMap<String, Vec<String>> {
    cfg.tables
        .iter()
        .filter_map(|t| {
            let meta = metas.get(&qualified(t))?;
            Some((
                t.published_name(),
                meta.key.iter().map(|k| t.published_column(k)).collect(),
            ))
        })
        .collect()
}

/// What a source's events feed: the shared assembler and the channel to the publish
/// loop.
pub(crate) struct Feed {
    pub asm: Assembler,
    tx: mpsc::Sender<Item>,
}

impl Feed {
    /// Hands an item to the publish loop, waiting while its channel is full.
    pub async fn send(&self, item: Item) -> Result<(), PublisherError> {
        // The publish loop only goes away when it failed; its error is the one reported.
        self.tx
            .send(item)
            .await
            .map_err(|_| SourceError::PublisherGone.into())
    }
}

/// What an applied event means to the loop.
pub(crate) enum Step {
    /// Nothing to act on: an event inside a transaction, or one without meaning here.
    Continue,
    /// A transaction ended that the next checkpoint must record.
    Committed,
    /// The log holds nothing of ours up to this position (an idle keepalive, a
    /// transaction that published nothing): confirmed to the server when nothing is in
    /// flight.
    Idle(u64),
    /// The server ended the stream: the stream ends without an error.
    End,
}

/// One source's open log of committed transactions, as [`run`] drives it.
///
/// Contract:
/// - `recv` and `apply` alternate until an error, [`Step::End`] or shutdown; `close` is
///   called on shutdown only.
/// - `recv` must be cancel-safe: the loop drops it whenever a tick, a durable position
///   or shutdown comes first. Work that must not be cut short belongs in `apply`, which
///   always runs to completion.
/// - `apply` feeds the event to `feed.asm` and sends what the assembler returns, in
///   order. A transaction's end is [`Step::Committed`] (or [`Step::Idle`] if the source
///   can confirm it instead of checkpointing it), and only then may `position` move.
/// - `position` is where a checkpoint written now resumes, as
///   ([`Checkpoint::position`], [`Checkpoint::resume`]).
/// - `confirm(p)` gets positions whose checkpoint is durable, or an idle position while
///   nothing is in flight: the server may then drop its log before `p`.
///
/// Why `apply` feeds the assembler instead of returning a batch of row changes: rows are
/// borrowed from the event's buffer (no copy per value), and a table description may
/// need a catalog query between two rows of the same event.
pub(crate) trait ChangeLog: Sized + Send {
    /// One event as the server sends it.
    type Event: Send;

    /// Waits for the next event; `None` when the server ended the stream.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Self::Event>, PublisherError>> + Send;

    /// Applies one event (see the contract above).
    fn apply(
        &mut self,
        event: Self::Event,
        feed: &mut Feed,
    ) -> impl Future<Output = Result<Step, PublisherError>> + Send;

    /// Where a checkpoint written now resumes.
    fn position(&self) -> (u64, String);

    /// Lets the server drop its log before `position`.
    fn confirm(&mut self, position: u64);

    /// Ends the stream and its connections on shutdown.
    fn close(self) -> impl Future<Output = ()> + Send;

    /// Logs how far the log is behind, every [`LAG_REPORT`]. Nothing by default.
    fn report_lag(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Streams `log` from `state` until shutdown (then writes a last marker if one is due
/// and no transaction is open) or an error. Envelopes and checkpoint markers go to the
/// publish loop in commit order; durable positions are confirmed to the server.
pub(crate) async fn run<L: ChangeLog>(
    cfg: &PublisherConfig,
    mut log: L,
    state: TrackerState,
    key_columns: HashMap<String, Vec<String>>,
    wiring: Wiring,
) -> Result<(), PublisherError> {
    let Wiring {
        tx,
        mut durable,
        mut shutdown,
        ..
    } = wiring;
    let mut feed = Feed {
        asm: Assembler::new(
            &cfg.namespace,
            cfg.tuning.key_space,
            cfg.tuning.max_part_changes,
            Tracker::new(state),
            key_columns,
        ),
        tx,
    };
    let interval = Duration::from_millis(cfg.checkpoint.interval_ms);
    let mut markers = Markers {
        interval,
        last: Instant::now(),
        dirty: false,
        position: log.position().0,
    };
    let mut tick = tokio::time::interval(interval.max(MIN_TICK));
    let mut lag = tokio::time::interval(LAG_REPORT);
    loop {
        // Nothing of ours in flight: everything published is in a durable checkpoint.
        let clean = !markers.dirty && *durable.borrow() >= markers.position;
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                if markers.dirty && !feed.asm.in_transaction() {
                    let last = markers.checkpoint(&log, &feed);
                    let _ = feed.send(Item::Marker(Box::new(last))).await;
                }
                log.close().await;
                return Ok(());
            }
            Ok(()) = durable.changed() => {
                let position = *durable.borrow_and_update();
                log.confirm(position);
            }
            _ = tick.tick() => markers.send_if_due(&log, &feed).await?,
            _ = lag.tick() => log.report_lag().await,
            event = log.recv() => {
                let Some(event) = event? else {
                    return Ok(());
                };
                match log.apply(event, &mut feed).await? {
                    Step::Continue => {}
                    Step::Committed => markers.dirty = true,
                    Step::Idle(position) => {
                        if clean && !feed.asm.in_transaction() {
                            log.confirm(position);
                        }
                    }
                    Step::End => return Ok(()),
                }
                markers.send_if_due(&log, &feed).await?;
            }
        }
    }
}

/// When checkpoint markers go out: once something committed is not in a checkpoint
/// yet, between transactions, at most once per interval (each is a file write with
/// fsync, and carries every dependency counter).
struct Markers {
    interval: Duration,
    last: Instant,
    /// A commit is not in any marker yet.
    dirty: bool,
    /// Position of the last marker sent.
    position: u64,
}

impl Markers {
    /// A checkpoint at the log's position with the counters as they are now.
    fn checkpoint(&self, log: &impl ChangeLog, feed: &Feed) -> Checkpoint {
        let (position, resume) = log.position();
        Checkpoint {
            position,
            resume,
            state: feed.asm.tracker.state.clone(),
        }
    }

    async fn send_if_due(
        &mut self,
        log: &impl ChangeLog,
        feed: &Feed,
    ) -> Result<(), PublisherError> {
        if self.dirty && !feed.asm.in_transaction() && self.last.elapsed() >= self.interval {
            let checkpoint = self.checkpoint(log, feed);
            self.position = checkpoint.position;
            feed.send(Item::Marker(Box::new(checkpoint))).await?;
            self.dirty = false;
            self.last = Instant::now();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PublisherConfig {
        serde_json::from_value(serde_json::json!({
            "namespace": "driver-test",
            "source": { "kind": "mysql", "url": "mysql://u@127.0.0.1/db" },
            "broker": { "url": "amqp://127.0.0.1" },
        }))
        .unwrap()
    }

    fn checkpoint(key_space: u32) -> Checkpoint {
        Checkpoint {
            position: 7,
            resume: "file:bin.000001:4".into(),
            state: TrackerState::new(1, key_space),
        }
    }

    #[test]
    fn a_checkpoint_of_another_key_space_is_refused_not_resumed() {
        let cfg = config();
        let path = Path::new("/nonexistent/x.checkpoint");
        let same = checkpoint(cfg.tuning.key_space);
        assert!(matches!(
            Start::decide(&cfg, Some(same.clone()), path),
            Ok(Start::Resume(cp)) if cp == same
        ));
        assert!(matches!(
            Start::decide(&cfg, Some(checkpoint(cfg.tuning.key_space + 1)), path),
            Err(SourceError::KeySpaceChanged { .. })
        ));
        assert!(matches!(Start::decide(&cfg, None, path), Ok(Start::Begin)));
    }

    #[tokio::test]
    async fn a_new_generation_is_on_disk_before_it_streams() {
        let cfg = config();
        let dir = std::env::temp_dir().join(format!("kausal-driver-{}", std::process::id()));
        let path = dir.join("g.checkpoint");
        let state = new_generation(&cfg, &path, 0, "gtid:0-1-5".into())
            .await
            .unwrap();
        let written = checkpoint::load(&path).unwrap().unwrap();
        assert_eq!(
            (written.position, written.resume.as_str()),
            (0, "gtid:0-1-5")
        );
        assert_eq!(written.state, state);
        let _ = std::fs::remove_dir_all(dir);
    }
}
