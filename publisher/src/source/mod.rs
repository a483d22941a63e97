//! Sources of row changes.
pub mod postgres;
