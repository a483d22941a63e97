//! `kausal-ops`: what operators see of a running publisher or subscriber.
//!
//! - [`metrics`]: the Prometheus registry each process fills (stable names, documented
//!   in `docs/operations.md`), encoded in the text exposition format.
//! - [`http`]: the endpoint serving `/metrics` and `/status` (JSON), and the client
//!   `kausal status` reads it with.

pub mod http;
pub mod metrics;

pub use http::{get, serve, Endpoint, HttpError};
pub use metrics::Metrics;

/// `[metrics]` of a publisher or subscriber configuration.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address the process serves `/metrics` and `/status` on (`"127.0.0.1:9464"`;
    /// `"0.0.0.0:9464"` for a scraper on another host). Default: no endpoint (the
    /// subscriber's status still reaches `kausal status` through its store).
    pub listen: Option<String>,
}
