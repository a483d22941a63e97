//! How a subscribing team tests its app with the kit: a "welcome mail" callback, fed
//! with envelopes built from the publisher's contract, run by the real subscriber with
//! a SQLite store — no broker, publisher or source database.
//!
//! `cargo run -p kausal-testkit --example welcome_mail [shop.contract.json]` (without a
//! file it uses a contract written out below, as `kausal contract export` would).

use kausal_subscriber::{Event, SubscriberConfig};
use kausal_testkit::TestKit;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CONTRACT: &str = r#"{
  "kausal_contract": 1, "namespace": "shop", "source": "postgres",
  "tables": [
    {"name": "users", "key": ["id"], "all_columns": true, "references": [],
     "columns": [{"name": "id", "type": "int8"}, {"name": "email", "type": "text"}]}
  ]
}"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut kit = match std::env::args().nth(1) {
        Some(path) => TestKit::from_file(path)?,
        None => TestKit::new(&kausal_bus::contract::Contract::parse(CONTRACT)?),
    };
    let store = std::env::temp_dir().join("welcome-mail-example.db");
    let _ = std::fs::remove_file(&store);
    let cfg = SubscriberConfig::new(
        "mailer",
        "amqp://unused",
        &format!("sqlite://{}", store.display()),
    )
    .subscribe(kit.namespace(), "users", &["email"]);

    // The app under test: one mail per new user.
    let outbox = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut subscriber = kit.subscriber(cfg);
    let sent = outbox.clone();
    subscriber
        .callbacks()
        .on_insert("users", move |e: Event<Value>| {
            let sent = sent.clone();
            async move {
                let email = e
                    .new
                    .as_ref()
                    .and_then(|r| r["email"].as_str())
                    .unwrap_or("?");
                sent.lock()
                    .unwrap()
                    .push(format!("welcome mail to {email}"));
                Ok(())
            }
        });
    let worker = kit.start(subscriber);

    let ada = kit.insert("users", json!({"id": 1, "email": "ada@example.com"}))?;
    let bob = kit.insert("users", json!({"id": 2, "email": "bob@example.com"}))?;
    let change = kit.update("users", json!({"id": 1, "email": "ada@lovelace.org"}))?;
    // Redelivered and out of order, as a broker may: still one mail per user.
    kit.send(&[change, bob.clone()]);
    kit.send(&[ada, bob]);
    kit.settle(Duration::from_secs(10)).await?;
    worker.stop().await?;

    let outbox = outbox.lock().unwrap();
    for mail in outbox.iter() {
        println!("{mail}");
    }
    assert_eq!(outbox.len(), 2, "one welcome mail per user");
    Ok(())
}
