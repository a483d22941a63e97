//! Errors of the subscriber, each with a class that decides what the runtime does.

pub use kausal_bus::ErrorClass;

/// A sink (store or callback) failed to apply a transaction.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot reach the store at {endpoint}: is it running and the URL right?")]
    Unreachable {
        endpoint: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("TLS to the store at {endpoint}: {detail}")]
    Tls { endpoint: String, detail: String },
    /// Another worker recorded the same transaction as applied while this group ran
    /// (transient: the retry finds it applied).
    #[error("store record applied failed: another worker applied the same transaction")]
    ConcurrentApply {
        #[source]
        source: sqlx::Error,
    },
    #[error("store {operation} failed")]
    Store {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("store rejected {table}: {reason}")]
    Rejected { table: String, reason: String },
    /// A set-based write of rows failed: the table, the transactions and the column.
    #[error(transparent)]
    Write(Box<WriteError>),
    #[error("callback for {table} failed: {message}")]
    Callback {
        table: String,
        message: String,
        /// Callbacks say themselves whether a retry can help.
        class: ErrorClass,
    },
    #[error("{0}")]
    Mapping(#[from] MappingError),
    /// A sink beside the SQL store (Redis cache, search index, document store).
    #[error("sink {sink} failed: {message}")]
    External {
        sink: String,
        message: String,
        class: ErrorClass,
        /// The driver's error, when there is one (its text is in `message` too).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl SinkError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::Unreachable { .. } => ErrorClass::Transient,
            // Another worker recorded the same transaction first: a retry finds it applied.
            SinkError::ConcurrentApply { .. } => ErrorClass::Transient,
            // Two workers creating the same table at once: one loses with "already
            // exists"; a retry finds the table.
            SinkError::Store { operation, source }
                if DDL.contains(operation) && ddl_race(source) =>
            {
                ErrorClass::Transient
            }
            SinkError::Store { source, .. } => sqlx_class(source),
            SinkError::Write(write) => sqlx_class(&write.source),
            SinkError::Rejected { .. } | SinkError::Mapping(_) | SinkError::Tls { .. } => {
                ErrorClass::Definite
            }
            SinkError::Callback { class, .. } | SinkError::External { class, .. } => *class,
        }
    }
}

/// A set-based write of rows of `table` failed. `seqs` names the transactions whose rows
/// the statement held (one seq once the group is retried transaction by transaction);
/// `column` is set when the database names it.
#[derive(Debug, thiserror::Error)]
#[error("store {operation} of {table} ({seqs}{}) failed", column.as_ref().map(|c| format!(", column `{c}`")).unwrap_or_default())]
pub struct WriteError {
    pub operation: &'static str,
    pub table: String,
    pub seqs: String,
    pub column: Option<String>,
    #[source]
    pub source: sqlx::Error,
}

/// Store operations that create or widen tables.
const DDL: &[&str] = &[
    "create bookkeeping tables",
    "create mirrored table",
    "add mirrored column",
];

/// The error of losing a `CREATE … IF NOT EXISTS` race: Postgres 23505 (on its catalog),
/// 42P07 / 42701 / 42710 (duplicate table, column, object); MySQL 1050 / 1060.
fn ddl_race(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("23505" | "42P07" | "42701" | "42710" | "1050" | "1060")
        ),
        _ => false,
    }
}

/// Fail-safe: a database error is definite only when the same write of the same data
/// is proven to fail again (a constraint, a value the column cannot hold, a table that
/// does not exist: see [`kausal_bus::sql_errors`]); disk full, out of memory, too many
/// connections, a missing privilege (an operator grants it), a code never met, I/O and
/// pool timeouts are retried. Dead-lettering a valid transaction is the worse mistake.
pub fn sqlx_class(error: &sqlx::Error) -> ErrorClass {
    use kausal_bus::sql_errors::{
        mysql_class, postgres_class, MYSQL_PRIVILEGE, POSTGRES_INSUFFICIENT_PRIVILEGE,
    };
    match error {
        sqlx::Error::Database(db) => {
            if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                let number = my.number();
                if MYSQL_PRIVILEGE.contains(&number) {
                    return ErrorClass::Transient;
                }
                return mysql_class(number);
            }
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                return sqlite_class(code.parse().unwrap_or(0));
            }
            if code == POSTGRES_INSUFFICIENT_PRIVILEGE {
                return ErrorClass::Transient;
            }
            postgres_class(&code)
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::Configuration(_) => ErrorClass::Definite,
        _ => ErrorClass::Transient,
    }
}

/// A SQLite error by its (extended) result code: definite for 1 SQL error (no such
/// table, syntax), 18 too big, 19 constraint, 20 type mismatch, 23 authorization, 25
/// range; busy, locked, full, I/O, out of memory and read-only are retried.
fn sqlite_class(code: i32) -> ErrorClass {
    match code & 0xff {
        1 | 18 | 19 | 20 | 23 | 25 => ErrorClass::Definite,
        _ => ErrorClass::Transient,
    }
}

/// A subscription does not fit what the publisher sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error(
        "subscription to {namespace}.{table} asks for column `{column}`, which the publisher \
         does not publish (it publishes: {published}); remove it from `columns` or add it to \
         the publisher's allowlist"
    )]
    MissingColumn {
        namespace: String,
        table: String,
        column: String,
        published: String,
    },
    #[error(
        "subscription to {namespace}.{table} redacts `{column}`, a key column: every row would \
         have the same key; hash it instead (`{column} = \"hash\"`) or keep it"
    )]
    RedactedKey {
        namespace: String,
        table: String,
        column: String,
    },
    #[error(
        "envelope seq {seq} of {namespace} changes table `{table}` but carries no schema for it"
    )]
    MissingSchema {
        namespace: String,
        seq: u64,
        table: String,
    },
}

/// Coordination (in-process or Redis) failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("cannot reach Redis at {endpoint}: is it running and coordination.url right?")]
    Unreachable {
        endpoint: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("TLS to Redis at {endpoint}: {detail}")]
    Tls { endpoint: String, detail: String },
    #[error("{reason}")]
    Url { reason: String },
    #[error("redis {operation} failed")]
    Redis {
        operation: &'static str,
        #[source]
        source: redis::RedisError,
    },
}

/// Why the subscriber stopped.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    #[error("invalid subscriber configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bus(#[from] kausal_bus::BusError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Coord(#[from] CoordError),
    #[error("the broker closed the consumer (connection lost or queue deleted)")]
    ConsumerCancelled,
    #[error(
        "queue {queue} is gone from the broker ({why}), but the store has applied changes \
         from it: what was published since is lost for this store. Start over with an \
         empty store (delete it, or point store.url elsewhere) and `kausal subscribe \
         --bootstrap`"
    )]
    QueueLost { queue: String, why: String },
}

impl SubscriberError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SubscriberError::Config(_) | SubscriberError::QueueLost { .. } => ErrorClass::Definite,
            SubscriberError::Bus(e) => match e.class() {
                kausal_bus::ErrorClass::Transient => ErrorClass::Transient,
                kausal_bus::ErrorClass::Definite => ErrorClass::Definite,
            },
            SubscriberError::Sink(e) => e.class(),
            SubscriberError::Coord(CoordError::Tls { .. } | CoordError::Url { .. }) => {
                ErrorClass::Definite
            }
            SubscriberError::Coord(_) | SubscriberError::ConsumerCancelled => ErrorClass::Transient,
        }
    }
}

/// A subscriber configuration that cannot run, with the fix in the message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Signing(#[from] kausal_bus::signing::SigningError),
    #[error("app `{app}` must be non-empty letters, digits, `_` or `-`")]
    App { app: String },
    #[error("no [[table]] subscribed: add at least one")]
    NoTables,
    #[error("ordering.key_space must be a power of two")]
    KeySpace,
    #[error("broker.partitions is {given}: give 1 to {slots} (the publisher's slots)")]
    Partitions { given: u32, slots: u32 },
    #[error("store.max_group, store.appliers and broker.prefetch must be > 0")]
    Zero,
    #[error("table {table} is subscribed twice")]
    SubscribedTwice { table: String },
    #[error("table {table}: destination `{name}` must be letters, digits and `_`")]
    Destination { table: String, name: String },
    #[error("table {table}: column name `{name}` must be letters, digits and `_`")]
    Column { table: String, name: String },
    #[error(
        "broker.queue_expires = \"{given}\": write a number and a unit: \"90m\", \
         \"12h\", \"7d\" (at most 49 days)"
    )]
    QueueExpires { given: String },
    /// A `hash` mask without a usable salt (the message names the column and the fix).
    #[error("{0}")]
    MaskSalt(String),
    #[error(
        "cannot bootstrap {table}: this configuration does not subscribe it (it subscribes \
         {subscribed})"
    )]
    NotSubscribed { table: String, subscribed: String },
    #[error(
        "a bootstrap asks the publisher over the broker: it cannot run on an in-process queue"
    )]
    BootstrapInProcess,
    #[error("metrics.listen: {0}")]
    Metrics(#[source] kausal_ops::HttpError),
}
