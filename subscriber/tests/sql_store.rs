//! The SQL store against the real servers: Postgres (127.0.0.1:5432, user postgres,
//! trust), MariaDB (127.0.0.1:3306, user kausal/kausal) and SQLite (a temporary file).
//! Every test gets a fresh database, dropped when the test ends (even when it fails), so
//! the tests run in parallel.

use anyhow::{bail, ensure, Result};
use kausal_subscriber::config::TableMode;
use kausal_subscriber::sink::sql::{Dialect, SqlStore};
use kausal_subscriber::sink::{CallbackError, Callbacks};
use kausal_subscriber::txn::TableShape;
use kausal_subscriber::SinkError;
use serde_json::{json, Value};
use sqlx::Executor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[macro_use]
mod common;

use common::build::*;
use common::*;

fn items_v1() -> Arc<TableShape> {
    shape(
        "items",
        &[
            ("id", "int4"),
            ("name", "text"),
            ("score", "float8"),
            ("active", "bool"),
            ("doc", "jsonb"),
        ],
        &["id"],
        TableMode::Mirror,
    )
}

const ITEMS: &str = "SELECT id, name, score, CASE WHEN active THEN 1 ELSE 0 END, doc, _kausal_seq \
                     FROM items ORDER BY id";

async fn mirror_follows_the_source(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let none = Callbacks::default();
    let items = items_v1();
    let row = |id: i64, name: &str| json!({"id": id, "name": name, "score": 1.5, "active": true, "doc": {"k": [id]}});
    let first = tx(
        1,
        vec![
            insert(&items, row(1, "a")),
            insert(&items, row(2, "b")),
            insert(&items, row(3, "c")),
        ],
    );
    assert_eq!(store.apply_group(&[first], &none).await?, [true]);

    // An update that did not log `doc` (unchanged TOAST), a key change, a delete.
    let renamed = update(
        &items,
        json!({"id": 1, "name": "a2", "score": 2.5, "active": false}),
        &["doc"],
    );
    let mut moved = update(&items, row(20, "b"), &[]);
    moved.old_key = Some(obj(json!({"id": 2})));
    let group = [
        tx(2, vec![renamed]),
        tx(3, vec![moved]),
        tx(4, vec![delete(&items, json!({"id": 3}))]),
    ];
    assert_eq!(store.apply_group(&group, &none).await?, [true, true, true]);
    assert_eq!(
        rows(&store, ITEMS).await?,
        [
            vec![
                json!(1),
                json!("a2"),
                json!(2.5),
                json!(0),
                json!("{\"k\":[1]}"),
                json!(2)
            ],
            vec![
                json!(20),
                json!("b"),
                json!(1.5),
                json!(1),
                json!("{\"k\":[20]}"),
                json!(3)
            ],
        ]
    );

    // A column added at the source reaches the mirrored table.
    let items_v2 = shape(
        "items",
        &[("id", "int4"), ("name", "text"), ("note", "varchar")],
        &["id"],
        TableMode::Mirror,
    );
    let noted = insert(
        &items_v2,
        json!({"id": 5, "name": "e", "note": "new column"}),
    );
    assert_eq!(
        store.apply_group(&[tx(5, vec![noted])], &none).await?,
        [true]
    );
    assert_eq!(
        rows(&store, "SELECT id, note FROM items WHERE id = 5").await?,
        [vec![json!(5), json!("new column")]]
    );

    assert_eq!(
        store
            .apply_group(&[tx(6, vec![truncate(&items_v2)])], &none)
            .await?,
        [true]
    );
    assert_eq!(
        rows(&store, "SELECT COUNT(*) FROM items").await?,
        [vec![json!(0)]]
    );
    Ok(())
}

async fn duplicates_change_nothing(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut callbacks = Callbacks::default();
    let counter = calls.clone();
    callbacks.on_change("items", move |_: kausal_subscriber::Event<Value>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    let items = items_v1();
    let first = tx(5, vec![insert(&items, json!({"id": 1, "name": "first"}))]);
    assert_eq!(
        store
            .apply_group(&[first.clone(), first.clone()], &callbacks)
            .await?,
        [true, false]
    );

    // A redelivery in a later group, even with other content, is recognised by its seq.
    let again = tx(
        5,
        vec![
            insert(&items, json!({"id": 1, "name": "second"})),
            insert(&items, json!({"id": 2})),
        ],
    );
    assert_eq!(store.apply_group(&[again], &callbacks).await?, [false]);
    assert_eq!(
        rows(&store, "SELECT id, name FROM items").await?,
        [vec![json!(1), json!("first")]]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Still recognised once compaction moved it from kausal_applied to the watermark.
    store.compact("app", 1, 5).await?;
    assert_eq!(store.apply_group(&[first], &callbacks).await?, [false]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    Ok(())
}

/// Two transactions applied in one store transaction (as a chain is): each callback
/// reads, through its event's store transaction, the rows written so far in it — its
/// own and the other's — which a connection of its own would not see before the
/// commit. A handle kept past the callback refuses to be used.
async fn callbacks_read_through_the_store_transaction(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let items = items_v1();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = Arc::new(std::sync::Mutex::new(None));
    let mut callbacks = Callbacks::default();
    let (s, k) = (seen.clone(), kept.clone());
    callbacks.on_insert("items", move |e: kausal_subscriber::Event<Value>| {
        let (s, k) = (s.clone(), k.clone());
        async move {
            let mut conn = e.store.conn().await?;
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items")
                .fetch_one(&mut *conn)
                .await?;
            drop(conn);
            s.lock().unwrap().push(count);
            *k.lock().unwrap() = Some(e.store.clone());
            Ok(())
        }
    });
    // Each callback sees the store as of its transaction: its own row and those before
    // it, not the delete that comes after it in the same group.
    let group = [
        tx(1, vec![insert(&items, json!({"id": 1, "name": "a"}))]),
        tx(2, vec![insert(&items, json!({"id": 2, "name": "b"}))]),
        tx(3, vec![delete(&items, json!({"id": 1}))]),
    ];
    assert_eq!(
        store.apply_group(&group, &callbacks).await?,
        [true, true, true]
    );
    assert_eq!(*seen.lock().unwrap(), [1, 2]);
    assert_eq!(
        rows(&store, "SELECT id FROM items ORDER BY id").await?,
        [vec![json!(2)]]
    );
    let handle = kept.lock().unwrap().take();
    let Some(handle) = handle else {
        bail!("no callback ran")
    };
    match handle.conn().await {
        Err(error) => ensure!(error.message.contains("ended"), "{}", error.message),
        Ok(_) => bail!("the store transaction is usable after its commit"),
    }
    Ok(())
}

fn accounts(server: Server, extra: &[(&'static str, &'static str)]) -> Arc<TableShape> {
    let mut columns = vec![
        ("id", "int8"),
        ("owner", "text"),
        ("balance", "numeric"),
        ("opened", "timestamptz"),
        ("meta", "jsonb"),
    ];
    if server == Server::Postgres {
        columns.push(("tags", "_int4"));
    }
    columns.extend_from_slice(extra);
    shape("accounts", &columns, &["id"], TableMode::Map)
}

async fn create_accounts(store: &SqlStore) -> Result<()> {
    let ddl = match store.dialect() {
        Dialect::Postgres => {
            "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, \
             balance numeric(12,2), opened timestamptz, meta jsonb, tags int4[], \
             note text DEFAULT 'mine')"
        }
        Dialect::MySql => {
            "CREATE TABLE accounts (id BIGINT PRIMARY KEY, owner VARCHAR(100) NOT NULL, \
             balance DECIMAL(12,2), opened DATETIME(6), meta JSON, note VARCHAR(20) DEFAULT 'mine')"
        }
        Dialect::Sqlite => {
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, \
             balance NUMERIC, opened TEXT, meta TEXT, note TEXT DEFAULT 'mine')"
        }
    };
    store.pool().execute(ddl).await?;
    Ok(())
}

async fn map_mode_writes_into_the_user_table(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    create_accounts(&store).await?;
    let none = Callbacks::default();
    let shape = accounts(server, &[]);
    let opened = "2024-01-02T03:04:05.123456+00:00";
    let account = |id: i64, owner: &str, balance: &str| {
        json!({"id": id, "owner": owner, "balance": balance, "opened": opened,
               "meta": {"tier": "gold"}, "tags": [1, 2]})
    };
    let first = tx(
        1,
        vec![
            insert(&shape, account(1, "ann", "12.50")),
            insert(&shape, account(2, "bob", "1")),
        ],
    );
    assert_eq!(store.apply_group(&[first], &none).await?, [true]);
    let paid = update(
        &shape,
        json!({"id": 1, "owner": "ann", "balance": "99.99", "opened": opened}),
        &["meta", "tags"],
    );
    let closed = delete(&shape, json!({"id": 2}));
    assert_eq!(
        store
            .apply_group(&[tx(2, vec![paid]), tx(3, vec![closed])], &none)
            .await?,
        [true, true]
    );

    let (sql, expected) = match server {
        Server::Postgres => (
            "SELECT id, owner, balance::text, \
             (opened = timestamptz '2024-01-02T03:04:05.123456+00:00'), meta->>'tier', \
             tags::text, note FROM accounts",
            vec![
                json!(1),
                json!("ann"),
                json!("99.99"),
                json!(true),
                json!("gold"),
                json!("{1,2}"),
                json!("mine"),
            ],
        ),
        Server::MariaDb => (
            "SELECT id, owner, CAST(balance AS CHAR), CAST(opened AS CHAR), \
             JSON_VALUE(meta, '$.tier'), note FROM accounts",
            vec![
                json!(1),
                json!("ann"),
                json!("99.99"),
                json!("2024-01-02 03:04:05.123456"),
                json!("gold"),
                json!("mine"),
            ],
        ),
        Server::Sqlite => (
            "SELECT id, owner, CAST(balance AS TEXT), opened, json_extract(meta, '$.tier'), \
             note FROM accounts",
            vec![
                json!(1),
                json!("ann"),
                json!("99.99"),
                json!(opened),
                json!("gold"),
                json!("mine"),
            ],
        ),
    };
    assert_eq!(rows(&store, sql).await?, [expected]);
    Ok(())
}

async fn map_mode_explains_what_is_missing(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let none = Callbacks::default();
    let rejected = |result: Result<Vec<bool>, SinkError>, wanted: &[&str]| -> Result<()> {
        match result {
            Err(SinkError::Rejected { table, reason }) => {
                for w in wanted {
                    ensure!(
                        reason.contains(w),
                        "`{reason}` does not mention {w} (table {table})"
                    );
                }
                Ok(())
            }
            other => bail!("expected a rejection, got {other:?}"),
        }
    };
    let shape = accounts(server, &[]);
    let row = json!({"id": 1, "owner": "ann"});
    let missing_table = store
        .apply_group(&[tx(1, vec![insert(&shape, row.clone())])], &none)
        .await;
    rejected(missing_table, &["`accounts`", "does not exist"])?;

    create_accounts(&store).await?;
    let wider = accounts(server, &[("nickname", "text")]);
    let missing_column = store
        .apply_group(&[tx(1, vec![insert(&wider, row.clone())])], &none)
        .await;
    rejected(missing_column, &["`nickname`", "accounts"])?;

    store
        .pool()
        .execute("CREATE TABLE loose (id BIGINT, owner TEXT)")
        .await?;
    let loose = shape_named("loose", &shape);
    let no_key = store
        .apply_group(&[tx(1, vec![insert(&loose, row)])], &none)
        .await;
    rejected(no_key, &["primary key", "(id)"])?;
    assert_eq!(store.progress("app", 1).await?, (0, vec![]));
    Ok(())
}

fn shape_named(name: &str, like: &TableShape) -> Arc<TableShape> {
    Arc::new(TableShape {
        name: name.to_string(),
        columns: vec![
            ("id".into(), "int8".into()),
            ("owner".into(), "text".into()),
        ],
        ..like.clone()
    })
}

async fn failing_callback_rolls_back(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let items = items_v1();
    let mut callbacks = Callbacks::default();
    callbacks.on_insert(
        "items",
        |event: kausal_subscriber::Event<Value>| async move {
            if event.key["id"] == json!(2) {
                return Err(CallbackError::permanent("no id 2"));
            }
            Ok(())
        },
    );
    let group = [
        tx(1, vec![insert(&items, json!({"id": 1}))]),
        tx(2, vec![insert(&items, json!({"id": 2}))]),
    ];
    match store.apply_group(&group, &callbacks).await {
        Err(SinkError::Callback { message, .. }) => assert_eq!(message, "no id 2"),
        other => bail!("expected the callback's error, got {other:?}"),
    }
    assert_eq!(
        rows(&store, "SELECT COUNT(*) FROM items").await?,
        [vec![json!(0)]]
    );
    assert_eq!(store.progress("app", 1).await?, (0, vec![]));

    // The caller retries one by one: the first goes through.
    assert_eq!(store.apply_group(&group[..1], &callbacks).await?, [true]);
    assert_eq!(
        rows(&store, "SELECT id FROM items").await?,
        [vec![json!(1)]]
    );
    Ok(())
}

/// Worker A is inside its transaction (in a callback) when worker B applies and commits
/// the same transaction: A must fail with the concurrent-apply error, not apply twice.
/// Two workers applying the same transaction at once (a publisher's replay delivered to
/// both): the first claims it, the second waits for that claim's commit and then fails as
/// a concurrent apply before running any callback; retried, it finds it applied.
async fn concurrent_apply_is_detected(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let (a, b) = (db.store().await?, db.store().await?);
    let audit = shape("audit", &[("id", "int8")], &["id"], TableMode::None);
    let same = tx(7, vec![insert(&audit, json!({"id": 1}))]);
    let entered = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let mut slow = Callbacks::default();
    let (e, r) = (entered.clone(), release.clone());
    slow.on_change("audit", move |_: kausal_subscriber::Event<Value>| {
        let (e, r) = (e.clone(), r.clone());
        async move {
            e.notify_one();
            r.notified().await;
            Ok(())
        }
    });
    let calls_b = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut counting = Callbacks::default();
    let c = calls_b.clone();
    counting.on_change("audit", move |_: kausal_subscriber::Event<Value>| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok(()) }
    });
    let worker_a = {
        let (a, same, slow) = (a.clone(), same.clone(), slow.clone());
        tokio::spawn(async move { a.apply_group(&[same], &slow).await })
    };
    // A has claimed the transaction and is in its callback.
    entered.notified().await;
    let worker_b = {
        let (b, same, counting) = (b.clone(), same.clone(), counting.clone());
        tokio::spawn(async move { b.apply_group(&[same], &counting).await })
    };
    // B waits on A's claim; once A commits, B fails without calling back.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    release.notify_one();
    assert_eq!(worker_a.await??, [true]);
    match worker_b.await? {
        Err(SinkError::ConcurrentApply { .. }) => {}
        // B reached the store only after A's commit: it saw the transaction applied.
        Ok(flags) if flags == [false] => {}
        other => bail!("expected a concurrent-apply error, got {other:?}"),
    }
    assert_eq!(
        calls_b.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "B called back"
    );
    assert_eq!(b.apply_group(&[same], &counting).await?, [false]);
    assert_eq!(
        calls_b.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "B called back"
    );
    Ok(())
}

scenario_tests!(mirror_follows_the_source:
    mirror_table_follows_inserts_updates_and_deletes_on_postgres => Server::Postgres,
    mirror_table_follows_inserts_updates_and_deletes_on_mariadb => Server::MariaDb,
    mirror_table_follows_inserts_updates_and_deletes_on_sqlite => Server::Sqlite,
);
scenario_tests!(duplicates_change_nothing:
    duplicate_transaction_changes_nothing_on_postgres => Server::Postgres,
    duplicate_transaction_changes_nothing_on_mariadb => Server::MariaDb,
    duplicate_transaction_changes_nothing_on_sqlite => Server::Sqlite,
);
scenario_tests!(callbacks_read_through_the_store_transaction:
    callbacks_read_the_rows_of_their_store_transaction_through_the_event_on_postgres => Server::Postgres,
    callbacks_read_the_rows_of_their_store_transaction_through_the_event_on_mariadb => Server::MariaDb,
    callbacks_read_the_rows_of_their_store_transaction_through_the_event_on_sqlite => Server::Sqlite,
);
scenario_tests!(map_mode_writes_into_the_user_table:
    map_mode_writes_into_a_user_table_on_postgres => Server::Postgres,
    map_mode_writes_into_a_user_table_on_mariadb => Server::MariaDb,
    map_mode_writes_into_a_user_table_on_sqlite => Server::Sqlite,
);
scenario_tests!(map_mode_explains_what_is_missing:
    map_mode_names_a_missing_table_column_or_key_on_postgres => Server::Postgres,
    map_mode_names_a_missing_table_column_or_key_on_mariadb => Server::MariaDb,
    map_mode_names_a_missing_table_column_or_key_on_sqlite => Server::Sqlite,
);
scenario_tests!(failing_callback_rolls_back:
    failing_callback_rolls_back_the_group_on_postgres => Server::Postgres,
    failing_callback_rolls_back_the_group_on_mariadb => Server::MariaDb,
    failing_callback_rolls_back_the_group_on_sqlite => Server::Sqlite,
);
// SQLite has one writer: the second worker would wait for the first instead of racing.
scenario_tests!(concurrent_apply_is_detected:
    concurrent_apply_calls_back_once_and_fails_the_later_worker_on_postgres => Server::Postgres,
    concurrent_apply_calls_back_once_and_fails_the_later_worker_on_mariadb => Server::MariaDb,
);

#[tokio::test]
async fn unreachable_store_is_reported_without_its_password() -> Result<()> {
    let error = SqlStore::connect("postgres://postgres:hunter2@127.0.0.1:1/app")
        .await
        .expect_err("nothing listens on port 1");
    match &error {
        SinkError::Unreachable { endpoint, .. } => {
            assert_eq!(endpoint, "postgres://postgres:***@127.0.0.1:1/app")
        }
        other => bail!("expected Unreachable, got {other:?}"),
    }
    assert!(!format!("{error} {error:?}").contains("hunter2"));
    Ok(())
}

#[tokio::test]
async fn sqlite_store_creates_its_file() -> Result<()> {
    let db = TestDb::create(Server::Sqlite).await?;
    let store = db.store().await?;
    assert_eq!(store.dialect(), Dialect::Sqlite);
    let path = db.url.trim_start_matches("sqlite://").to_string();
    assert!(std::path::Path::new(&path).exists());
    assert_eq!(
        rows(&store, "PRAGMA journal_mode").await?,
        [vec![json!("wal")]]
    );
    Ok(())
}
