//! Configuration loading: a TOML file, then `KAUSAL_*` environment variables on top.
//!
//! `KAUSAL_BROKER_URL=amqp://…` sets `broker.url`; `KAUSAL_SOURCE_URL` sets `source.url`;
//! `KAUSAL_NAMESPACE` sets `namespace`; `KAUSAL_TUNING_MAX_IN_FLIGHT` sets
//! `tuning.max_in_flight`. The first `_`-separated word names the section when a section
//! of that name exists (in the file or among the known sections), the rest is the key.
//! Values are read as TOML scalars (`10`, `true`) and fall back to plain strings.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Sections and top-level keys of the publisher config that environment variables may
/// set. Other `KAUSAL_*` variables (e.g. `KAUSAL_DEMO_POSTGRES`) belong to other commands
/// and are ignored here.
pub const PUBLISHER_SECTIONS: &[&str] = &[
    "source",
    "broker",
    "checkpoint",
    "tuning",
    "metrics",
    "signing",
];
pub const PUBLISHER_KEYS: &[&str] = &["namespace"];
/// The same for the subscriber config (`KAUSAL_STORE_URL`, `KAUSAL_COORDINATION_URL`,
/// `KAUSAL_ORDERING_MODE`, `KAUSAL_APP`, …).
pub const SUBSCRIBER_SECTIONS: &[&str] = &[
    "broker",
    "store",
    "coordination",
    "ordering",
    "callbacks",
    "masking",
    "metrics",
    "signing",
];
pub const SUBSCRIBER_KEYS: &[&str] = &["app"];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Loads `path` with environment overrides from `vars` (normally `std::env::vars()`).
pub fn load<T: DeserializeOwned>(
    path: &Path,
    vars: impl IntoIterator<Item = (String, String)>,
    sections: &[&str],
    keys: &[&str],
) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut value: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| LoadError::Invalid {
            path: path.to_path_buf(),
            // The message names line and column; the offending text is left out because
            // the line may hold a password.
            message: e.message().to_string() + &location(&text, e.span()),
        })?;
    // Which variable set which key, to name it when the value is refused.
    let mut from_env: Vec<(String, String, String)> = Vec::new();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix("KAUSAL_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let target = match rest.split_once('_') {
            _ if keys.contains(&rest.as_str()) => Some((&mut value, rest.clone())),
            Some((section, key)) if sections.contains(&section) => value
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .map(|t| (t, key.to_string())),
            _ => None,
        };
        if let Some((table, key)) = target {
            let shown = match rest.split_once('_') {
                Some((section, k)) if !keys.contains(&rest.as_str()) => format!("{section}.{k}"),
                _ => rest.clone(),
            };
            from_env.push((name.clone(), shown, key.clone()));
            table.insert(key, scalar(&raw));
        }
    }
    T::deserialize(toml::Value::Table(value)).map_err(|e| LoadError::Invalid {
        path: path.to_path_buf(),
        message: blame_env(e.message(), &from_env),
    })
}

/// The deserializer's message, with the environment variable named when the refused
/// field came from one (a variable meant for another command, e.g. the subscriber's
/// `KAUSAL_BROKER_PREFETCH` in a shared environment), and the variables applied listed
/// otherwise: the file alone may be fine.
fn blame_env(message: &str, from_env: &[(String, String, String)]) -> String {
    if let Some((var, shown, _)) = from_env
        .iter()
        .find(|(_, _, key)| message.contains(&format!("unknown field `{key}`")))
    {
        return format!(
            "{message}; `{shown}` comes from the environment variable {var}, not from the \
             file: this command has no such setting, unset {var} for it"
        );
    }
    if from_env.is_empty() {
        return message.to_string();
    }
    let vars: Vec<String> = from_env
        .iter()
        .map(|(var, shown, _)| format!("{var} → {shown}"))
        .collect();
    format!("{message} (set from the environment: {})", vars.join(", "))
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

fn scalar(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) if !matches!(t.get("v"), Some(toml::Value::Table(_))) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        _ => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kausal_publisher::PublisherConfig;

    const FILE: &str = r#"
namespace = "shop"
[source]
kind = "postgres"
url = "postgres://postgres@127.0.0.1/shop"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[[table]]
name = "users"
columns = ["id", "name"]
"#;

    /// A file of its own per call: tests run in parallel, and one rewriting the file
    /// another reads makes it read a truncated file.
    fn write(text: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("kausal-config-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_example_configurations_load_and_validate() {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        for name in ["publisher.toml", "publisher-mysql.toml"] {
            let cfg: PublisherConfig =
                load(&examples.join(name), [], PUBLISHER_SECTIONS, PUBLISHER_KEYS)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for name in ["subscriber.toml", "observer.toml"] {
            let _: kausal_subscriber::SubscriberConfig = load(
                &examples.join(name),
                [],
                SUBSCRIBER_SECTIONS,
                SUBSCRIBER_KEYS,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let path = write(FILE);
        let cfg: PublisherConfig = load(
            &path,
            [
                ("KAUSAL_BROKER_URL".to_string(), "amqp://other".to_string()),
                ("KAUSAL_TUNING_MAX_IN_FLIGHT".to_string(), "7".to_string()),
                ("KAUSAL_NAMESPACE".to_string(), "shop2".to_string()),
                (
                    "KAUSAL_DEMO_POSTGRES".to_string(),
                    "postgres://x".to_string(),
                ),
                ("UNRELATED".to_string(), "x".to_string()),
            ],
            PUBLISHER_SECTIONS,
            PUBLISHER_KEYS,
        )
        .unwrap();
        assert_eq!(cfg.broker.url, "amqp://other");
        assert_eq!(cfg.tuning.max_in_flight, 7);
        assert_eq!(cfg.namespace, "shop2");
        assert_eq!(cfg.tables[0].name, "users");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let path = write(&format!("{FILE}\n[checkpoint]\nintervall_ms = 5\n"));
        let err = load::<PublisherConfig>(&path, [], PUBLISHER_SECTIONS, PUBLISHER_KEYS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("intervall_ms"), "{err}");
    }

    #[test]
    fn a_variable_meant_for_another_command_is_named_as_the_source() {
        // One environment for both processes: the subscriber's prefetch reaches the
        // publisher, whose file is fine.
        let path = write(FILE);
        let err = load::<PublisherConfig>(
            &path,
            [("KAUSAL_BROKER_PREFETCH".to_string(), "512".to_string())],
            PUBLISHER_SECTIONS,
            PUBLISHER_KEYS,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `prefetch`"), "{err}");
        assert!(
            err.contains("environment variable KAUSAL_BROKER_PREFETCH"),
            "{err}"
        );
        assert!(err.contains("`broker.prefetch`"), "{err}");
        // A value of the wrong type from the environment: the variables are listed.
        let err = load::<PublisherConfig>(
            &path,
            [(
                "KAUSAL_TUNING_MAX_IN_FLIGHT".to_string(),
                "many".to_string(),
            )],
            PUBLISHER_SECTIONS,
            PUBLISHER_KEYS,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("KAUSAL_TUNING_MAX_IN_FLIGHT → tuning.max_in_flight"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line_but_not_its_text() {
        let path = write("namespace = \"a\"\n[broker]\nurl = \"amqp://u:hunter2@x\n");
        let err = load::<PublisherConfig>(&path, [], PUBLISHER_SECTIONS, PUBLISHER_KEYS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
