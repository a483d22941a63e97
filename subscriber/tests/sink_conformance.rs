//! The sink conformance suite: every sink — the SQL store on Postgres, MariaDB and
//! SQLite, the Redis cache as hashes and as JSON, the search index (feature `search`),
//! MongoDB (feature `mongo`) — goes through the same cases: insert/update/delete,
//! re-applying the same version, an older version replayed after a newer one, a delete
//! of an unknown key, a transaction spanning tables, an added column, unicode and large
//! values, a truncate. Against the real servers.
//!
//! How each sink gets the guarantees differs: the SQL store records applied transactions
//! in the same database transaction as the rows (a replay is skipped whole); the Redis
//! cache keeps a version per row (a replay's writes are skipped one by one). The Redis
//! cache is applied directly here, without a store in front, so its own guard is what is
//! tested.

use anyhow::{ensure, Result};
use kausal_subscriber::config::{RedisSinkConfig, TableMode};
#[cfg(feature = "mongo")]
use kausal_subscriber::sink::mongo::mongodb;
use kausal_subscriber::sink::redis::{CacheFormat, RedisSink};
use kausal_subscriber::sink::sql::SqlStore;
use kausal_subscriber::sink::{Callbacks, Sink};
use kausal_subscriber::txn::{TableShape, Transaction};
use serde_json::{json, Value};
use sqlx::{AssertSqlSafe, Row};
use std::collections::BTreeMap;
use std::sync::Arc;

mod common;

use common::build::*;
use common::*;

const REDIS: &str = "redis://127.0.0.1:6379";

/// A sink under test, and how to read a row back from it.
enum Target {
    Sql(SqlStore),
    Redis(RedisSink, redis::aio::ConnectionManager),
    /// One index per table (a search sink indexes one table), in a temporary directory.
    #[cfg(feature = "search")]
    Search(
        BTreeMap<String, kausal_subscriber::sink::search::SearchSink>,
        std::path::PathBuf,
    ),
    /// Applied directly, like the Redis cache: its own version guard is under test.
    #[cfg(feature = "mongo")]
    Mongo(kausal_subscriber::sink::mongo::MongoSink, mongodb::Database),
}

impl Drop for Target {
    fn drop(&mut self) {
        #[cfg(feature = "search")]
        if let Target::Search(sinks, dir) = self {
            sinks.clear();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A row as text, non-null columns only: what both kinds of sink can be compared on.
type Row_ = BTreeMap<String, String>;

impl Target {
    /// Applies `txs` as one group: the SQL store one transaction per group (its
    /// bookkeeping is what is tested), the other sinks all of them, then one flush (their
    /// buffered group path, with replays inside it).
    async fn apply(&self, txs: &[Arc<Transaction>]) -> Result<()> {
        match self {
            Target::Redis(sink, _) => {
                for tx in txs {
                    sink.apply(tx).await?;
                }
                return Ok(sink.flush().await?);
            }
            #[cfg(feature = "mongo")]
            Target::Mongo(sink, _) => {
                for tx in txs {
                    sink.apply(tx).await?;
                }
                return Ok(sink.flush().await?);
            }
            _ => {}
        }
        for tx in txs {
            match self {
                Target::Sql(store) => {
                    store
                        .apply_group(std::slice::from_ref(tx), &Callbacks::default())
                        .await?;
                }
                Target::Redis(..) => unreachable!("applied above"),
                #[cfg(feature = "mongo")]
                Target::Mongo(..) => unreachable!("applied above"),
                #[cfg(feature = "search")]
                Target::Search(sinks, _) => {
                    for sink in sinks.values() {
                        sink.apply(tx).await?;
                        sink.flush().await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn read(&self, shape: &TableShape, id: i64) -> Result<Option<Row_>> {
        let columns: Vec<&str> = shape.columns.iter().map(|(c, _)| c.as_str()).collect();
        match self {
            Target::Sql(store) => {
                let sql = format!(
                    "SELECT {} FROM {} WHERE id = {id}",
                    columns.join(", "),
                    shape.name
                );
                // The table appears with its first row: until then, no row.
                let row = sqlx::query(AssertSqlSafe(sql))
                    .fetch_optional(store.pool())
                    .await
                    .unwrap_or_default();
                let Some(row) = row else { return Ok(None) };
                let mut out = Row_::new();
                for (i, c) in columns.iter().enumerate() {
                    let text = if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
                        v.map(|v| v.to_string())
                    } else {
                        row.try_get::<Option<String>, _>(i)?
                    };
                    if let Some(t) = text {
                        out.insert(c.to_string(), t);
                    }
                }
                Ok(Some(out))
            }
            #[cfg(feature = "search")]
            Target::Search(sinks, _) => {
                let sink = &sinks[&shape.name];
                let key = kausal_subscriber::sink::search::SearchSink::key_text(
                    &shape.key,
                    &obj(json!({"id": id})),
                );
                Ok(sink.get(&key)?.map(|row| {
                    row.into_iter()
                        .filter(|(k, v)| columns.contains(&k.as_str()) && !v.is_null())
                        .map(|(k, v)| match v {
                            Value::String(s) => (k, s),
                            other => (k, other.to_string()),
                        })
                        .collect()
                }))
            }
            #[cfg(feature = "mongo")]
            Target::Mongo(_, db) => {
                use mongodb::bson::{doc, Bson};
                let found = db
                    .collection::<mongodb::bson::Document>(&shape.name)
                    .find_one(doc! {"_id": id})
                    .await?;
                Ok(found.map(|d| {
                    d.into_iter()
                        .filter(|(k, v)| columns.contains(&k.as_str()) && *v != Bson::Null)
                        .map(|(k, v)| match v {
                            Bson::String(s) => (k, s),
                            Bson::Int64(i) => (k, i.to_string()),
                            Bson::Int32(i) => (k, i.to_string()),
                            other => (k, other.to_string()),
                        })
                        .collect()
                }))
            }
            Target::Redis(sink, conn) => {
                let key = sink.key(&shape.name, &shape.key, &obj(json!({"id": id})));
                let mut conn = conn.clone();
                let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await?;
                let fields: BTreeMap<String, String> = match kind.as_str() {
                    "none" => return Ok(None),
                    "hash" => {
                        redis::cmd("HGETALL")
                            .arg(&key)
                            .query_async(&mut conn)
                            .await?
                    }
                    _ => {
                        let text: String =
                            redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
                        let doc: serde_json::Map<String, Value> = serde_json::from_str(&text)?;
                        doc.into_iter()
                            .filter(|(_, v)| !v.is_null())
                            .map(|(k, v)| match v {
                                Value::String(s) => (k, s),
                                other => (k, other.to_string()),
                            })
                            .collect()
                    }
                };
                Ok(Some(
                    fields
                        .into_iter()
                        .filter(|(k, _)| columns.contains(&k.as_str()))
                        .collect(),
                ))
            }
        }
    }
}

fn row(pairs: &[(&str, &str)]) -> Option<Row_> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn people(name: &str) -> Arc<TableShape> {
    shape(
        name,
        &[("id", "int8"), ("name", "text"), ("note", "text")],
        &["id"],
        TableMode::Mirror,
    )
}

async fn insert_update_delete(t: &Target, ns: &str) -> Result<()> {
    let p = people("people");
    t.apply(&[tx_in(
        ns,
        1,
        1,
        vec![insert(&p, json!({"id": 1, "name": "a", "note": "x"}))],
    )])
    .await?;
    let got = t.read(&p, 1).await?;
    ensure!(
        got == row(&[("id", "1"), ("name", "a"), ("note", "x")]),
        "insert: {got:?}"
    );
    t.apply(&[tx_in(
        ns,
        1,
        2,
        vec![update(&p, json!({"id": 1, "name": "b", "note": null}), &[])],
    )])
    .await?;
    ensure!(
        t.read(&p, 1).await? == row(&[("id", "1"), ("name", "b")]),
        "update: {:?}",
        t.read(&p, 1).await?
    );
    t.apply(&[tx_in(ns, 1, 3, vec![delete(&p, json!({"id": 1}))])])
        .await?;
    ensure!(t.read(&p, 1).await?.is_none(), "delete");
    Ok(())
}

async fn replays_change_nothing(t: &Target, ns: &str) -> Result<()> {
    let p = people("people");
    let v1 = tx_in(ns, 1, 1, vec![insert(&p, json!({"id": 1, "name": "one"}))]);
    let v2 = tx_in(
        ns,
        1,
        2,
        vec![update(&p, json!({"id": 1, "name": "two"}), &[])],
    );
    let v3 = tx_in(ns, 1, 3, vec![delete(&p, json!({"id": 1}))]);
    t.apply(&[v1.clone(), v2.clone()]).await?;
    // The same version again, then an older one (a retried group replays both).
    t.apply(&[v2.clone(), v1.clone()]).await?;
    ensure!(
        t.read(&p, 1).await? == row(&[("id", "1"), ("name", "two")]),
        "replay overwrote: {:?}",
        t.read(&p, 1).await?
    );
    // After a delete, replaying the insert must not bring the row back.
    t.apply(&[v3]).await?;
    t.apply(&[v1, v2]).await?;
    ensure!(
        t.read(&p, 1).await?.is_none(),
        "a replay resurrected a deleted row"
    );
    Ok(())
}

async fn unknown_key_delete_and_spanning_tables(t: &Target, ns: &str) -> Result<()> {
    let (a, b) = (people("alpha"), people("beta"));
    t.apply(&[tx_in(ns, 1, 1, vec![delete(&a, json!({"id": 42}))])])
        .await?;
    ensure!(t.read(&a, 42).await?.is_none());
    t.apply(&[tx_in(
        ns,
        1,
        2,
        vec![
            insert(&a, json!({"id": 1, "name": "in alpha"})),
            insert(&b, json!({"id": 1, "name": "in beta"})),
        ],
    )])
    .await?;
    ensure!(t.read(&a, 1).await? == row(&[("id", "1"), ("name", "in alpha")]));
    ensure!(t.read(&b, 1).await? == row(&[("id", "1"), ("name", "in beta")]));
    Ok(())
}

async fn an_added_column_arrives(t: &Target, ns: &str) -> Result<()> {
    let v1 = people("people");
    let v2 = shape(
        "people",
        &[
            ("id", "int8"),
            ("name", "text"),
            ("note", "text"),
            ("age", "int4"),
        ],
        &["id"],
        TableMode::Mirror,
    );
    t.apply(&[tx_in(
        ns,
        1,
        1,
        vec![insert(&v1, json!({"id": 1, "name": "a"}))],
    )])
    .await?;
    t.apply(&[tx_in(
        ns,
        1,
        2,
        vec![insert(&v2, json!({"id": 2, "name": "b", "age": 30}))],
    )])
    .await?;
    ensure!(
        t.read(&v2, 2).await? == row(&[("id", "2"), ("name", "b"), ("age", "30")]),
        "added column: {:?}",
        t.read(&v2, 2).await?
    );
    ensure!(t.read(&v2, 1).await? == row(&[("id", "1"), ("name", "a")]));
    Ok(())
}

async fn unicode_and_large_values_survive(t: &Target, ns: &str) -> Result<()> {
    let p = people("people");
    let unicode = "Grüße 😀 naïve ∑ 日本語 \u{0}?".replace('\u{0}', "");
    let large: String = "0123456789abcdef".repeat(64 * 1024); // 1 MiB
    t.apply(&[tx_in(
        ns,
        1,
        1,
        vec![insert(&p, json!({"id": 7, "name": unicode, "note": large}))],
    )])
    .await?;
    let got = t.read(&p, 7).await?.unwrap_or_default();
    ensure!(
        got.get("name") == Some(&unicode),
        "unicode: {:?}",
        got.get("name")
    );
    ensure!(got.get("note") == Some(&large), "large value changed");
    Ok(())
}

async fn a_truncate_empties_the_table_and_stays_newer(t: &Target, ns: &str) -> Result<()> {
    let p = people("people");
    let v1 = tx_in(ns, 1, 1, vec![insert(&p, json!({"id": 1, "name": "one"}))]);
    t.apply(std::slice::from_ref(&v1)).await?;
    t.apply(&[tx_in(ns, 1, 2, vec![truncate(&p)])]).await?;
    ensure!(t.read(&p, 1).await?.is_none(), "the truncate left the row");
    // A replayed write from before the truncate stays away; a later one arrives.
    t.apply(&[v1]).await?;
    ensure!(
        t.read(&p, 1).await?.is_none(),
        "a replay came back after the truncate"
    );
    t.apply(&[tx_in(
        ns,
        1,
        3,
        vec![insert(&p, json!({"id": 2, "name": "two"}))],
    )])
    .await?;
    ensure!(t.read(&p, 2).await? == row(&[("id", "2"), ("name", "two")]));
    Ok(())
}

async fn a_transaction_may_change_a_row_twice(t: &Target, ns: &str) -> Result<()> {
    let p = people("people");
    t.apply(&[tx_in(
        ns,
        1,
        1,
        vec![
            insert(&p, json!({"id": 1, "name": "first"})),
            update(&p, json!({"id": 1, "name": "second"}), &[]),
            insert(&p, json!({"id": 2, "name": "gone"})),
            delete(&p, json!({"id": 2})),
        ],
    )])
    .await?;
    let got = t.read(&p, 1).await?;
    ensure!(
        got == row(&[("id", "1"), ("name", "second")]),
        "insert then update: {got:?}"
    );
    ensure!(
        t.read(&p, 2).await?.is_none(),
        "insert then delete left the row"
    );
    Ok(())
}

/// Every case, each on a fresh target from `make` (fresh database or key prefix).
async fn conformance<F, Fut>(make: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(Target, Option<TestDb>)>>,
{
    macro_rules! case {
        ($f:ident) => {{
            let (target, _db) = make().await?;
            $f(&target, "app")
                .await
                .map_err(|e| e.context(stringify!($f)))?;
        }};
    }
    case!(insert_update_delete);
    case!(replays_change_nothing);
    case!(unknown_key_delete_and_spanning_tables);
    case!(an_added_column_arrives);
    case!(unicode_and_large_values_survive);
    case!(a_truncate_empties_the_table_and_stays_newer);
    case!(a_transaction_may_change_a_row_twice);
    Ok(())
}

async fn sql(server: Server) -> Result<(Target, Option<TestDb>)> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    Ok((Target::Sql(store), Some(db)))
}

async fn redis_cache(format: CacheFormat) -> Result<(Target, Option<TestDb>)> {
    let prefix = format!(
        "t_conf_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let cfg: RedisSinkConfig = toml::from_str(&format!(
        "url = \"{REDIS}\"\nprefix = \"{prefix}\"\nformat = \"{}\"",
        if format == CacheFormat::Json {
            "json"
        } else {
            "hash"
        }
    ))?;
    let sink = RedisSink::connect(&cfg).await?;
    let conn = redis::aio::ConnectionManager::new(redis::Client::open(REDIS)?).await?;
    Ok((Target::Redis(sink, conn), None))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_postgres_store_passes_the_sink_conformance_suite() -> Result<()> {
    conformance(|| sql(Server::Postgres)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mariadb_store_passes_the_sink_conformance_suite() -> Result<()> {
    conformance(|| sql(Server::MariaDb)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sqlite_store_passes_the_sink_conformance_suite() -> Result<()> {
    conformance(|| sql(Server::Sqlite)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_redis_hash_cache_passes_the_sink_conformance_suite() -> Result<()> {
    conformance(|| redis_cache(CacheFormat::Hash)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_redis_json_cache_passes_the_sink_conformance_suite() -> Result<()> {
    conformance(|| redis_cache(CacheFormat::Json)).await
}

#[cfg(feature = "search")]
async fn search_index() -> Result<(Target, Option<TestDb>)> {
    use kausal_subscriber::sink::search::{SearchSink, SearchSinkConfig};
    let dir = std::env::temp_dir().join(format!(
        "kausal-search-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    let mut sinks = BTreeMap::new();
    for table in ["people", "alpha", "beta"] {
        let cfg = SearchSinkConfig {
            path: dir.join(table),
            table: table.to_string(),
            text: vec!["name".into(), "note".into()],
            keyword: vec!["id".into()],
            number: vec![],
        };
        sinks.insert(table.to_string(), SearchSink::open(&cfg)?);
    }
    Ok((Target::Search(sinks, dir), None))
}

#[cfg(feature = "search")]
#[tokio::test(flavor = "multi_thread")]
async fn the_search_index_passes_the_sink_conformance_suite() -> Result<()> {
    conformance(search_index).await
}

#[cfg(feature = "mongo")]
fn mongo_url() -> String {
    std::env::var("KAUSAL_TEST_MONGO_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into())
}

/// A fresh database per case, named `<run>_<n>` so the test can drop them all after.
#[cfg(feature = "mongo")]
async fn mongo_docs(run: &str) -> Result<(Target, Option<TestDb>)> {
    use kausal_subscriber::sink::mongo::{MongoSink, MongoSinkConfig};
    static CASE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let database = format!("{run}_{n}");
    let cfg: MongoSinkConfig = toml::from_str(&format!(
        "url = \"{}\"\ndatabase = \"{database}\"",
        mongo_url()
    ))?;
    let sink = MongoSink::connect(&cfg).await?;
    let db = mongodb::Client::with_uri_str(mongo_url())
        .await?
        .database(&database);
    Ok((Target::Mongo(sink, db), None))
}

#[cfg(feature = "mongo")]
#[tokio::test(flavor = "multi_thread")]
async fn the_mongo_sink_passes_the_sink_conformance_suite() -> Result<()> {
    let run = format!("t_conf_{}", std::process::id());
    let result = conformance(|| mongo_docs(&run)).await;
    let client = mongodb::Client::with_uri_str(mongo_url()).await?;
    for name in client.list_database_names().await? {
        if name.starts_with(&format!("{run}_")) {
            client.database(&name).drop().await?;
        }
    }
    result
}

/// A standalone server (nx-27017 here) has no transactions: the sink says so and uses
/// guarded writes; a replica set (KAUSAL_TEST_MONGO_URL with `replicaSet=`) gets one
/// MongoDB transaction per source transaction.
#[cfg(feature = "mongo")]
#[tokio::test(flavor = "multi_thread")]
async fn the_mongo_sink_uses_transactions_exactly_on_a_replica_set() -> Result<()> {
    let (target, _) = mongo_docs(&format!("t_txn_{}", std::process::id())).await?;
    let Target::Mongo(sink, db) = &target else {
        unreachable!()
    };
    let hello = db.run_command(mongodb::bson::doc! {"hello": 1}).await?;
    let replica_set = hello.get_str("setName").is_ok();
    ensure!(
        sink.uses_transactions() == replica_set,
        "transactions {} on a server with setName {:?}",
        sink.uses_transactions(),
        hello.get_str("setName").ok()
    );
    db.drop().await?;
    Ok(())
}
