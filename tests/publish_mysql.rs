//! The MariaDB publisher end to end, the same scenarios as `publish_postgres.rs`:
//! committed transactions arrive as envelopes in commit order, with faithful values,
//! keys, gap-free sequence numbers and the dependencies the rules imply; what is not
//! published never appears. Subscribers cannot tell which source an envelope came from:
//! keys hash the same text, values have the same JSON forms, types the same names.

mod common;

use common::mysql::*;
use common::*;
use kausal::bus::deps::{session_key, DEFAULT_KEY_SPACE};
use kausal::bus::{DepKind, Envelope, Op};
use kausal::publisher::source::assemble::{row_key, table_key};
use mysql_async::prelude::Queryable;
use serde_json::json;
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE users (id INT PRIMARY KEY, name VARCHAR(100), email VARCHAR(100),
  secret VARCHAR(100)) ENGINE=InnoDB;
CREATE TABLE messages (id INT PRIMARY KEY, user_id INT, body TEXT,
  FOREIGN KEY (user_id) REFERENCES users(id)) ENGINE=InnoDB;
CREATE TABLE posts (id INT PRIMARY KEY, author INT, title VARCHAR(100)) ENGINE=InnoDB;
CREATE TABLE audit (id INT PRIMARY KEY, note VARCHAR(100)) ENGINE=InnoDB;
CREATE TABLE kausal_context (id BIGINT AUTO_INCREMENT PRIMARY KEY, data JSON NOT NULL)
  ENGINE=InnoDB;
";

const TABLES: &str = r#"
[[table]]
name = "users"
as = "people"
columns = ["id", "name", "email"]
rename = { email = "email_address" }
[[table]]
name = "messages"
columns = ["*"]
[[table]]
name = "posts"
columns = ["*"]
references = [{ columns = ["author"], table = "users" }]
"#;

fn person(id: &str) -> u32 {
    row_key("people", &[id.as_bytes()], DEFAULT_KEY_SPACE)
}

fn dep_kind(e: &Envelope, k: u32) -> Option<DepKind> {
    e.deps.iter().find(|d| d.k == k).map(|d| d.kind)
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_arrive_in_commit_order_with_values_keys_and_dependencies() {
    logs();
    let ns = unique("myorder");
    let mut db = MyDb::new(&ns, SCHEMA).await;
    let mut tap = Tap::new(&ns).await;
    let publisher = my_start(my_config(&ns, &db.url, TABLES)).await;
    let steps = [
        // 1: a user, tagged with a session and context through the context table.
        "BEGIN;
         INSERT INTO kausal_context (data) VALUES
           ('{\"session\": \"s1\", \"user\": \"alice\", \"request_id\": \"r-1\", \"team\": \"x\"}');
         INSERT INTO users VALUES (1, 'Ann', 'ann@example.com', 'hunter2');
         DELETE FROM kausal_context WHERE id = LAST_INSERT_ID();
         COMMIT",
        // 2: a message referencing the user (FK), plus a row of an unpublished table.
        "BEGIN; INSERT INTO messages VALUES (10, 1, 'hi'); INSERT INTO audit VALUES (1, 'x'); COMMIT",
        // 3: same session as 1, different row.
        "BEGIN; INSERT INTO kausal_context (data) VALUES ('{\"session\": \"s1\"}');
         UPDATE users SET name = 'Anna' WHERE id = 1; COMMIT",
        // 4: a post referencing the user through a configured reference (no FK).
        "INSERT INTO posts VALUES (100, 1, 'first')",
        // 5: deletes of the children.
        "BEGIN; DELETE FROM messages WHERE id = 10; DELETE FROM posts WHERE id = 100; COMMIT",
        // 6: the user goes (write after the reads of 2 and 4).
        "DELETE FROM users WHERE id = 1",
        // 7: a key change.
        "BEGIN; INSERT INTO users (id, name) VALUES (3, 'Cy'); UPDATE users SET id = 4 WHERE id = 3; COMMIT",
        // 8: a truncate.
        "TRUNCATE TABLE posts",
        // an unpublished-only transaction: no envelope, no sequence number.
        "INSERT INTO audit VALUES (2, 'y')",
    ];
    for s in steps {
        db.exec(s).await;
    }
    tap.until(Duration::from_secs(60), |r| complete(r) >= 8)
        .await;
    publisher.stop().await;
    let e = tap.by_seq();
    assert_eq!(
        e.keys().copied().collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    for w in tap.received.windows(2) {
        assert!(w[0].commit_ts_us <= w[1].commit_ts_us, "commit order");
    }
    assert!(
        e[&1].position.starts_with("mysql:0-1-"),
        "{}",
        e[&1].position
    );

    // 1: values, renames and the column allowlist; context from the context table.
    let ins = &e[&1].changes;
    assert_eq!(
        ins.len(),
        1,
        "context table rows are not published: {ins:?}"
    );
    assert_eq!((ins[0].op, ins[0].table.as_str()), (Op::Insert, "people"));
    assert_eq!(ins[0].key, *json!({"id": 1}).as_object().unwrap());
    assert_eq!(
        serde_json::Value::Object(ins[0].new.clone().unwrap()),
        json!({"id": 1, "name": "Ann", "email_address": "ann@example.com"})
    );
    assert_eq!(e[&1].context.user.as_deref(), Some("alice"));
    assert_eq!(e[&1].context.request_id.as_deref(), Some("r-1"));
    assert_eq!(e[&1].context.sessions, vec!["s1".to_string()]);
    assert_eq!(e[&1].context.extra["team"], json!("x"));
    let schema = &e[&1].schemas[0];
    assert_eq!(schema.table, "people");
    assert_eq!(schema.key, vec!["id".to_string()]);
    let types: Vec<(&str, &str)> = schema
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_name.as_str()))
        .collect();
    assert_eq!(
        types,
        [("id", "int4"), ("name", "text"), ("email_address", "text")]
    );
    let s1 = session_key("s1", DEFAULT_KEY_SPACE);
    assert_eq!(dep_kind(e[&1], person("1")), Some(DepKind::Write));
    assert_eq!(dep_kind(e[&1], s1), Some(DepKind::Write));

    // 2: the message reads its user through the foreign key; the audit row is absent.
    assert_eq!(e[&2].changes.len(), 1);
    assert_eq!(dep_kind(e[&2], person("1")), Some(DepKind::Read));
    // 3: the same session orders 3 after 1.
    let d = e[&3].deps.iter().find(|d| d.k == s1).unwrap();
    assert_eq!((d.kind, d.after), (DepKind::Write, 1));
    let upd = &e[&3].changes[0];
    assert_eq!(upd.op, Op::Update);
    assert_eq!(upd.old.as_ref().unwrap()["name"], json!("Ann"));
    // 4: the configured reference is a read of the user.
    assert_eq!(dep_kind(e[&4], person("1")), Some(DepKind::Read));
    // 6: deleting the user writes its key after the reads of 2 and 4.
    let d = e[&6].deps.iter().find(|d| d.k == person("1")).unwrap();
    assert_eq!((d.kind, d.after), (DepKind::Write, 4));
    assert_eq!(e[&6].changes[0].op, Op::Delete);
    // 7: a key change writes both keys and names the old one.
    let moved = e[&7].changes.last().unwrap();
    assert_eq!(
        moved.old_key,
        Some(json!({"id": 3}).as_object().unwrap().clone())
    );
    assert_eq!(dep_kind(e[&7], person("3")), Some(DepKind::Write));
    assert_eq!(dep_kind(e[&7], person("4")), Some(DepKind::Write));
    // 8: a truncate writes the table key, with the table's schema.
    assert_eq!(e[&8].changes[0].op, Op::Truncate);
    assert_eq!(e[&8].changes[0].table, "posts");
    assert_eq!(
        dep_kind(e[&8], table_key("posts", DEFAULT_KEY_SPACE)),
        Some(DepKind::Write)
    );
    assert_eq!(e[&8].schemas[0].table, "posts");
    assert!(!e[&8].schemas[0].changed, "a truncate is no schema change");
    tap.delete().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_column_type_arrives_with_its_exact_value() {
    logs();
    let ns = unique("mytypes");
    let mut db = MyDb::new(
        &ns,
        "CREATE TABLE t (
           id BIGINT UNSIGNED PRIMARY KEY,
           i8 TINYINT, i16 SMALLINT, i24 MEDIUMINT, i32 INT, i64 BIGINT,
           u8 TINYINT UNSIGNED, u16 SMALLINT UNSIGNED, u24 MEDIUMINT UNSIGNED,
           u32 INT UNSIGNED, u64 BIGINT UNSIGNED,
           price DECIMAL(12,4), f FLOAT, d DOUBLE,
           vc VARCHAR(50), txt TEXT, ch CHAR(3), bin VARBINARY(8), bl BLOB,
           born DATE, at DATETIME(6), seen TIMESTAMP(6) NULL, t TIME(6), y YEAR,
           mood ENUM('happy','sad'), tags SET('a','b','c'), meta JSON, flags BIT(10),
           nothing INT NULL, ok BOOLEAN
         ) DEFAULT CHARSET = utf8mb4",
    )
    .await;
    let mut tap = Tap::new(&ns).await;
    let publisher = my_start(my_config(
        &ns,
        &db.url,
        "[[table]]\nname = \"t\"\ncolumns = [\"*\"]\n",
    ))
    .await;
    // The session's time zone is +02:00: TIMESTAMP values are stored (and published)
    // in UTC.
    db.exec(
        "SET time_zone = '+02:00';
         INSERT INTO t VALUES (18446744073709551615,
           -128, -32768, -8388608, -2147483648, -9223372036854775808,
           255, 65535, 16777215, 4294967295, 18446744073709551615,
           -12.3400, 1.5, -2.25e100,
           'Grüße 😀', 'naïve text', 'abc', x'00ff10', x'deadbeef',
           '2024-02-29', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.123456',
           '-838:59:59.000000', 2024, 'sad', 'a,c', '{\"k\": [1, true, null], \"s\": \"ü\"}',
           b'1010101010', NULL, TRUE);
         INSERT INTO t (id, t, at, seen, i24, i8, f, d) VALUES (1, '-12:34:56.789012',
           '1999-12-31 23:59:59', '1970-01-01 02:00:01', -1, -1, -0.1, 0.1)",
    )
    .await;
    tap.until(Duration::from_secs(60), |r| complete(r) >= 2)
        .await;
    publisher.stop().await;
    let e = tap.by_seq();
    let row = serde_json::Value::Object(e[&1].changes[0].new.clone().unwrap());
    assert_eq!(
        row,
        json!({
            "id": u64::MAX,
            "i8": -128, "i16": -32768, "i24": -8388608, "i32": i32::MIN, "i64": i64::MIN,
            "u8": 255, "u16": 65535, "u24": 16777215, "u32": u32::MAX, "u64": u64::MAX,
            "price": "-12.3400", "f": 1.5, "d": -2.25e100,
            "vc": "Grüße 😀", "txt": "naïve text", "ch": "abc", "bin": "AP8Q",
            "bl": "3q2+7w==",
            "born": "2024-02-29", "at": "2024-01-02T03:04:05.123456",
            "seen": "2024-01-02T01:04:05.123456+00:00", "t": "-838:59:59", "y": 2024,
            "mood": "sad", "tags": "a,c", "meta": {"k": [1, true, null], "s": "ü"},
            "flags": "1010101010", "nothing": null, "ok": true
        })
    );
    let second = &e[&2].changes[0].new.as_ref().unwrap();
    assert_eq!(second["t"], json!("-12:34:56.789012"));
    assert_eq!(second["at"], json!("1999-12-31T23:59:59"));
    assert_eq!(second["seen"], json!("1970-01-01T00:00:01+00:00"));
    assert_eq!((&second["i24"], &second["i8"]), (&json!(-1), &json!(-1)));
    assert_eq!((&second["f"], &second["d"]), (&json!(-0.1), &json!(0.1)));
    assert_eq!(e[&2].changes[0].key, *json!({"id": 1}).as_object().unwrap());
    let types: std::collections::BTreeMap<&str, &str> = e[&1].schemas[0]
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_name.as_str()))
        .collect();
    for (column, ty) in [
        ("id", "numeric"),
        ("i8", "int2"),
        ("i24", "int4"),
        ("i32", "int4"),
        ("u32", "int8"),
        ("price", "numeric"),
        ("f", "float4"),
        ("d", "float8"),
        ("bin", "bytea"),
        ("at", "timestamp"),
        ("seen", "timestamptz"),
        ("meta", "json"),
        ("mood", "text"),
        ("ok", "bool"),
    ] {
        assert_eq!(types[column], ty, "type of {column}");
    }
    tap.delete().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_written_before_an_alter_table_keep_their_shape_when_read_after_it() {
    logs();
    let ns = unique("myddl");
    let mut db = MyDb::new(
        &ns,
        "CREATE TABLE items (id INT PRIMARY KEY, a TEXT, gone TEXT)",
    )
    .await;
    let mut tap = Tap::new(&ns).await;
    let url = db.url.clone();
    let cfg = || {
        my_config(
            &ns,
            &url,
            "[[table]]\nname = \"items\"\ncolumns = [\"*\"]\n",
        )
    };
    let publisher = my_start(cfg()).await;
    db.exec("INSERT INTO items VALUES (1, 'x', 'g')").await;
    tap.until(Duration::from_secs(60), |r| complete(r) >= 1)
        .await;
    publisher.stop().await;
    // While the publisher is down: a row in the old shape, the DDL, a row in the new
    // one. information_schema now only knows the new shape; the binlog's table maps
    // still describe each row as it was written.
    db.exec(
        "INSERT INTO items VALUES (2, 'y', 'g2');
         ALTER TABLE items ADD COLUMN b INT, DROP COLUMN gone;
         INSERT INTO items VALUES (3, 'z', 7)",
    )
    .await;
    let publisher = my_start(cfg()).await;
    tap.until(Duration::from_secs(60), |r| complete(r) >= 3)
        .await;
    publisher.stop().await;
    let e = tap.by_seq();
    assert_eq!(
        serde_json::Value::Object(e[&2].changes[0].new.clone().unwrap()),
        json!({"id": 2, "a": "y", "gone": "g2"})
    );
    assert!(!e[&2].schemas[0].changed);
    assert!(
        e[&3].schemas[0].changed,
        "envelope must say the schema changed"
    );
    let names: Vec<_> = e[&3].schemas[0]
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["id", "a", "b"]);
    assert_eq!(
        serde_json::Value::Object(e[&3].changes[0].new.clone().unwrap()),
        json!({"id": 3, "a": "z", "b": 7})
    );
    tap.delete().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_checkpoint_keeps_moving_while_published_tables_are_idle() {
    logs();
    let ns = unique("myidle");
    let mut db = MyDb::new(
        &ns,
        "CREATE TABLE published (id INT PRIMARY KEY);
         CREATE TABLE busy (id INT AUTO_INCREMENT PRIMARY KEY, x TEXT)",
    )
    .await;
    let mut tap = Tap::new(&ns).await;
    let publisher = my_start(my_config(
        &ns,
        &db.url,
        "[[table]]\nname = \"published\"\ncolumns = [\"*\"]\n",
    ))
    .await;
    db.exec("INSERT INTO published VALUES (1)").await;
    tap.until(Duration::from_secs(60), |r| complete(r) >= 1)
        .await;
    // Only an unpublished table is written from now on: nothing is published, but the
    // checkpoint must move past it, or a restart would read it all again.
    for _ in 0..200 {
        db.exec("INSERT INTO busy (x) VALUES (REPEAT('x', 1000))")
            .await;
    }
    let target: String = db
        .conn
        .query_first("SELECT @@gtid_binlog_pos")
        .await
        .unwrap()
        .unwrap();
    let target_seq = |pos: &str| -> u64 {
        pos.split(',')
            .find_map(|g| g.strip_prefix("0-1-"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let mut reached = String::new();
    for _ in 0..300 {
        if let Ok(Some(cp)) = kausal::publisher::checkpoint::load(&checkpoint_path(&ns)) {
            reached = cp.resume;
            if target_seq(reached.trim_start_matches("gtid:")) >= target_seq(&target) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publisher.stop().await;
    assert!(
        target_seq(reached.trim_start_matches("gtid:")) >= target_seq(&target),
        "the checkpoint ({reached}) did not move past {target} while published tables were idle"
    );
    assert_eq!(
        complete(&tap.received),
        1,
        "nothing of the busy table is published"
    );
    tap.delete().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_made_while_a_new_publisher_was_down_are_not_skipped() {
    logs();
    let ns = unique("myfirst");
    let mut db = MyDb::new(&ns, "CREATE TABLE t (id INT PRIMARY KEY)").await;
    let mut tap = Tap::new(&ns).await;
    let url = db.url.clone();
    let cfg = || my_config(&ns, &url, "[[table]]\nname = \"t\"\ncolumns = [\"*\"]\n");
    // Started and stopped before anything was written: the binlog has no slot to hold
    // its place, so the place must be in the checkpoint.
    my_start(cfg()).await.stop().await;
    db.exec("INSERT INTO t VALUES (1)").await;
    let publisher = my_start(cfg()).await;
    db.exec("INSERT INTO t VALUES (2)").await;
    tap.until(Duration::from_secs(60), |r| complete(r) >= 2)
        .await;
    publisher.stop().await;
    let e = tap.by_seq();
    assert_eq!(e.keys().copied().collect::<Vec<_>>(), [1, 2]);
    assert_eq!(e[&1].changes[0].key["id"], json!(1));
    assert_eq!(e[&1].generation, e[&2].generation, "one generation");
    tap.delete().await;
    db.drop().await;
}
