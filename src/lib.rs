//! Kausal: causal-order replication from a primary database's log into other services'
//! read models. This facade re-exports the crates and holds configuration loading; the
//! `kausal` binary is the command line.
//!
//! - [`bus`]: wire format and RabbitMQ plumbing.
//! - [`publisher`]: Postgres logical replication → envelopes with dependencies.
//! - [`subscriber`]: envelopes → your store and callbacks, in causal order.
//! - [`ops`]: metrics and the status endpoint.

pub mod config;

pub use kausal_bus as bus;
pub use kausal_ops as ops;
pub use kausal_publisher as publisher;
pub use kausal_subscriber as subscriber;
