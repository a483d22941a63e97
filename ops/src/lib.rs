//! `kausal-ops`: what operators see of a running publisher or subscriber.
//!
//! - [`metrics`]: the Prometheus registry each process fills (stable names, documented
//!   in `docs/operations.md`), encoded in the text exposition format.
//! - [`http`]: the endpoint serving `/metrics` and `/status` (JSON), and the client
//!   `kausal status` reads it with.

pub mod http;
pub mod metrics;

pub use http::{addresses, get, serve, Endpoint, HttpError};
pub use metrics::Metrics;

/// `[metrics]` of a publisher or subscriber configuration.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address the process serves `/metrics` and `/status` on (`"127.0.0.1:9464"`;
    /// `"0.0.0.0:9464"` for a scraper on another host). Several processes on one host
    /// with one configuration: a range (`"127.0.0.1:9464-9471"`, each takes the first
    /// free port) or port 0 (any free port); the port taken is logged and shown by
    /// `kausal status`. Default: no endpoint (the subscriber's status still reaches
    /// `kausal status` through its store).
    pub listen: Option<String>,
}
