//! `kausal-bus`: what publishers and subscribers agree on.
//!
//! - [`envelope`]: the versioned wire format and its pure codec.
//! - [`deps`]: hashing of dependency keys into a bounded space.
//! - [`amqp`]: RabbitMQ topology, confirmed publishing, consuming with manual acks.
//!
//! Depends on neither the publisher nor the subscriber.

pub mod amqp;
pub mod deps;
pub mod envelope;
mod error;

pub use envelope::{
    decode, encode, BatchWriter, Change, Column, Context, DecodeError, Dep, DepKind, Envelope, Op,
    TableSchema,
};
pub use error::{BusError, ErrorClass};
