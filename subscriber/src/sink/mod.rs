//! Where applied transactions go.
//!
//! - [`sql`]: the store: a SQL database (Postgres, MySQL/MariaDB, SQLite) holding the
//!   read model and Kausal's bookkeeping, one source transaction (or a group of
//!   independent ones) per database transaction.
//! - [`callback`]: user code, run inside the store transaction of the change it sees,
//!   in causal order.

pub mod callback;
pub mod sql;

pub use callback::{CallbackError, Callbacks, Event};
pub use sql::SqlStore;
