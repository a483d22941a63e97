//! What a subscriber app follows, where it puts it, and how it orders it.

pub use crate::error::ConfigError;
pub use crate::sink::redis::RedisSinkConfig;
pub use crate::sink::SinkConfig;
pub use crate::table::{is_identifier, TableMode};
use kausal_bus::deps::DEFAULT_KEY_SPACE;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Messages RabbitMQ hands a worker before it acks any: the window in which it looks for
/// transactions it can apply while others wait, and so the bound of a group's size. A
/// publisher that follows a live load sends one or two transactions per message; with
/// 64 the groups of a backlog averaged 34 transactions and the store commit dominated
/// (BENCHMARKS.md, "Set-based apply"). Bounded by the publisher's batch size: at most
/// 256 × 512 KiB of message bodies held.
pub const DEFAULT_PREFETCH: u16 = 256;
/// Independent transactions applied in one sink transaction: one commit (one fsync) for
/// many small source transactions. Never splits one.
pub const DEFAULT_MAX_GROUP: usize = 256;
/// Sink transactions in flight at once. SQLite has one writer, so 1 is its best; a
/// server database gains from a few.
pub const DEFAULT_APPLIERS: usize = 1;
/// A transaction waiting longer than this for a dependency is reported with what it
/// waits for (log line and metric), and again at this interval while it waits.
pub const DEFAULT_REPORT_WAIT_MS: u64 = 10_000;
/// See `OrderingConfig::max_seq_ahead`. A worker holds at most `prefetch` messages of
/// up to 128 envelopes, so legitimate transactions arrive a few thousand numbers
/// ahead at most; a million leaves room for long outages of other workers.
pub const DEFAULT_MAX_SEQ_AHEAD: u64 = 1_000_000;
/// Partition queues of an app with Redis coordination, unless configured: room for
/// eight worker processes.
pub const DEFAULT_REDIS_PARTITIONS: u32 = 8;
/// Attempts of a failing callback before its transaction is dead-lettered.
pub const DEFAULT_CALLBACK_ATTEMPTS: u32 = 5;
/// First retry delay of a failing callback or store; doubles per attempt.
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 100;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberConfig {
    /// Names this subscriber app: its durable queue is `kausal.<app>`, its Redis keys and
    /// bookkeeping are per app. Every worker process of the app uses the same name.
    pub app: String,
    pub broker: BrokerConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub coordination: Coordination,
    #[serde(default)]
    pub ordering: OrderingConfig,
    #[serde(default)]
    pub callbacks: CallbackConfig,
    /// Subscribed tables.
    #[serde(rename = "table", default)]
    pub tables: Vec<TableSubscription>,
    /// Read models beside the store (`[[sink]]`), written inside its transactions.
    #[serde(rename = "sink", default)]
    pub sinks: Vec<SinkConfig>,
    /// Where the secret salt of `hash` masks comes from.
    #[serde(default)]
    pub masking: MaskingConfig,
    /// The `/metrics` and `/status` endpoint.
    #[serde(default)]
    pub metrics: kausal_ops::MetricsConfig,
    /// Accept only messages signed by these keys.
    #[serde(default)]
    pub signing: SigningConfig,
}

/// `[signing]`: the publishers' public keys (`kausal keygen` prints them), by key id.
/// When any is listed, only messages signed with one of them are accepted; anything
/// else is dead-lettered with the reason.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    pub keys: BTreeMap<String, String>,
}

/// The secret salt of `hash` masks (see `crate::mask`): from a file, else from an
/// environment variable — never from the configuration file itself, which gets shared.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskingConfig {
    /// Environment variable holding the salt; default `KAUSAL_MASK_SALT`.
    pub salt_env: String,
    /// File holding the salt (trailing newline ignored); wins over `salt_env`.
    pub salt_file: Option<std::path::PathBuf>,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        MaskingConfig {
            salt_env: "KAUSAL_MASK_SALT".into(),
            salt_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub url: String,
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Queue name; default `kausal.<app>`.
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Partition queues of the app (1 to 64): the publisher spreads independent
    /// transactions over them and keeps dependent ones together, and each worker
    /// process consumes a share, so chains are applied within one process. Default: 8
    /// with Redis coordination, 1 (one queue) with in-process coordination.
    #[serde(default)]
    pub partitions: Option<u32>,
    /// The broker deletes the queue after it had no consumer this long (`"7d"`, `"12h"`,
    /// `"90m"`; at most 49 days): a laptop subscriber's queue keeps what was published
    /// while the laptop slept, and a forgotten one does not fill the broker forever.
    /// Default: never.
    #[serde(default)]
    pub queue_expires: Option<String>,
    /// `classic` (the default) or `quorum`: the app's queues and their dead-letter queue
    /// replicated over a RabbitMQ cluster's nodes (RabbitMQ 3.8+), so losing the node
    /// that holds a queue loses nothing. Chosen when a queue is first declared: RabbitMQ
    /// cannot change the type of an existing queue.
    #[serde(default)]
    pub queue_type: QueueType,
}

pub use kausal_bus::amqp::QueueType;

impl BrokerConfig {
    /// `queue_expires` in milliseconds.
    pub fn queue_expires_ms(&self) -> Result<Option<u32>, ConfigError> {
        let Some(text) = &self.queue_expires else {
            return Ok(None);
        };
        let bad = || ConfigError::QueueExpires {
            given: text.clone(),
        };
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = t[..split].parse().map_err(|_| bad())?;
        let unit_ms: u64 = match t[split..].trim() {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
        if ms == 0 {
            return Err(bad());
        }
        u32::try_from(ms).map(Some).map_err(|_| bad())
    }
}

fn default_exchange() -> String {
    kausal_bus::amqp::DEFAULT_EXCHANGE.to_string()
}
fn default_prefetch() -> u16 {
    DEFAULT_PREFETCH
}

/// The SQL database the subscriber writes its read model to. It also holds Kausal's
/// bookkeeping (which transactions were applied), written in the same transaction as the
/// rows, which is what makes redelivery harmless.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://path.db`, `postgres://…`, or `mysql://…`.
    pub url: String,
    #[serde(default = "default_max_group")]
    pub max_group: usize,
    #[serde(default = "default_appliers")]
    pub appliers: usize,
}

fn default_max_group() -> usize {
    DEFAULT_MAX_GROUP
}
fn default_appliers() -> usize {
    DEFAULT_APPLIERS
}

/// Where workers keep dependency counters and wake each other.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum Coordination {
    /// One worker process (the default): counters in memory, no Redis.
    #[default]
    Memory,
    /// Several worker processes share the queue; counters and wake-ups in Redis.
    Redis {
        url: String,
        /// Key prefix; keys are `<prefix>:<app>:…`.
        #[serde(default = "default_prefix")]
        prefix: String,
    },
}

fn default_prefix() -> String {
    "kausal".to_string()
}

/// How strictly transactions are ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A transaction waits for every transaction it may depend on (rows it reads or
    /// writes, foreign keys, sessions, hints); independent ones run in parallel.
    #[default]
    Causal,
    /// Only per-key order: writes of a row (or session) in order, truncates before later
    /// changes of their table; foreign keys and read hints are not waited for.
    Key,
    /// Exact commit order, one transaction after the other.
    Serial,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrderingConfig {
    pub mode: Mode,
    /// The publisher's `tuning.key_space`; `key` mode needs it to recognise table keys.
    pub key_space: u32,
    pub report_wait_ms: u64,
    /// A transaction numbered more than this above the highest one this worker applied
    /// of its stream is dead-lettered as implausible: the queue delivers in publish
    /// order, so such a number is a forged or corrupt envelope, which would otherwise
    /// make the real transaction of that number look like a duplicate when it comes.
    pub max_seq_ahead: u64,
}

impl Default for OrderingConfig {
    fn default() -> Self {
        OrderingConfig {
            mode: Mode::Causal,
            key_space: DEFAULT_KEY_SPACE,
            report_wait_ms: DEFAULT_REPORT_WAIT_MS,
            max_seq_ahead: DEFAULT_MAX_SEQ_AHEAD,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    pub attempts: u32,
    pub backoff_ms: u64,
    /// Chain dependent transactions into one store transaction also when callbacks are
    /// registered (in-process coordination). Only for callbacks that read the store
    /// through `Event::store`, or not at all: through a connection of their own they
    /// would not see the rows of the transactions chained before theirs.
    pub chain: bool,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            attempts: DEFAULT_CALLBACK_ATTEMPTS,
            backoff_ms: DEFAULT_RETRY_BACKOFF_MS,
            chain: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSubscription {
    /// The publisher's namespace.
    pub namespace: String,
    /// Published table name.
    pub name: String,
    /// Destination table; default the published name.
    #[serde(default)]
    pub into: Option<String>,
    /// Subscribed columns (published names); default all. Key columns are always kept.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Published name → name in the store and in callbacks.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    #[serde(default)]
    pub mode: TableMode,
    /// Published column name → mask applied before anything is written locally
    /// (`hash`, `redact`, `keep`).
    #[serde(default)]
    pub mask: BTreeMap<String, crate::mask::Mask>,
}

/// Building a configuration in code, the Rust API's counterpart of the TOML file:
///
/// ```
/// use kausal_subscriber::SubscriberConfig;
/// let cfg = SubscriberConfig::new("mailer", "amqp://guest:guest@127.0.0.1:5672/%2f", "sqlite://mailer.db")
///     .subscribe("demo", "users", &["name", "email"])
///     .subscribe("demo", "messages", &[])
///     .rename("text", "body");
/// assert!(cfg.validate().is_ok());
/// ```
impl SubscriberConfig {
    /// An app with a broker and a store, subscribed to nothing yet; defaults otherwise.
    pub fn new(app: &str, broker_url: &str, store_url: &str) -> Self {
        SubscriberConfig {
            app: app.to_string(),
            broker: BrokerConfig {
                url: broker_url.to_string(),
                exchange: default_exchange(),
                queue: None,
                prefetch: DEFAULT_PREFETCH,
                partitions: None,
                queue_expires: None,
                queue_type: QueueType::Classic,
            },
            store: StoreConfig {
                url: store_url.to_string(),
                max_group: DEFAULT_MAX_GROUP,
                appliers: DEFAULT_APPLIERS,
            },
            coordination: Coordination::Memory,
            ordering: OrderingConfig::default(),
            callbacks: CallbackConfig::default(),
            tables: Vec::new(),
            sinks: Vec::new(),
            masking: MaskingConfig::default(),
            metrics: kausal_ops::MetricsConfig::default(),
            signing: SigningConfig::default(),
        }
    }

    /// Masks a column of the table subscribed last (published name).
    pub fn mask(mut self, column: &str, mask: crate::mask::Mask) -> Self {
        if let Some(t) = self.tables.last_mut() {
            t.mask.insert(column.to_string(), mask);
        }
        self
    }

    /// The salt of `hash` masks: `None` when no column is hashed; an error naming the
    /// fix when one is and no usable salt is configured.
    pub fn mask_salt(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let hashed = self.tables.iter().find_map(|t| {
            t.mask
                .iter()
                .find(|(_, m)| **m == crate::mask::Mask::Hash)
                .map(|(c, _)| format!("{}.{} column `{c}`", t.namespace, t.name))
        });
        let Some(what) = hashed else { return Ok(None) };
        let min = crate::mask::MIN_SALT_LEN;
        let salt = match &self.masking.salt_file {
            Some(path) => std::fs::read(path)
                .map_err(|e| {
                    ConfigError::MaskSalt(format!(
                        "{what} is masked with hash, but masking.salt_file {} cannot be read \
                         ({e})",
                        path.display()
                    ))
                })?
                .trim_ascii_end()
                .to_vec(),
            None => std::env::var(&self.masking.salt_env)
                .map(String::into_bytes)
                .map_err(|_| {
                    ConfigError::MaskSalt(format!(
                        "{what} is masked with hash, which needs a secret salt: set {} (at \
                         least {min} characters, the same for every worker, kept secret) or \
                         masking.salt_file",
                        self.masking.salt_env
                    ))
                })?,
        };
        if salt.len() < min {
            return Err(ConfigError::MaskSalt(format!(
                "the salt of hash masks is {} bytes long; use at least {min} (a short salt \
                 can be guessed together with the values)",
                salt.len()
            )));
        }
        Ok(Some(salt))
    }

    /// Adds a sink beside the store.
    pub fn sink(mut self, sink: SinkConfig) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Subscribes a published table, with these columns (published names; empty: all).
    /// The key columns always come along.
    pub fn subscribe(mut self, namespace: &str, table: &str, columns: &[&str]) -> Self {
        self.tables.push(TableSubscription {
            namespace: namespace.to_string(),
            name: table.to_string(),
            into: None,
            columns: (!columns.is_empty()).then(|| columns.iter().map(|c| c.to_string()).collect()),
            rename: BTreeMap::new(),
            mode: TableMode::Mirror,
            mask: BTreeMap::new(),
        });
        self
    }

    /// Renames a column of the table subscribed last.
    pub fn rename(mut self, column: &str, to: &str) -> Self {
        if let Some(t) = self.tables.last_mut() {
            t.rename.insert(column.to_string(), to.to_string());
        }
        self
    }

    /// Stores the table subscribed last under another name, and how.
    pub fn into_table(mut self, table: &str, mode: TableMode) -> Self {
        if let Some(t) = self.tables.last_mut() {
            t.into = Some(table.to_string());
            t.mode = mode;
        }
        self
    }

    /// Several worker processes sharing the queue, coordinated through Redis.
    pub fn redis(mut self, url: &str) -> Self {
        self.coordination = Coordination::Redis {
            url: url.to_string(),
            prefix: default_prefix(),
        };
        self
    }

    pub fn mode(mut self, mode: Mode) -> Self {
        self.ordering.mode = mode;
        self
    }

    /// The number of partition queues (see [`BrokerConfig::partitions`]).
    pub fn partitions(&self) -> u32 {
        match (self.broker.partitions, &self.coordination) {
            (Some(p), _) => p,
            (None, Coordination::Redis { .. }) => DEFAULT_REDIS_PARTITIONS,
            (None, Coordination::Memory) => 1,
        }
    }

    pub fn queue(&self) -> String {
        self.broker
            .queue
            .clone()
            .unwrap_or_else(|| format!("kausal.{}", self.app))
    }

    /// Namespaces to bind the queue to.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tables.iter().map(|t| t.namespace.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        kausal_bus::signing::Verifier::new(&self.signing.keys)?;
        if self.app.is_empty()
            || !self
                .app
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::App {
                app: self.app.clone(),
            });
        }
        if self.tables.is_empty() {
            return Err(ConfigError::NoTables);
        }
        if !self.ordering.key_space.is_power_of_two() {
            return Err(ConfigError::KeySpace);
        }
        if let Some(p) = self.broker.partitions {
            if p == 0 || p > kausal_bus::amqp::SLOTS {
                return Err(ConfigError::Partitions {
                    given: p,
                    slots: kausal_bus::amqp::SLOTS,
                });
            }
        }
        if self.store.max_group == 0 || self.store.appliers == 0 || self.broker.prefetch == 0 {
            return Err(ConfigError::Zero);
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.tables {
            let table = format!("{}.{}", t.namespace, t.name);
            if !seen.insert((t.namespace.clone(), t.name.clone())) {
                return Err(ConfigError::SubscribedTwice { table });
            }
            let into = t.into.as_deref().unwrap_or(&t.name);
            if !is_identifier(into) {
                return Err(ConfigError::Destination {
                    table,
                    name: into.to_string(),
                });
            }
            if let Some(dest) = t.rename.values().find(|d| !is_identifier(d)) {
                return Err(ConfigError::Column {
                    table,
                    name: dest.clone(),
                });
            }
        }
        self.broker.queue_expires_ms()?;
        self.mask_salt()?;
        Ok(())
    }
}
