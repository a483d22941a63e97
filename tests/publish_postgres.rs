//! The Postgres publisher end to end: committed transactions arrive as envelopes in
//! commit order, with faithful values, keys, gap-free sequence numbers and the
//! dependencies the rules imply; what is not published never appears.

mod common;

use common::*;
use kausal::bus::deps::{session_key, DEFAULT_KEY_SPACE};
use kausal::bus::{Dep, DepKind, Envelope, Op};
use kausal::publisher::source::assemble::{row_key, table_key};
use serde_json::json;
use std::time::Duration;

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE users (
  id int PRIMARY KEY, name text, email text, secret text, mood mood, tags text[],
  scores int[], meta jsonb, born date, seen timestamptz, at timestamp, t time,
  ratio float8, big int8, small int2, price numeric(12,4), uid uuid, avatar bytea,
  active bool, vc varchar(20));
CREATE TABLE messages (id int PRIMARY KEY, user_id int REFERENCES users(id), body text);
CREATE TABLE posts (id int PRIMARY KEY, author int, title text);
CREATE TABLE audit (id int PRIMARY KEY, note text);
";

const TABLES: &str = r#"
[[table]]
name = "users"
as = "people"
columns = ["id", "name", "email", "mood", "tags", "scores", "meta", "born", "seen", "at",
           "t", "ratio", "big", "small", "price", "uid", "avatar", "active", "vc"]
rename = { email = "email_address" }
[[table]]
name = "public.messages"
columns = ["*"]
[[table]]
name = "posts"
columns = ["*"]
references = [{ columns = ["author"], table = "users" }]
"#;

fn dep_on(e: &Envelope, k: u32) -> Dep {
    *e.deps
        .iter()
        .find(|d| d.k == k)
        .unwrap_or_else(|| panic!("seq {} has no dep on key {k}: {:?}", e.seq, e.deps))
}

fn person(id: &str) -> u32 {
    row_key("people", &[id.as_bytes()], DEFAULT_KEY_SPACE)
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_arrive_in_commit_order_with_values_keys_and_dependencies() {
    logs();
    let ns = unique("order");
    let db = TestDb::new(&ns, SCHEMA).await;
    let mut tap = Tap::new(&ns).await;
    let publisher = start(config(&ns, &db.url, TABLES), &db).await;
    let c = &db.client;
    let steps = [
        // 1: a user with every common type, tagged with a session and context.
        "BEGIN;
         SELECT pg_logical_emit_message(true, 'kausal',
           '{\"session\": \"s1\", \"user\": \"alice\", \"request_id\": \"r-1\", \"team\": \"x\"}');
         INSERT INTO users VALUES (1, 'Ann', 'ann@example.com', 'hunter2', 'happy',
           '{\"a\",\"b c\",NULL}', '{{1,2},{3,4}}', '{\"k\": [1, true]}', '2024-02-29',
           '2024-01-02 03:04:05.123456+02', '2024-01-02 03:04:05', '23:59:59.5', 1.5,
           -9223372036854775808, -32768, 12.3400, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
           '\\x00ff10', true, 'vc');
         COMMIT;",
        // 2: a message referencing the user (FK), plus a row of an unpublished table.
        "BEGIN; INSERT INTO messages VALUES (10, 1, 'hi'); INSERT INTO audit VALUES (1, 'x'); COMMIT;",
        // 3: same session as 1, different row.
        "BEGIN; SELECT pg_logical_emit_message(true, 'kausal', '{\"session\": \"s1\"}');
         UPDATE users SET name = 'Anna' WHERE id = 1; COMMIT;",
        // 4: a post referencing the user through a configured reference (no FK).
        "INSERT INTO posts VALUES (100, 1, 'first')",
        // 5: deletes of the children.
        "BEGIN; DELETE FROM messages WHERE id = 10; DELETE FROM posts WHERE id = 100; COMMIT;",
        // 6: the user goes (write after the reads of 2 and 4).
        "DELETE FROM users WHERE id = 1",
        // 7: a key change.
        "BEGIN; INSERT INTO users (id, name) VALUES (3, 'Cy'); UPDATE users SET id = 4 WHERE id = 3; COMMIT;",
        // 8: a truncate.
        "TRUNCATE posts",
        // an unpublished-only transaction: no envelope, no sequence number.
        "INSERT INTO audit VALUES (2, 'y')",
    ];
    for s in steps {
        c.batch_execute(s).await.unwrap();
    }
    tap.until(Duration::from_secs(60), |r| complete(r) >= 8)
        .await;
    publisher.stop().await;
    let e = tap.by_seq();
    assert_eq!(
        e.keys().copied().collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert!(tap
        .received
        .iter()
        .all(|x| x.parts == Some(1) && x.part == 0));
    for w in tap.received.windows(2) {
        assert!(w[0].commit_ts_us <= w[1].commit_ts_us, "commit order");
    }

    // 1: values, renames and the column allowlist.
    let ins = &e[&1].changes[0];
    assert_eq!((ins.op, ins.table.as_str()), (Op::Insert, "people"));
    assert_eq!(ins.key, *json!({"id": 1}).as_object().unwrap());
    let row = ins.new.as_ref().unwrap();
    assert!(!row.contains_key("secret"), "unpublished column leaked");
    assert_eq!(
        serde_json::Value::Object(row.clone()),
        json!({
            "id": 1, "name": "Ann", "email_address": "ann@example.com", "mood": "happy",
            "tags": ["a", "b c", null], "scores": [[1, 2], [3, 4]], "meta": {"k": [1, true]},
            "born": "2024-02-29", "seen": "2024-01-02T01:04:05.123456+00:00",
            "at": "2024-01-02T03:04:05", "t": "23:59:59.5", "ratio": 1.5,
            "big": i64::MIN, "small": -32768, "price": "12.3400",
            "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "avatar": "AP8Q",
            "active": true, "vc": "vc"
        })
    );
    assert_eq!(e[&1].context.user.as_deref(), Some("alice"));
    assert_eq!(e[&1].context.request_id.as_deref(), Some("r-1"));
    assert_eq!(e[&1].context.sessions, vec!["s1".to_string()]);
    assert_eq!(e[&1].context.extra["team"], json!("x"));
    let schema = &e[&1].schemas[0];
    assert_eq!(schema.table, "people");
    assert!(schema.columns.iter().all(|c| c.name != "secret"));
    assert!(schema
        .columns
        .iter()
        .any(|c| c.name == "price" && c.type_name == "numeric"));
    assert_eq!(
        dep_on(e[&1], person("1")),
        Dep {
            k: person("1"),
            v: 1,
            kind: DepKind::Write,
            after: 0
        }
    );

    // 2: the unpublished table is absent; the FK parent is a read dependency on 1.
    assert_eq!(e[&2].changes.len(), 1);
    assert_eq!(e[&2].changes[0].table, "messages");
    assert_eq!(
        dep_on(e[&2], person("1")),
        Dep {
            k: person("1"),
            v: 1,
            kind: DepKind::Read,
            after: 1
        }
    );

    // 3: the session chains it to 1 although 2 came between.
    let s1 = session_key("s1", DEFAULT_KEY_SPACE);
    assert_eq!(
        dep_on(e[&3], s1),
        Dep {
            k: s1,
            v: 2,
            kind: DepKind::Write,
            after: 1
        }
    );
    // ... and as a write to user 1 it waits for 2's read (v - 1 = 2 operations).
    assert_eq!(
        dep_on(e[&3], person("1")),
        Dep {
            k: person("1"),
            v: 3,
            kind: DepKind::Write,
            after: 2
        }
    );

    // 4: configured reference → read of the user as last written by 3.
    assert_eq!(
        dep_on(e[&4], person("1")),
        Dep {
            k: person("1"),
            v: 3,
            kind: DepKind::Read,
            after: 3
        }
    );

    // 6: the delete waits for every earlier read and write of the user (write after read).
    let del = &e[&6].changes[0];
    assert_eq!(
        (del.op, del.key.clone()),
        (Op::Delete, json!({"id": 1}).as_object().unwrap().clone())
    );
    assert_eq!(
        dep_on(e[&6], person("1")),
        Dep {
            k: person("1"),
            v: 5,
            kind: DepKind::Write,
            after: 4
        }
    );

    // 7: a key change names the old key and writes both keys.
    let moved = &e[&7].changes[1];
    assert_eq!(moved.op, Op::Update);
    assert_eq!(moved.key, *json!({"id": 4}).as_object().unwrap());
    assert_eq!(
        moved.old_key,
        Some(json!({"id": 3}).as_object().unwrap().clone())
    );
    assert_eq!(dep_on(e[&7], person("4")).kind, DepKind::Write);
    assert_eq!(dep_on(e[&7], person("3")).kind, DepKind::Write);

    // 8: truncate is its own operation, ordered after every earlier change of the table.
    assert_eq!(e[&8].changes[0].op, Op::Truncate);
    assert_eq!(e[&8].changes[0].table, "posts");
    let posts = table_key("posts", DEFAULT_KEY_SPACE);
    assert_eq!(
        dep_on(e[&8], posts),
        Dep {
            k: posts,
            v: 3,
            kind: DepKind::Write,
            after: 5
        }
    );

    // Nothing of the unpublished table or column anywhere.
    for x in &tap.received {
        let text = serde_json::to_string(x).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("audit"),
            "{text}"
        );
    }
    tap.delete().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toasted_values_are_never_published_as_null() {
    logs();
    let ns = unique("toast");
    let db = TestDb::new(
        &ns,
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         CREATE TABLE docs_full (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs_full REPLICA IDENTITY FULL;",
    )
    .await;
    let mut tap = Tap::new(&ns).await;
    let publisher = start(config(
        &ns,
        &db.url,
        "[[table]]\nname = \"docs\"\ncolumns = [\"*\"]\n[[table]]\nname = \"docs_full\"\ncolumns = [\"*\"]\n",
    ), &db).await;
    // ~40 kB of poorly compressible text: stored out of line (TOAST threshold ~2 kB).
    let big = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 1250) g)";
    for t in ["docs", "docs_full"] {
        db.client
            .batch_execute(&format!("INSERT INTO {t} VALUES (1, 'a', {big})"))
            .await
            .unwrap();
        db.client
            .batch_execute(&format!("UPDATE {t} SET title = 'b' WHERE id = 1"))
            .await
            .unwrap();
    }
    let body: String = db
        .client
        .query_one("SELECT body FROM docs_full WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert!(body.len() > 2048);
    tap.until(Duration::from_secs(60), |r| complete(r) >= 4)
        .await;
    publisher.stop().await;
    let e = tap.by_seq();
    // Default replica identity: the value is not in the WAL; the change says so.
    let upd = &e[&2].changes[0];
    assert_eq!(upd.op, Op::Update);
    let new = upd.new.as_ref().unwrap();
    assert_eq!(new["title"], json!("b"));
    assert!(
        !new.contains_key("body"),
        "an unchanged TOAST value must not become null"
    );
    assert_eq!(upd.unchanged, vec!["body".to_string()]);
    // REPLICA IDENTITY FULL: the publisher fills it in from the old row.
    let upd = &e[&4].changes[0];
    assert_eq!(upd.new.as_ref().unwrap()["body"], json!(body));
    assert!(upd.unchanged.is_empty());
    tap.delete().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_change_is_flagged_and_a_wildcard_publishes_the_added_column() {
    logs();
    let ns = unique("ddl");
    let db = TestDb::new(
        &ns,
        "CREATE TABLE items (id int PRIMARY KEY, a text, gone text);",
    )
    .await;
    let mut tap = Tap::new(&ns).await;
    let publisher = start(
        config(
            &ns,
            &db.url,
            "[[table]]\nname = \"items\"\ncolumns = [\"*\"]\n",
        ),
        &db,
    )
    .await;
    let c = &db.client;
    c.batch_execute("INSERT INTO items VALUES (1, 'x', 'g')")
        .await
        .unwrap();
    c.batch_execute("ALTER TABLE items ADD COLUMN b int; ALTER TABLE items DROP COLUMN gone;")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO items VALUES (2, 'y', 7)")
        .await
        .unwrap();
    tap.until(Duration::from_secs(60), |r| complete(r) >= 2)
        .await;
    publisher.stop().await;
    let e = tap.by_seq();
    assert!(!e[&1].schemas[0].changed);
    assert!(
        e[&2].schemas[0].changed,
        "envelope must say the schema changed"
    );
    let names: Vec<_> = e[&2].schemas[0]
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["id", "a", "b"]);
    assert_eq!(
        serde_json::Value::Object(e[&2].changes[0].new.clone().unwrap()),
        json!({"id": 2, "a": "y", "b": 7})
    );
    tap.delete().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_slot_keeps_moving_while_published_tables_are_idle() {
    logs();
    let ns = unique("idle");
    let db = TestDb::new(
        &ns,
        "CREATE TABLE published (id int PRIMARY KEY); CREATE TABLE busy (id serial PRIMARY KEY, x text);",
    )
    .await;
    let mut tap = Tap::new(&ns).await;
    let publisher = start(
        config(
            &ns,
            &db.url,
            "[[table]]\nname = \"published\"\ncolumns = [\"*\"]\n",
        ),
        &db,
    )
    .await;
    db.client
        .batch_execute("INSERT INTO published VALUES (1)")
        .await
        .unwrap();
    tap.until(Duration::from_secs(60), |r| complete(r) >= 1)
        .await;
    // Only an unpublished table is written from now on: WAL grows, nothing is published.
    for _ in 0..200 {
        db.client
            .batch_execute(
                "INSERT INTO busy (x) SELECT repeat('x', 1000) FROM generate_series(1, 50)",
            )
            .await
            .unwrap();
    }
    let target: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let slot = format!("kausal_{ns}");
    let mut moved = false;
    for _ in 0..300 {
        moved = db
            .client
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &target],
            )
            .await
            .unwrap()
            .get(0);
        if moved {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publisher.stop().await;
    assert!(
        moved,
        "the slot did not advance past {target} while published tables were idle"
    );
    assert_eq!(
        complete(&tap.received),
        1,
        "nothing of the busy table is published"
    );
    tap.delete().await;
    db.drop().await;
}
