//! One source table with the column types a monolith's schema has beyond the basics
//! (domains, composite types, arrays, ranges, intervals, money, network addresses, XML,
//! bit strings, text search vectors, an enum that gains a value while running, a stored
//! generated column) mirrored into a Postgres and a SQLite store: each value arrives in
//! the form docs/wire-format.md documents for it.

mod common;

use common::boot::sqlite_store;
use common::mysql::{MyDb, MY};
use common::sub::*;
use common::*;
use kausal::subscriber::Subscriber;
use sqlx::Row as _;
use std::time::Duration;

const SCHEMA: &str = "
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (a int, b text);
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE every_type (
  id bigint PRIMARY KEY,
  doubled bigint GENERATED ALWAYS AS (id * 2) STORED,
  dom positive,
  comp pair,
  ints int[],
  texts text[],
  nums numeric[],
  flags bool[],
  stamps timestamptz[],
  grid int[][],
  r int4range,
  tr tstzrange,
  iv interval,
  m money,
  ip inet,
  net cidr,
  x xml,
  b bit(8),
  vb varbit,
  tsv tsvector,
  e mood
);
";

const COLUMNS: [&str; 19] = [
    "dom", "comp", "ints", "texts", "nums", "flags", "stamps", "grid", "r", "tr", "iv", "m", "ip",
    "net", "x", "b", "vb", "tsv", "e",
];

/// Every column of row `id` as the store holds it, as text (NULL as "NULL"); `text` is
/// the store's name of a text type in a cast.
async fn store_row(store: &sqlx::AnyPool, text: &str, id: i64) -> Option<Vec<String>> {
    let select = COLUMNS
        .iter()
        .map(|c| format!("CAST({c} AS {text})"))
        .collect::<Vec<_>>()
        .join(", ");
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {select} FROM every_type WHERE id = {id}"
    )))
    .fetch_optional(store)
    .await
    .ok()??;
    Some(
        (0..COLUMNS.len())
            .map(|i| {
                row.try_get::<Option<String>, _>(i)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "NULL".into())
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_column_type_arrives_in_its_documented_form_in_postgres_mariadb_and_sqlite_stores() {
    logs();
    let ns = unique("types");
    let db = TestDb::new(&ns, SCHEMA).await;
    let store_name = format!("{ns}_store");
    let pg_store = workload::store_db(&store_name).await;
    let sqlite = sqlite_url(&ns);
    declare_queue(&ns, &ns).await;
    declare_queue(&format!("{ns}_lite"), &ns).await;
    declare_queue(&format!("{ns}_maria"), &ns).await;
    let maria_db = MyDb::new(&format!("{ns}_maria"), "").await;
    let maria_store = format!("{MY}/{ns}_maria");
    let publisher = start(
        config(
            &ns,
            &db.url,
            "[[table]]\nname = \"every_type\"\ncolumns = [\"*\"]\n",
        ),
        &db,
    )
    .await;
    let table = format!("[[table]]\nnamespace = \"{ns}\"\nname = \"every_type\"\n");
    let pg_worker = Worker::start(Subscriber::new(sub_config(&ns, &pg_store, &table)));
    let lite_worker = Worker::start(Subscriber::new(sub_config(
        &format!("{ns}_lite"),
        &sqlite,
        &table,
    )));
    let maria_worker = Worker::start(Subscriber::new(sub_config(
        &format!("{ns}_maria"),
        &maria_store,
        &table,
    )));
    db.client
        .batch_execute(
            "INSERT INTO every_type (id, dom, comp, ints, texts, nums, flags, stamps, grid, \
               r, tr, iv, m, ip, net, x, b, vb, tsv, e) VALUES \
             (1, 7, ROW(1, 'a b'), '{1,NULL,3}', '{\"x,y\",z}', '{1.50,2}', '{t,f}', \
              '{\"2024-05-01 10:00:00+00\"}', '{{1,2},{3,4}}', '[1,5)', \
              '[2024-01-01 00:00:00+00,2024-02-01 00:00:00+00)', '1 day 02:03:04', 12.5, \
              '10.0.0.1/32', '10.0.0.0/8', '<a>b</a>', B'10101010', B'101', \
              to_tsvector('simple', 'the cat sat'), 'sad'), \
             (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
              NULL, NULL, NULL, NULL, NULL, NULL, NULL);",
        )
        .await
        .unwrap();
    // The application adds an enum value while everything runs, and uses it.
    db.client
        .batch_execute("ALTER TYPE mood ADD VALUE 'calm'")
        .await
        .unwrap();
    db.client
        .batch_execute("INSERT INTO every_type (id, e) VALUES (3, 'calm')")
        .await
        .unwrap();
    sqlx::any::install_default_drivers();
    let pg = sqlx::AnyPool::connect(&pg_store).await.unwrap();
    let lite = sqlite_store(&sqlite).await;
    let maria = sqlx::AnyPool::connect(&maria_store).await.unwrap();
    for (store, name, text) in [
        (&pg, "postgres", "TEXT"),
        (&lite, "sqlite", "TEXT"),
        (&maria, "mariadb", "CHAR"),
    ] {
        eventually(
            Duration::from_secs(60),
            "three rows in the store",
            || async { store_row(store, text, 3).await.is_some() },
        )
        .await;
        let full = store_row(store, text, 1).await.unwrap();
        let null = store_row(store, text, 2).await.unwrap();
        let added = store_row(store, text, 3).await.unwrap();
        println!("{name}: {full:?}");
        let expected = [
            "7",
            "(1,\"a b\")",
            "[1,null,3]",
            "[\"x,y\",\"z\"]",
            "[\"1.50\",\"2\"]",
            "[true,false]",
            "[\"2024-05-01T10:00:00+00:00\"]",
            "[[1,2],[3,4]]",
            "[1,5)",
            "[\"2024-01-01 00:00:00+00\",\"2024-02-01 00:00:00+00\")",
            "P1DT2H3M4S",
            "$12.50",
            "10.0.0.1",
            "10.0.0.0/8",
            "<a>b</a>",
            "10101010",
            "101",
            "'cat':2 'sat':3 'the':1",
            "sad",
        ];
        for (i, column) in COLUMNS.iter().enumerate() {
            assert_eq!(full[i], expected[i], "{name}: column {column}");
        }
        for (i, column) in COLUMNS.iter().enumerate() {
            assert_eq!(null[i], "NULL", "{name}: column {column} of the NULL row");
        }
        assert_eq!(
            added[COLUMNS.len() - 1],
            "calm",
            "{name}: the enum value added"
        );
    }
    // The domain over int is an integer column; the stored generated column is not
    // published (logical replication does not carry it), so the store has none.
    let pg_type: String = sqlx::query_scalar(
        "SELECT data_type::text FROM information_schema.columns \
         WHERE table_name = 'every_type' AND column_name = 'dom'",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(pg_type, "bigint");
    let lite_type: String = sqlx::query_scalar("SELECT typeof(dom) FROM every_type WHERE id = 1")
        .fetch_one(&lite)
        .await
        .unwrap();
    assert_eq!(lite_type, "integer");
    let maria_type: String = sqlx::query_scalar(
        "SELECT CAST(data_type AS CHAR) FROM information_schema.columns \
         WHERE table_schema = DATABASE() AND table_name = 'every_type' AND column_name = 'dom'",
    )
    .fetch_one(&maria)
    .await
    .unwrap();
    assert_eq!(maria_type, "bigint");
    for store in [&pg, &lite, &maria] {
        assert!(
            sqlx::query("SELECT doubled FROM every_type")
                .fetch_all(store)
                .await
                .is_err(),
            "no generated column in the store"
        );
    }
    pg_worker.stop().await;
    lite_worker.stop().await;
    maria_worker.stop().await;
    pg.close().await;
    lite.close().await;
    maria.close().await;
    maria_db.drop().await;
    publisher.stop().await;
    db.drop().await;
    workload::drop_store_db(&store_name).await;
    delete_queues(&ns).await;
    delete_queues(&format!("{ns}_lite")).await;
    delete_queues(&format!("{ns}_maria")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_column_listed_for_publishing_is_refused_naming_it_and_the_fix() {
    logs();
    let ns = unique("typesgen");
    let db = TestDb::new(&ns, SCHEMA).await;
    let cfg = config(
        &ns,
        &db.url,
        "[[table]]\nname = \"every_type\"\ncolumns = [\"id\", \"doubled\"]\n",
    );
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let error = kausal::publisher::run(cfg, rx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("\"doubled\"") && error.contains("generated") && error.contains("remove it"),
        "{error}"
    );
    db.drop().await;
}
