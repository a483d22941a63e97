//! Errors of the publisher, each classified: transient errors restart the stream from the
//! checkpoint with backoff; definite ones stop the publisher with a message that names
//! the problem and the fix.

pub use kausal_bus::ErrorClass;

/// Problems with the source database.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("TLS settings of source.url: {0}")]
    TlsSettings(#[source] kausal_bus::tls::TlsSettingsError),
    #[error("TLS to the source at {endpoint} failed: {detail}")]
    Tls { endpoint: String, detail: String },
    #[error("cannot reach Postgres at {endpoint}: is the server running and source.url right?")]
    Unreachable {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "Postgres rejected the login for user {user:?} at {endpoint}: check the password \
         (source.password_env / source.password_file / the URL) and pg_hba.conf"
    )]
    BadLogin {
        endpoint: String,
        user: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "Postgres has wal_level = {found}, logical replication needs wal_level = logical: \
         set it in postgresql.conf (or run scripts/setup.sh) and restart Postgres"
    )]
    WalLevel { found: String },
    #[error(
        "Postgres has {setting} = {limit} and {used} in use: raise {setting} in \
         postgresql.conf and restart Postgres"
    )]
    Limit {
        setting: &'static str,
        limit: i64,
        used: i64,
    },
    #[error(
        "user {user:?} may not replicate: run `ALTER ROLE \"{user}\" REPLICATION;` as a \
         superuser"
    )]
    NoReplicationPrivilege { user: String },
    #[error(
        "published table {table} does not exist in database {database:?}: create it or \
         remove it from the [[table]] list"
    )]
    MissingTable { table: String, database: String },
    #[error(
        "user {user:?} cannot read published table {table}: run `GRANT SELECT ON {table} \
         TO \"{user}\";`"
    )]
    NoSelect { table: String, user: String },
    #[error(
        "table {table} has no primary key (REPLICA IDENTITY {identity}): add a primary \
         key, or pick a unique index over NOT NULL columns with `ALTER TABLE {table} \
         REPLICA IDENTITY USING INDEX <index>;`"
    )]
    NoKey { table: String, identity: String },
    #[error("table {table} has no column {column:?}: fix `columns` of that [[table]]")]
    MissingColumn { table: String, column: String },
    #[error(
        "column {column:?} of table {table} is a stored generated column, which Postgres does \
         not send to logical replication (before version 18): remove it from `columns` and \
         compute it in the read model from the columns it is made of"
    )]
    GeneratedColumn { table: String, column: String },
    #[error(
        "key column {column:?} of table {table} is not published: subscribers need the key \
         to apply changes; add it to `columns`"
    )]
    KeyNotPublished { table: String, column: String },
    #[error(
        "reference of table {table} names {referenced}, which is not published with a \
         primary key: publish it or remove the reference"
    )]
    BadReference { table: String, referenced: String },
    #[error(
        "replication slot {slot:?} is gone but checkpoint {checkpoint} expects it (dropped \
         by an administrator?): changes since the checkpoint may be lost. Move the \
         checkpoint away to start a new generation and re-bootstrap subscribers"
    )]
    SlotDropped { slot: String, checkpoint: String },
    #[error(
        "tuning.key_space is {configured} but checkpoint {checkpoint} was written with \
         {checkpointed}: set it back, or move the checkpoint away to start a new generation"
    )]
    KeySpaceChanged {
        configured: u32,
        checkpointed: u32,
        checkpoint: String,
    },
    #[error(
        "replication slot {slot:?} uses plugin {plugin:?}, Kausal needs pgoutput: drop it or \
         configure another source.slot"
    )]
    SlotPlugin { slot: String, plugin: String },
    #[error("Postgres query failed: {context}")]
    Query {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("replication stream failed")]
    Replication(#[source] pgwire_replication::PgWireError),
    #[error("cannot decode the replication stream")]
    Protocol(#[from] crate::source::postgres::pgoutput::ProtocolError),
    #[error("change for relation {oid} arrived before its relation message")]
    UnknownRelation { oid: u32 },
    #[error(
        "a change of table {table} arrived without its key values (key column stored out of \
         line?): run `ALTER TABLE {table} REPLICA IDENTITY FULL;` so the old row carries them"
    )]
    KeyMissing { table: String },
    #[error("the publish loop stopped")]
    PublisherGone,
    #[error("cannot bootstrap table {table}: {reason}")]
    Bootstrap { table: String, reason: String },
    #[error(
        "cannot reach MySQL/MariaDB at {endpoint}: is the server running and source.url \
         right?"
    )]
    MysqlUnreachable {
        endpoint: String,
        #[source]
        source: mysql_async::Error,
    },
    #[error(
        "MySQL/MariaDB rejected the login for user {user:?} at {endpoint}: check the \
         password (source.password_env / source.password_file / the URL) and the user's host"
    )]
    MysqlBadLogin {
        endpoint: String,
        user: String,
        #[source]
        source: mysql_async::Error,
    },
    #[error("MySQL/MariaDB has {setting} = {found}, Kausal needs {setting} = {want}: {fix}")]
    BinlogSetting {
        setting: &'static str,
        found: String,
        want: &'static str,
        fix: &'static str,
    },
    #[error(
        "user {user:?} may not read the binlog: run `GRANT REPLICATION SLAVE, REPLICATION \
         CLIENT ON *.* TO {user};` as an administrator"
    )]
    NoBinlogPrivilege { user: String },
    #[error(
        "table {table} has no primary key: add one (`ALTER TABLE {table} ADD PRIMARY KEY \
         (...)`); subscribers need a stable key to apply changes"
    )]
    MysqlNoKey { table: String },
    #[error(
        "the binlog no longer holds position {position} ({detail}): it was purged (or the \
         server's binlog was reset) before the publisher read it, so changes since the \
         checkpoint are lost. Move the checkpoint away to start a new generation, \
         re-bootstrap subscribers, and raise binlog_expire_logs_seconds / expire_logs_days"
    )]
    BinlogPurged { position: String, detail: String },
    #[error("MySQL/MariaDB query failed: {context}")]
    MysqlQuery {
        context: &'static str,
        #[source]
        source: mysql_async::Error,
    },
    #[error(
        "checkpoint {checkpoint} holds no binlog position (written for another source?): \
         move it away to start a new generation"
    )]
    ForeignCheckpoint { checkpoint: String },
    #[error("no binlog event or heartbeat for {seconds} s: reconnecting")]
    BinlogSilent { seconds: u64 },
    #[error("binlog stream failed")]
    Binlog(#[source] mysql_async::Error),
    #[error("cannot decode a binlog event of table {table}: {detail}")]
    BinlogDecode { table: String, detail: String },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl SourceError {
    pub fn class(&self) -> ErrorClass {
        use SourceError::*;
        match self {
            // Fail-safe (see `kausal_bus::sql_errors`): by SQLSTATE; without one, a
            // closed connection or I/O is retried, a conversion of a value is definite.
            Query { source, .. } => match source.code() {
                Some(code) => kausal_bus::sql_errors::postgres_class(code.code()),
                None if source.is_closed() => ErrorClass::Transient,
                None if std::error::Error::source(source)
                    .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()) =>
                {
                    ErrorClass::Transient
                }
                None => ErrorClass::Definite,
            },
            Unreachable { .. } | UnknownRelation { .. } | PublisherGone | Bootstrap { .. } => {
                ErrorClass::Transient
            }
            MysqlUnreachable { .. } | BinlogSilent { .. } => ErrorClass::Transient,
            MysqlQuery { source, .. } | Binlog(source) => mysql_class(source),
            Replication(e) if e.is_transient() || e.is_io() => ErrorClass::Transient,
            Replication(e) if e.is_server() => replication_server_class(&e.to_string()),
            _ => ErrorClass::Definite,
        }
    }
}

/// A server error on the replication connection, by its SQLSTATE (pgwire-replication
/// gives the error as text ending in `(SQLSTATE xxxxx)`): a missing or wrong object
/// (slot, publication: class 42), refused credentials (28), a missing database (3D) or
/// an unsupported feature (0A) will not cure themselves; anything else (a slot held by
/// another connection 55006, a shutdown 57P01, no code at all) is retried.
fn replication_server_class(text: &str) -> ErrorClass {
    let code = text
        .rsplit_once("SQLSTATE ")
        .map(|(_, rest)| rest.trim_end_matches(')'))
        .unwrap_or("");
    match code.get(..2) {
        Some("42" | "28" | "3D" | "0A") => ErrorClass::Definite,
        _ => ErrorClass::Transient,
    }
}

/// Connection problems are transient; a server error by its number, fail-safe (see
/// `kausal_bus::sql_errors::mysql_class`); anything else (a bad URL, a value that does
/// not convert) is definite.
fn mysql_class(e: &mysql_async::Error) -> ErrorClass {
    match e {
        mysql_async::Error::Io(_) => ErrorClass::Transient,
        mysql_async::Error::Driver(_) => ErrorClass::Transient,
        mysql_async::Error::Server(s) => kausal_bus::sql_errors::mysql_class(s.code),
        _ => ErrorClass::Definite,
    }
}

/// Any error that ends a publisher run.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Bus(#[from] kausal_bus::BusError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Endpoint(#[from] kausal_ops::HttpError),
}

impl PublisherError {
    pub fn class(&self) -> ErrorClass {
        match self {
            PublisherError::Source(e) => e.class(),
            PublisherError::Bus(e) => e.class(),
            PublisherError::Config(_)
            | PublisherError::Checkpoint(_)
            | PublisherError::Endpoint(_) => ErrorClass::Definite,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_server_errors_are_classified_by_sqlstate() {
        let definite = [
            "replication slot \"x\" does not exist (SQLSTATE 42704)",
            "publication \"p\" does not exist (SQLSTATE 42704)",
            "password authentication failed (SQLSTATE 28P01)",
            "database \"d\" does not exist (SQLSTATE 3D000)",
        ];
        for text in definite {
            assert_eq!(
                replication_server_class(text),
                ErrorClass::Definite,
                "{text}"
            );
        }
        let transient = [
            "replication slot \"x\" is active for PID 7 (SQLSTATE 55006)",
            "terminating connection due to administrator command (SQLSTATE 57P01)",
            "sorry, too many clients already (SQLSTATE 53300)",
            "something without a code",
        ];
        for text in transient {
            assert_eq!(
                replication_server_class(text),
                ErrorClass::Transient,
                "{text}"
            );
        }
    }
}
