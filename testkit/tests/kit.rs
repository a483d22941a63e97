//! The test kit builds a publisher's envelopes from a contract, and the real subscriber
//! applies them in-process (SQLite store, callbacks), no broker.

use kausal_bus::contract::{Contract, ContractColumn, ContractReference, ContractTable};
use kausal_bus::{DepKind, Op};
use kausal_subscriber::{Event, SubscriberConfig};
use kausal_testkit::{KitError, TestKit};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn column(name: &str, type_name: &str) -> ContractColumn {
    ContractColumn {
        name: name.into(),
        type_name: type_name.into(),
    }
}

/// What `kausal contract export` writes for a shop with users and their messages.
fn contract() -> Contract {
    let text = serde_json::json!({
        "kausal_contract": 1,
        "namespace": "shop",
        "source": "postgres",
        "tables": [],
    })
    .to_string();
    let mut c = Contract::parse(&text).expect("a contract");
    c.tables = vec![
        ContractTable {
            name: "users".into(),
            key: vec!["id".into()],
            columns: vec![
                column("id", "int8"),
                column("name", "text"),
                column("active", "bool"),
                column("tags", "_text"),
            ],
            all_columns: true,
            references: Vec::new(),
        },
        ContractTable {
            name: "messages".into(),
            key: vec!["id".into()],
            columns: vec![
                column("id", "int8"),
                column("user_id", "int8"),
                column("body", "text"),
                column("meta", "jsonb"),
            ],
            all_columns: true,
            references: vec![ContractReference {
                columns: vec!["user_id".into()],
                table: "users".into(),
            }],
        },
    ];
    c
}

fn store(name: &str) -> String {
    let dir = std::env::temp_dir().join("kausal-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("kit-{name}-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    format!("sqlite://{}", path.display())
}

#[test]
fn envelopes_carry_the_dependencies_and_values_a_publisher_would_send() {
    let mut kit = TestKit::new(&contract());
    let user = kit
        .insert(
            "users",
            json!({"id": 1, "name": "Ada", "active": true, "tags": ["a", "b c"]}),
        )
        .unwrap();
    let message = kit
        .insert(
            "messages",
            json!({"id": 10, "user_id": 1, "body": "hi", "meta": {"lang": "en"}}),
        )
        .unwrap();
    assert_eq!((user.seq, message.seq), (1, 2));
    assert_eq!(user.namespace, "shop");
    let row = user.changes[0].new.as_ref().unwrap();
    assert_eq!(row["active"], json!(true));
    assert_eq!(row["tags"], json!(["a", "b c"]));
    assert_eq!(
        message.changes[0].new.as_ref().unwrap()["meta"],
        json!({"lang": "en"})
    );
    // The message reads the user's row (its reference), at the user's write.
    let user_row = user
        .deps
        .iter()
        .find(|d| d.kind == DepKind::Write && d.after == 0)
        .expect("the user's row is written");
    let read = message
        .deps
        .iter()
        .find(|d| d.k == user_row.k)
        .expect("the message depends on its user's row");
    assert_eq!(read.kind, DepKind::Read);
    assert_eq!(read.after, 1, "it waits for the user's transaction");

    // An update of some columns carries the whole row, as Postgres logs it.
    let rename = kit
        .update("users", json!({"id": 1, "name": "Ada L."}))
        .unwrap();
    let row = rename.changes[0].new.as_ref().unwrap();
    assert_eq!(row["name"], json!("Ada L."));
    assert_eq!(row["active"], json!(true));
    let gone = kit.delete("messages", json!({"id": 10})).unwrap();
    assert_eq!(gone.changes[0].op, Op::Delete);
    assert!(gone.deps.iter().any(|d| d.after == 2), "{:?}", gone.deps);
}

#[test]
fn rows_that_do_not_fit_the_contract_are_named() {
    let mut kit = TestKit::new(&contract());
    let err = kit.insert("orders", json!({"id": 1})).unwrap_err();
    assert!(matches!(err, KitError::UnknownTable { .. }));
    assert!(err.to_string().contains("messages, users"), "{err}");
    let err = kit
        .insert("users", json!({"id": 1, "nick": "x"}))
        .unwrap_err();
    assert!(err.to_string().contains("no column `nick`"), "{err}");
    let err = kit.insert("users", json!({"name": "no key"})).unwrap_err();
    assert!(
        err.to_string().contains("key column `id` is missing"),
        "{err}"
    );
    let err = kit
        .insert("users", json!({"id": 1, "tags": "not a list"}))
        .unwrap_err();
    assert!(err.to_string().contains("column `tags`"), "{err}");
    // A failed transaction used no sequence number.
    assert_eq!(kit.insert("users", json!({"id": 1})).unwrap().seq, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_real_subscriber_applies_kit_envelopes_in_causal_order() {
    let mut kit = TestKit::new(&contract());
    let url = store("causal");
    let cfg = SubscriberConfig::new("kit", "amqp://not-used", &url)
        .subscribe("shop", "users", &[])
        .subscribe("shop", "messages", &[]);
    let mut subscriber = kit.subscriber(cfg);
    let log = Arc::new(Mutex::new(Vec::new()));
    for table in ["users", "messages"] {
        let log = log.clone();
        subscriber
            .callbacks()
            .on_change(table, move |e: Event<Value>| {
                let log = log.clone();
                async move {
                    log.lock()
                        .unwrap()
                        .push(format!("{}:{:?}:{}", e.table, e.op, e.key["id"]));
                    Ok(())
                }
            });
    }
    let worker = kit.start(subscriber);

    let user = kit
        .insert("users", json!({"id": 1, "name": "Ada"}))
        .unwrap();
    let message = kit
        .tx()
        .session("s1")
        .user("ada")
        .insert("messages", json!({"id": 10, "user_id": 1, "body": "hi"}))
        .commit()
        .unwrap();
    // The child arrives first: the gate holds it until its parent is applied.
    kit.send(&[message]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
    kit.send(&[user]);
    kit.settle(Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        ["users:Insert:1", "messages:Insert:10"]
    );

    let delete = kit.delete("users", json!({"id": 1})).unwrap();
    kit.send(&[delete]);
    kit.settle(Duration::from_secs(20)).await.unwrap();
    worker.stop().await.unwrap();

    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&pool)
        .await
        .unwrap();
    let bodies: Vec<String> = sqlx::query_scalar("SELECT body FROM messages")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!((users, bodies), (0, vec!["hi".to_string()]));
}

#[tokio::test(flavor = "multi_thread")]
async fn settle_reports_what_the_subscriber_dead_lettered() {
    let mut kit = TestKit::new(&contract());
    let cfg = SubscriberConfig::new("kitdead", "amqp://not-used", &store("dead")).subscribe(
        "shop",
        "users",
        &["name", "nickname"],
    );
    let worker = kit.start(kit.subscriber(cfg));
    let user = kit
        .insert("users", json!({"id": 1, "name": "Ada"}))
        .unwrap();
    kit.send(&[user]);
    let err = kit.settle(Duration::from_secs(20)).await.unwrap_err();
    assert!(err.to_string().contains("nickname"), "{err}");
    worker.stop().await.unwrap();
}

/// A production config that verifies signatures works with the kit unchanged: its
/// envelopes never cross a broker, and nothing is dead-lettered as unsigned.
#[tokio::test(flavor = "multi_thread")]
async fn a_config_that_requires_signatures_applies_kit_envelopes() {
    let mut kit = TestKit::new(&contract());
    let mut cfg = SubscriberConfig::new("kitsigned", "amqp://not-used", &store("signed"))
        .subscribe("shop", "users", &["name"]);
    let (_secret, public) = kausal_bus::signing::generate();
    cfg.signing.keys.insert("prod".into(), public);
    let worker = kit.start(kit.subscriber(cfg));
    let user = kit
        .insert("users", json!({"id": 1, "name": "Ada"}))
        .unwrap();
    kit.send(&[user]);
    kit.settle(Duration::from_secs(20)).await.unwrap();
    worker.stop().await.unwrap();
}
