//! Loading either configuration for the commands that take both (`status`, `doctor`).

use anyhow::Context as _;
use kausal::publisher::PublisherConfig;
use kausal::subscriber::SubscriberConfig;
use std::path::Path;

pub enum Loaded {
    Publisher(Box<PublisherConfig>),
    Subscriber(Box<SubscriberConfig>),
}

pub fn publisher(path: &Path) -> anyhow::Result<PublisherConfig> {
    kausal::config::load(
        path,
        std::env::vars(),
        kausal::config::PUBLISHER_SECTIONS,
        kausal::config::PUBLISHER_KEYS,
    )
    .with_context(|| format!("loading {}", path.display()))
}

pub fn subscriber(path: &Path) -> anyhow::Result<SubscriberConfig> {
    kausal::config::load(
        path,
        std::env::vars(),
        kausal::config::SUBSCRIBER_SECTIONS,
        kausal::config::SUBSCRIBER_KEYS,
    )
    .with_context(|| format!("loading {}", path.display()))
}

/// A publisher configuration has `[source]`, a subscriber's has `app`.
pub fn either(path: &Path) -> anyhow::Result<Loaded> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // Syntax errors are reported by the typed load below, with the line.
    let table: toml::Table = text.parse().unwrap_or_default();
    if table.contains_key("source") {
        Ok(Loaded::Publisher(Box::new(publisher(path)?)))
    } else if table.contains_key("app") || std::env::var("KAUSAL_APP").is_ok() {
        Ok(Loaded::Subscriber(Box::new(subscriber(path)?)))
    } else {
        anyhow::bail!(
            "{}: neither a publisher configuration (it has a [source] section) nor a \
             subscriber's (it has `app = \"…\"`)",
            path.display()
        )
    }
}
