//! Postgres → publisher → RabbitMQ → subscriber → MongoDB (feature `mongo`): the
//! parent/child workload with sessions, updates and deletes; the collections must end
//! equal to the source, and a reader polling them meanwhile must never see a message
//! before its user (and, on a replica set, never a message without its user). Runs against nx-27017 (scripts/setup.sh), or a real MongoDB
//! when `KAUSAL_TEST_MONGO_URL` is set (`docker compose --profile mongo up`).
#![cfg(feature = "mongo")]

mod common;

use common::e2e::*;
use common::sub::*;
use common::*;
use futures_util::TryStreamExt;
use kausal_subscriber::sink::mongo::mongodb;
use mongodb::bson::{doc, Bson, Document};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn mongo_url() -> String {
    std::env::var("KAUSAL_TEST_MONGO_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into())
}

fn text(v: Option<&Bson>) -> String {
    match v {
        Some(Bson::String(s)) => s.clone(),
        Some(Bson::Int64(i)) => i.to_string(),
        Some(Bson::Int32(i)) => i.to_string(),
        // nx-27017 keeps booleans in SQLite, which has none: they come back as 0/1.
        Some(Bson::Boolean(b)) => b.to_string(),
        Some(other) => other.to_string(),
        None => "<missing>".into(),
    }
}

/// Every document of `table`, by `_id`.
async fn documents(db: &mongodb::Database, table: &str) -> BTreeMap<i64, Document> {
    let docs: Vec<Document> = db
        .collection::<Document>(table)
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    docs.into_iter()
        .filter_map(|d| match d.get("_id") {
            Some(Bson::Int64(id)) => Some((*id, d)),
            Some(Bson::Int32(id)) => Some((i64::from(*id), d)),
            _ => None,
        })
        .collect()
}

/// The collections' rows, formatted like `workload::source_rows`.
async fn mongo_rows(db: &mongodb::Database) -> (Vec<String>, Vec<String>) {
    let users = documents(db, "users")
        .await
        .values()
        .map(|d| {
            format!(
                "{}|{}|{}",
                text(d.get("id")),
                text(d.get("name")),
                text(d.get("email"))
            )
        })
        .collect();
    let seen = |d: &Document| match d.get("seen") {
        Some(Bson::Int32(1) | Bson::Int64(1)) => "true".to_string(),
        Some(Bson::Int32(0) | Bson::Int64(0)) => "false".to_string(),
        other => text(other),
    };
    let messages = documents(db, "messages")
        .await
        .values()
        .map(|d| {
            format!(
                "{}|{}|{}|{}",
                text(d.get("id")),
                text(d.get("user_id")),
                text(d.get("text")),
                seen(d)
            )
        })
        .collect();
    (users, messages)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mongodb_read_model_fed_in_causal_order_ends_equal_to_the_source() {
    let e = e2e("mongo").await;
    let database = e.ns.clone();
    // The SQLite store only keeps the bookkeeping: tables are `mode = "none"`.
    let tables = format!(
        "[[table]]\nnamespace = \"{0}\"\nname = \"users\"\nmode = \"none\"\n\
         [[table]]\nnamespace = \"{0}\"\nname = \"messages\"\nmode = \"none\"\n\
         [[sink]]\nkind = \"mongo\"\nurl = \"{1}\"\ndatabase = \"{database}\"\n",
        e.ns,
        mongo_url()
    );
    let text = sub_config_text(&e.ns, &sqlite_url(&e.ns), &tables);
    let mut worker = Process::subscriber(&write_config(&text, &format!("{}.sub", e.ns)));

    let client = mongodb::Client::with_uri_str(mongo_url()).await.unwrap();
    let db = client.database(&database);
    let hello = db.run_command(doc! {"hello": 1}).await.unwrap();
    let transactions = hello.get_str("setName").is_ok();
    // A reader polls the collections during the workload and notes every message it saw
    // while its user was missing (looked up again, the message still there).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (db, done) = (db.clone(), done.clone());
        tokio::spawn(async move {
            let (mut checked, mut orphans) = (0u64, Vec::new());
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let users = documents(&db, "users").await;
                for (id, m) in documents(&db, "messages").await {
                    let user = match m.get("user_id") {
                        Some(Bson::Int64(u)) => *u,
                        Some(Bson::Int32(u)) => i64::from(*u),
                        _ => continue,
                    };
                    if !users.contains_key(&user) {
                        // The user may have been inserted after the users were read.
                        let users = db.collection::<Document>("users");
                        let messages = db.collection::<Document>("messages");
                        let user_now = users.find_one(doc! {"_id": user}).await.unwrap();
                        let message_now = messages.find_one(doc! {"_id": id}).await.unwrap();
                        if user_now.is_none() && message_now.is_some() {
                            orphans.push(user);
                        }
                    }
                    checked += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (checked, orphans)
        })
    };
    workload::run(&e.db.url, 3_000, 4, 29).await;
    let source = workload::source_rows(&e.db.url).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let got = mongo_rows(&db).await;
        if got == source {
            break;
        }
        if Instant::now() >= deadline {
            let missing: Vec<&String> = source
                .0
                .iter()
                .filter(|r| !got.0.contains(r))
                .take(5)
                .collect();
            panic!(
                "MongoDB differs from the source: users {} vs {}, messages {} vs {}; e.g. {missing:?}",
                got.0.len(),
                source.0.len(),
                got.1.len(),
                source.1.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (checked, orphans) = reader.await.unwrap();
    assert!(checked > 0, "the reader checked nothing");
    if transactions {
        // One MongoDB transaction per source transaction: never a message without its user.
        assert_eq!(
            orphans,
            Vec::<i64>::new(),
            "messages were visible without their user"
        );
    } else {
        // Without transactions a reader may catch a cascade half done (user deleted, its
        // messages not yet), but never a message before its user was inserted: a user
        // that still exists at the source was never deleted (ids are not reused).
        let alive: std::collections::HashSet<i64> = source
            .0
            .iter()
            .map(|u| u.split('|').next().unwrap().parse().unwrap())
            .collect();
        let early: Vec<&i64> = orphans.iter().filter(|u| alive.contains(u)).collect();
        assert!(
            early.is_empty(),
            "messages were visible before their user: users {early:?}"
        );
    }
    worker.kill();
    db.drop().await.unwrap();
    e.finish().await;
}
