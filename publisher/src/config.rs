//! What a publisher publishes, and where from and to.

use kausal_bus::deps::DEFAULT_KEY_SPACE;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Changes per envelope part before a transaction is split: bounds publisher and
/// subscriber memory per message (a 1M-row update becomes 1,000 parts of 1,000 rows).
pub const DEFAULT_MAX_PART_CHANGES: usize = 1000;
/// Envelopes packed into one AMQP message under load. The broker's per-message cost is
/// the ceiling (CRATES.md: 7–11k confirmed messages/s), so batching multiplies throughput;
/// at low load a message holds whatever is ready, so nothing waits to fill it.
pub const DEFAULT_MAX_BATCH_ENVELOPES: usize = 128;
/// Bytes per AMQP message before it is sent regardless of the envelope count.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 512 * 1024;
/// Unconfirmed AMQP messages in flight: enough to keep the broker busy.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// How often counters and position are checkpointed (and the slot advanced), in ms.
/// Bounds the replay (and duplicates) after a crash.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublisherConfig {
    /// Names this publisher on the bus; routing keys start with it.
    pub namespace: String,
    pub source: SourceConfig,
    pub broker: BrokerConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub tuning: Tuning,
    /// Published tables. Anything not listed never leaves the database.
    #[serde(rename = "table", default)]
    pub tables: Vec<TableConfig>,
    /// The `/metrics` and `/status` endpoint.
    #[serde(default)]
    pub metrics: kausal_ops::MetricsConfig,
    /// Sign every message (see `kausal_bus::signing`).
    #[serde(default)]
    pub signing: SigningConfig,
}

/// `[signing]`: the key messages are signed with. The secret comes from a file or an
/// environment variable, never from the configuration file itself.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// Names the key; subscribers list its public key under this id. Signing is on
    /// when it is set.
    pub key_id: Option<String>,
    /// Environment variable holding the secret key (`kausal keygen` prints one). Not
    /// `KAUSAL_SIGNING_…`: those would set options of this section.
    #[serde(default = "default_signing_env")]
    pub key_env: String,
    /// File holding the secret key instead (wins over `key_env`).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl Default for SigningConfig {
    fn default() -> Self {
        SigningConfig {
            key_id: None,
            key_env: default_signing_env(),
            key_file: None,
        }
    }
}

impl std::fmt::Debug for SigningConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningConfig")
            .field("key_id", &self.key_id)
            .field("key_env", &self.key_env)
            .field("key_file", &self.key_file)
            .finish()
    }
}

fn default_signing_env() -> String {
    "KAUSAL_SIGN_KEY".into()
}

impl SigningConfig {
    /// The signer, when signing is on.
    pub fn signer(&self) -> Result<Option<kausal_bus::signing::Signer>, ConfigError> {
        let Some(key_id) = &self.key_id else {
            return Ok(None);
        };
        let secret = match &self.key_file {
            Some(path) => read_password(None, Some(path))?,
            None => read_password(Some(&self.key_env), None)?,
        }
        .unwrap_or_default();
        kausal_bus::signing::Signer::from_secret(key_id, &secret)
            .map(Some)
            .map_err(|e| ConfigError::Signing(e.to_string()))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum SourceConfig {
    Postgres(PostgresSource),
    /// MySQL 8 or MariaDB 10.5+ (`kind = "mysql"`), read from the binlog.
    Mysql(MysqlSource),
}

/// Default table an application writes transaction context to on MySQL / MariaDB (the
/// binlog has no `pg_logical_emit_message`): see docs/publisher.md.
pub const DEFAULT_CONTEXT_TABLE: &str = "kausal_context";

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlSource {
    /// `mysql://user@host:3306/db`: the database is the default for unqualified table
    /// names. A password may be in the URL, but prefer `password_env` / `password_file`.
    pub url: String,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Server id this publisher registers with as a replica: unique among the server's
    /// replicas. Default: derived from the namespace.
    #[serde(default)]
    pub server_id: Option<u32>,
    /// Table (`db.table` or `table`) whose inserted rows carry transaction context and
    /// read hints as JSON; never published. Default `kausal_context`.
    #[serde(default)]
    pub context_table: Option<String>,
}

impl std::fmt::Debug for MysqlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlSource")
            .field("url", &kausal_bus::amqp::redact_url(&self.url))
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("server_id", &self.server_id)
            .field("context_table", &self.context_table)
            .finish()
    }
}

impl MysqlSource {
    /// The password from `password_env` or `password_file`, if configured.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        read_password(self.password_env.as_deref(), self.password_file.as_deref())
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSource {
    /// `postgres://user@host:port/db`. A password may be in the URL, but prefer
    /// `password_env` / `password_file`.
    pub url: String,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Replication slot; default `kausal_<namespace>`.
    #[serde(default)]
    pub slot: Option<String>,
    /// Publication; default `kausal_<namespace>`.
    #[serde(default)]
    pub publication: Option<String>,
}

impl std::fmt::Debug for PostgresSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSource")
            .field("url", &kausal_bus::amqp::redact_url(&self.url))
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `amqp://user:password@host:5672/vhost`.
    pub url: String,
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Type of the bootstrap control queue `kausal.control.<namespace>` (and its
    /// dead-letter queue): `quorum` on a RabbitMQ cluster, so losing a node loses no
    /// request. Fixed when the queue is first declared.
    #[serde(default)]
    pub queue_type: kausal_bus::amqp::QueueType,
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("url", &kausal_bus::amqp::redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("queue_type", &self.queue_type)
            .finish()
    }
}

fn default_exchange() -> String {
    kausal_bus::amqp::DEFAULT_EXCHANGE.to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Checkpoint file; default `./kausal-<namespace>.checkpoint`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "default_checkpoint_interval")]
    pub interval_ms: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            path: None,
            interval_ms: DEFAULT_CHECKPOINT_INTERVAL_MS,
        }
    }
}

fn default_checkpoint_interval() -> u64 {
    DEFAULT_CHECKPOINT_INTERVAL_MS
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    /// Size of the hashed dependency key space (a power of two).
    pub key_space: u32,
    pub max_part_changes: usize,
    pub max_batch_envelopes: usize,
    pub max_batch_bytes: usize,
    pub max_in_flight: usize,
    /// Wire format major version written (1 or 2). 2 carries each table schema once
    /// per message; 1 is for subscribers built before format 2 (they refuse it).
    pub wire_format: u8,
    /// Bootstrap requests answered at once (each holds one source connection while
    /// it reads); more wait in the control queue, in order.
    pub bootstrap_requests: usize,
}

/// Two or three apps bootstrapping together is the common case (a new service and
/// its search index, say); each request costs a source connection.
pub const DEFAULT_BOOTSTRAP_REQUESTS: usize = 4;

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            key_space: DEFAULT_KEY_SPACE,
            max_part_changes: DEFAULT_MAX_PART_CHANGES,
            max_batch_envelopes: DEFAULT_MAX_BATCH_ENVELOPES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            wire_format: kausal_bus::envelope::FORMAT_MAJOR,
            bootstrap_requests: DEFAULT_BOOTSTRAP_REQUESTS,
        }
    }
}

/// One published table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Source table, `schema.table` or `table` (schema `public`).
    pub name: String,
    /// Name the outside world sees (default: the table name without schema).
    #[serde(rename = "as", default)]
    pub publish_as: Option<String>,
    /// Published columns; `"*"` publishes every column, including ones added later.
    pub columns: Vec<String>,
    /// Column renames for the outside world: source name → published name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// References for schemas without foreign key constraints: a row whose `columns`
    /// hold a key of `table` is ordered after that row.
    #[serde(default)]
    pub references: Vec<ReferenceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceConfig {
    pub columns: Vec<String>,
    /// Referenced source table (`schema.table` or `table`), keyed by its primary key.
    pub table: String,
}

impl TableConfig {
    /// `(schema, table)` of the source table.
    pub fn qualified(&self) -> (String, String) {
        split_name(&self.name)
    }

    pub fn published_name(&self) -> String {
        self.publish_as
            .clone()
            .unwrap_or_else(|| self.qualified().1)
    }

    /// Whether a source column is published.
    pub fn publishes(&self, column: &str) -> bool {
        self.columns.iter().any(|c| c == "*" || c == column)
    }

    pub fn published_column(&self, column: &str) -> String {
        self.rename
            .get(column)
            .cloned()
            .unwrap_or_else(|| column.to_string())
    }
}

pub fn split_name(name: &str) -> (String, String) {
    match name.split_once('.') {
        Some((s, t)) => (s.to_string(), t.to_string()),
        None => ("public".to_string(), name.to_string()),
    }
}

/// A configuration mistake, found before connecting to anything.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("signing: {0}")]
    Signing(String),
    #[error("namespace {0:?} is invalid: use letters, digits, '_' and '-' only")]
    BadNamespace(String),
    #[error("no tables to publish: add at least one [[table]] with a name and columns")]
    NoTables,
    #[error("table {0:?} is listed twice")]
    DuplicateTable(String),
    #[error("table {table:?} publishes no columns: list them in `columns` (or \"*\")")]
    NoColumns { table: String },
    #[error("tuning.key_space = {0} must be a power of two between 2^8 and 2^30")]
    BadKeySpace(u32),
    #[error("tuning.{name} must be at least 1")]
    ZeroTuning { name: &'static str },
    #[error(
        "tuning.wire_format = {0} is not a format this publisher writes: 2 (the default), or 1 \
         while subscribers built before format 2 read the namespace"
    )]
    BadWireFormat(u8),
    #[error("cannot read the password file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("environment variable {0} (source.password_env) is not set")]
    PasswordEnv(String),
}

impl PublisherConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ns_ok = !self.namespace.is_empty()
            && self
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ns_ok {
            return Err(ConfigError::BadNamespace(self.namespace.clone()));
        }
        if self.tables.is_empty() {
            return Err(ConfigError::NoTables);
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tables {
            if !seen.insert(t.qualified()) {
                return Err(ConfigError::DuplicateTable(t.name.clone()));
            }
            if t.columns.is_empty() {
                return Err(ConfigError::NoColumns {
                    table: t.name.clone(),
                });
            }
        }
        let ks = self.tuning.key_space;
        if !ks.is_power_of_two() || !(1 << 8..=1 << 30).contains(&ks) {
            return Err(ConfigError::BadKeySpace(ks));
        }
        if !(1..=kausal_bus::envelope::FORMAT_MAJOR).contains(&self.tuning.wire_format) {
            return Err(ConfigError::BadWireFormat(self.tuning.wire_format));
        }
        for (name, v) in [
            ("max_part_changes", self.tuning.max_part_changes),
            ("max_batch_envelopes", self.tuning.max_batch_envelopes),
            ("max_batch_bytes", self.tuning.max_batch_bytes),
            ("max_in_flight", self.tuning.max_in_flight),
            ("bootstrap_requests", self.tuning.bootstrap_requests),
        ] {
            if v == 0 {
                return Err(ConfigError::ZeroTuning { name });
            }
        }
        Ok(())
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.checkpoint
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("kausal-{}.checkpoint", self.namespace)))
    }
}

impl PostgresSource {
    /// The password from `password_env` or `password_file`, if configured.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        read_password(self.password_env.as_deref(), self.password_file.as_deref())
    }
}

fn read_password(
    env: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, ConfigError> {
    if let Some(var) = env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| ConfigError::PasswordEnv(var.to_string()));
    }
    if let Some(path) = file {
        return std::fs::read_to_string(path)
            .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_string()))
            .map_err(|source| ConfigError::PasswordFile {
                path: path.to_path_buf(),
                source,
            });
    }
    Ok(None)
}
