//! A Prometheus registry with Kausal's naming rules: every name starts with `kausal_`,
//! counters end in `_total` (added by the encoder), labels are few and bounded
//! (namespace, sink, reason class) — never keys, values or sequence numbers.

use prometheus_client::encoding::text::encode;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// A float gauge (seconds).
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// The registry of one process. Cheap to clone; metrics registered once at start.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            registry: Arc::new(Mutex::new(Registry::with_prefix("kausal"))),
        }
    }
}

impl Metrics {
    // The encoder ends every help text with a period: ours are trimmed of theirs.

    /// Registers a counter `kausal_<name>_total`.
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        let c = Counter::default();
        self.lock()
            .register(name, help.trim_end_matches('.'), c.clone());
        c
    }

    /// Registers an integer gauge `kausal_<name>`.
    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        let g = Gauge::default();
        self.lock()
            .register(name, help.trim_end_matches('.'), g.clone());
        g
    }

    /// Registers a float gauge `kausal_<name>` (seconds and rates).
    pub fn float_gauge(&self, name: &str, help: &str) -> FloatGauge {
        let g = FloatGauge::default();
        self.lock()
            .register(name, help.trim_end_matches('.'), g.clone());
        g
    }

    /// The text exposition format (what Prometheus scrapes).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.lock());
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock left a registry that is still usable.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_counters_the_total_suffix() {
        let m = Metrics::default();
        let c = m.counter("subscriber_transactions_applied", "Transactions applied.");
        let g = m.gauge("subscriber_transactions_waiting", "Transactions waiting.");
        c.inc_by(3);
        g.set(2);
        let text = m.encode();
        assert!(
            text.contains("kausal_subscriber_transactions_applied_total 3"),
            "{text}"
        );
        assert!(
            text.contains("kausal_subscriber_transactions_waiting 2"),
            "{text}"
        );
        assert!(
            text.contains("# HELP kausal_subscriber_transactions_waiting Transactions waiting.")
        );
    }
}
