//! `kausal-subscriber`: apply a publisher's transactions to your own store, in causal
//! order.
//!
//! Layout:
//! - [`config`]: what an app subscribes, its store, coordination and ordering mode.
//! - [`contract`]: a configuration checked against a publisher's contract file.
//! - [`txn`]: envelopes assembled into [`txn::Transaction`]s, mapped onto the
//!   subscribed tables and columns.
//! - [`schedule`]: the causal gate (the dependency rule, counters, the watermark).
//! - [`coord`]: where gate state lives: in memory (one worker process) or Redis (many).
//! - [`sink`]: the SQL store and callbacks.
//! - [`runtime`]: consume, gate, apply in groups, ack; the worker loop.
//! - [`status`]: what a running worker reports (store row, `/status`, metrics).

pub mod config;
pub mod contract;
pub mod coord;
pub mod error;
pub mod mapping;
pub mod mask;
pub mod runtime;
pub mod schedule;
pub mod sink;
pub mod status;
pub mod store;
pub mod table;
pub mod tls;
pub mod txn;

pub use config::{Mode, SubscriberConfig};
pub use error::{ErrorClass, SinkError, SubscriberError};
pub use runtime::{run, BootstrapPlan, BootstrapProgress, Subscriber, TableProgress};
pub use sink::{CallbackError, Callbacks, Event, StoreConn, StoreTx};
