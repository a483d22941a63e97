//! Signed messages (issue 9): a subscriber with `[signing] keys` applies what its
//! publishers signed and dead-letters everything else with the reason; replays of genuine
//! messages are duplicates; dead letters keep their signature so a retry still verifies.
//! And no password or key appears in anything the processes print.

mod common;

use common::sub::*;
use common::*;
use kausal::bus::amqp::AmqpPublisher;
use kausal::bus::signing::{generate, Signer};
use kausal::subscriber::{CallbackError, Event, Subscriber};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn tables(ns: &str) -> String {
    format!(
        "[[table]]\nnamespace = \"{ns}\"\nname = \"users\"\n\
         [[table]]\nnamespace = \"{ns}\"\nname = \"messages\"\n"
    )
}

async fn dead_letters(app: &str, n: usize) -> Vec<kausal::bus::amqp::DeadLetter> {
    let dlq = format!("kausal.{app}.dlq");
    let mut letters = Vec::new();
    for _ in 0..150 {
        letters = kausal::bus::amqp::peek_dead_letters(AMQP, &dlq, 20)
            .await
            .unwrap();
        if letters.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    letters
}

#[tokio::test(flavor = "multi_thread")]
async fn only_messages_signed_by_a_listed_key_are_applied_and_a_replay_changes_nothing() {
    logs();
    let app = unique("signed");
    let mut feed = Feed::new(&app).await;
    let url = sqlite_url(&app);
    declare_queue(&app, &app).await;
    let (secret, public) = generate();
    let signer = Arc::new(Signer::from_secret("k1", &secret).unwrap());
    let signed = AmqpPublisher::connect(AMQP, "kausal")
        .await
        .unwrap()
        .with_signer(Some(signer.clone()));
    let text = sub_config_text(
        &app,
        &url,
        &format!(
            "[callbacks]\nattempts = 1\n[signing]\nkeys = {{ k1 = \"{public}\" }}\n{}",
            tables(&app)
        ),
    );
    let config = write_config(&text, &app);
    let poison = Arc::new(AtomicBool::new(true));
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut sub = Subscriber::new(toml::from_str(&text).unwrap());
    {
        let (log, poison) = (log.clone(), poison.clone());
        sub.callbacks().on_change("users", move |e: Event<Value>| {
            let (log, poison) = (log.clone(), poison.clone());
            async move {
                let name = e.new.as_ref().and_then(|r| r.get("name")).cloned();
                if poison.load(Ordering::SeqCst) && name == Some(json!("poison")) {
                    return Err(CallbackError::permanent("the mail service refused it"));
                }
                log.lock().unwrap().push(format!("{}", e.key["id"]));
                Ok(())
            }
        });
    }
    let worker = Worker::start(sub);
    let rk = kausal::bus::amqp::changes_routing_key(&app);
    let user = |feed: &mut Feed, id: i64, name: &str| {
        let env = feed.txn(
            vec![insert("users", id, json!({"name": name, "email": "x@y"}))],
            None,
        );
        kausal::bus::encode(&[env])
    };

    // Genuine, then the same bytes again (a replay by someone who recorded them).
    let first = user(&mut feed, 1, "ada");
    signed
        .publish(&rk, &first)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    signed
        .publish(&rk, &first)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    // Unsigned, forged (another key claiming to be k1), altered after signing, and
    // signed with a key the app does not list.
    let unsigned = user(&mut feed, 3, "mallory");
    feed.publish_raw(&unsigned).await;
    let forged = user(&mut feed, 4, "mallory");
    let (other_secret, _) = generate();
    let other = Signer::from_secret("k1", &other_secret).unwrap();
    let raw = AmqpPublisher::connect(AMQP, "kausal").await.unwrap();
    raw.with_signer(Some(Arc::new(other)))
        .publish(&rk, &forged)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    let honest = user(&mut feed, 5, "bob");
    let signature = signer.sign(&honest);
    let altered = String::from_utf8(honest)
        .unwrap()
        .replace("\"bob\"", "\"eve\"");
    publish_with_headers(&rk, altered.as_bytes(), "k1", &signature).await;
    let unknown = user(&mut feed, 6, "mallory");
    let (k9_secret, _) = generate();
    let k9 = Arc::new(Signer::from_secret("k9", &k9_secret).unwrap());
    let k9_bus = AmqpPublisher::connect(AMQP, "kausal")
        .await
        .unwrap()
        .with_signer(Some(k9));
    k9_bus
        .publish(&rk, &unknown)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    // A genuine one whose callback fails: dead-lettered whole, with its signature.
    let poisoned = user(&mut feed, 7, "poison");
    signed
        .publish(&rk, &poisoned)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();

    let letters = dead_letters(&app, 5).await;
    let reasons: Vec<String> = letters
        .iter()
        .map(|l| l.reason.clone().unwrap_or_default())
        .collect();
    assert_eq!(reasons.len(), 5, "{reasons:#?}");
    assert!(reasons[0].contains("unsigned message"), "{reasons:#?}");
    assert!(
        reasons[1].contains("does not verify with key \"k1\""),
        "{reasons:#?}"
    );
    assert!(reasons[2].contains("forged or altered"), "{reasons:#?}");
    assert!(
        reasons[3].contains("\"k9\", which is not among"),
        "{reasons:#?}"
    );
    assert!(
        reasons[4].contains("the mail service refused it"),
        "{reasons:#?}"
    );
    assert_eq!(
        *log.lock().unwrap(),
        ["1"],
        "the replay or a rejected message ran"
    );

    // The dead letter lists only its failed transaction, and its retry verifies.
    let cfg = config.to_str().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(["dlq", "list", "--json", "--config", cfg])
        .output()
        .unwrap();
    let listed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        listed[4]["transactions"],
        json!([format!("{app}/1/6")]),
        "{listed:?}"
    );
    poison.store(false, Ordering::SeqCst);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(["dlq", "retry", "--index", "5", "--config", cfg])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        Duration::from_secs(20),
        "the retried user applied",
        || async { log.lock().unwrap().len() == 2 },
    )
    .await;
    assert_eq!(*log.lock().unwrap(), ["1", "7"]);
    worker.stop().await;
    delete_queues(&app).await;
}

/// Publishes `body` with the given signature headers, as an attacker replaying a
/// signature on other bytes would.
async fn publish_with_headers(routing_key: &str, body: &[u8], key: &str, sig: &str) {
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let props = lapin::BasicProperties::default()
        .with_headers(kausal::bus::amqp::signature_headers(key, sig));
    channel
        .basic_publish(
            "kausal".into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signing_publisher_feeds_a_subscriber_that_requires_signatures() {
    logs();
    let ns = unique("signpub");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    declare_queue(&ns, &ns).await;
    let (secret, public) = generate();
    let key_file = std::env::temp_dir().join(format!("kausal-tests/{ns}.key"));
    std::fs::write(&key_file, format!("{secret}\n")).unwrap();
    let publisher = start(
        config(
            &ns,
            &db.url,
            &format!(
                "[signing]\nkey_id = \"2026-11\"\nkey_file = \"{}\"\n{}",
                key_file.display(),
                workload::PUBLISHED
            ),
        ),
        &db,
    )
    .await;
    let store_url = sqlite_url(&ns);
    let cfg = sub_config(
        &ns,
        &store_url,
        &format!(
            "[signing]\nkeys = {{ \"2026-11\" = \"{public}\" }}\n{}",
            workload::subscribed(&ns)
        ),
    );
    let worker = Worker::start(Subscriber::new(cfg));
    workload::run(&db.url, 300, 2, 11).await;
    let store = common::boot::sqlite_store(&store_url).await;
    workload::converge(&db.url, &store, Duration::from_secs(60)).await;
    let letters = kausal::bus::amqp::peek_dead_letters(AMQP, &format!("kausal.{ns}.dlq"), 5)
        .await
        .unwrap();
    assert!(letters.is_empty(), "{:?}", letters[0].reason);
    worker.stop().await;
    publisher.stop().await;
    db.drop().await;
    delete_queues(&ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_password_or_signing_key_appears_in_anything_kausal_prints() {
    logs();
    let ns = unique("secrets");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    let password = "pw-Zq81-never-print-me";
    let (secret, _) = generate();
    // Trust authentication ignores the source password; the broker refuses the login.
    let text = config_text(
        &ns,
        &format!("postgres://postgres:{password}@127.0.0.1:5432/{}", db.name),
        &format!("[signing]\nkey_id = \"k1\"\n{}", workload::PUBLISHED),
    )
    .replace("guest:guest@", &format!("kausal_nobody:{password}@"));
    let config = write_config(&text, &format!("{ns}.pub"));
    let cfg = config.to_str().unwrap();
    let mut printed = String::new();
    for args in [
        vec!["publish", "--config", cfg],
        vec!["status", "--config", cfg],
        vec!["status", "--json", "--config", cfg],
        vec!["doctor", "--config", cfg],
        vec!["contract", "export", "--config", cfg],
        vec!["publish", "--help"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
            .args(&args)
            .env("RUST_LOG", "debug")
            .env("KAUSAL_SIGN_KEY", &secret)
            .output()
            .unwrap();
        printed += &String::from_utf8_lossy(&out.stdout);
        printed += &String::from_utf8_lossy(&out.stderr);
    }
    // The commands ran far enough to talk about the broker and the source.
    assert!(printed.contains("kausal_nobody"), "{printed}");
    assert!(printed.contains("RabbitMQ refused the login"), "{printed}");
    assert!(!printed.contains(password), "the password was printed");
    assert!(!printed.contains(&secret), "the signing key was printed");
    db.drop().await;
}
