//! `kausal-bus`: what publishers and subscribers agree on.
//!
//! - [`envelope`]: the versioned wire format and its pure codec.
//! - [`deps`]: hashing of dependency keys into a bounded space.
//! - [`amqp`]: RabbitMQ topology, confirmed publishing, consuming with manual acks.
//! - [`bootstrap`]: bootstrap requests (initial sync of a subscriber).
//! - [`contract`]: the publisher contract file (what a publisher publishes).
//! - [`tls`]: TLS settings every connection shares (CA files, no plaintext fallback).
//!
//! Depends on neither the publisher nor the subscriber.

pub mod amqp;
pub mod bootstrap;
pub mod contract;
pub mod deps;
pub mod envelope;
pub mod error;
pub mod signing;
pub mod sql_errors;
pub mod tls;

pub use envelope::{
    decode, encode, encode_as, BatchWriter, Change, Column, Context, DecodeError, Dep, DepKind,
    Envelope, Op, Snapshot, TableSchema,
};
pub use error::{chain as error_chain, BusError, ErrorClass};
