//! Parts of split transactions staged in the SQL store, against the real servers:
//! Postgres (127.0.0.1:5432, user postgres, trust), MariaDB (127.0.0.1:3306, user
//! kausal/kausal) and SQLite (a temporary file). Every test gets a fresh database,
//! dropped when the test ends (even when it fails), so the tests run in parallel.

use anyhow::{bail, ensure, Result};
use kausal_bus::{Change, Column, Context, Dep, DepKind, Envelope, Op, TableSchema};
use kausal_subscriber::mapping::{Mapping, StagedFold};
use kausal_subscriber::sink::sql::SqlStore;
use kausal_subscriber::sink::{CallbackError, Callbacks, Event};
use kausal_subscriber::txn::{Transaction, TxId};
use kausal_subscriber::SubscriberConfig;
use serde_json::{json, Map, Value};
use sqlx::{AssertSqlSafe, Row};
use std::sync::{Arc, Mutex};

#[macro_use]
mod common;

use common::*;

fn obj(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// Part `part` of transaction `seq` (namespace `app`, generation 1), split into
/// `parts`: two inserts and a dependency each, `parts` set on the last one only.
fn part(seq: u64, part: u32, parts: u32) -> Envelope {
    let id = |n: u32| i64::from(n) + seq as i64 * 1000;
    let insert = |id: i64| Change {
        op: Op::Insert,
        table: "items".into(),
        key: obj(json!({"id": id})),
        old_key: None,
        new: Some(obj(
            json!({"id": id, "name": format!("row {id}"), "doc": {"n": [id]}}),
        )),
        old: None,
        unchanged: Vec::new(),
    };
    Envelope {
        namespace: "app".into(),
        generation: 1,
        seq,
        part,
        parts: (part + 1 == parts).then_some(parts),
        position: format!("pg:0/{seq}"),
        commit_ts_us: 1_700_000_000_000_000 + seq as i64,
        txid: seq.to_string(),
        context: Context {
            user: Some("ann".into()),
            ..Context::default()
        },
        schemas: vec![TableSchema {
            table: "items".into(),
            columns: [("id", "int8"), ("name", "text"), ("doc", "jsonb")]
                .iter()
                .map(|(name, ty)| Column {
                    name: name.to_string(),
                    type_name: ty.to_string(),
                })
                .collect(),
            key: vec!["id".into()],
            changed: false,
        }],
        changes: vec![insert(id(2 * part)), insert(id(2 * part + 1))],
        deps: vec![Dep {
            k: part,
            v: seq,
            kind: DepKind::Write,
            after: seq - 1,
        }],
        snapshot: None,
    }
}

fn all_parts(seq: u64, parts: u32) -> Vec<Envelope> {
    (0..parts).map(|p| part(seq, p, parts)).collect()
}

fn id(seq: u64) -> TxId {
    TxId {
        namespace: "app".into(),
        generation: 1,
        seq,
    }
}

/// What the worker does with a complete set: reads the parts back one at a time and
/// admits the transaction without its changes.
async fn admit_staged(store: &SqlStore, seq: u64, total: u32) -> Result<Arc<Transaction>> {
    let cfg = SubscriberConfig::new("t", "amqp://unused", "sqlite://unused").subscribe(
        "app",
        "items",
        &[],
    );
    let mut mapping = Mapping::new(&cfg);
    let mut fold = StagedFold::default();
    for p in 0..total {
        let Some(envelope) = store.staged_part(&id(seq), p).await? else {
            bail!("part {p} of seq {seq} is not staged");
        };
        mapping.stage(&mut fold, &envelope)?;
    }
    Ok(Arc::new(mapping.finish_staged(fold)))
}

async fn count(store: &SqlStore, table: &str) -> Result<i64> {
    let row = sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(store.pool())
        .await?;
    Ok(row.try_get(0)?)
}

/// The transaction `apply_group` gets once its parts are assembled; the store only
/// looks at its id and `parts` here.
fn assembled(seq: u64, parts: u32) -> Arc<Transaction> {
    Arc::new(Transaction {
        id: TxId {
            namespace: "app".into(),
            generation: 1,
            seq,
        },
        position: format!("pg:0/{seq}"),
        commit_ts_us: 1_700_000_000_000_000 + seq as i64,
        txid: seq.to_string(),
        context: Context::default(),
        changes: Vec::new(),
        deps: Vec::new(),
        tables: Vec::new(),
        parts,
        staged: None,
        part: None,
    })
}

/// Staged rows of `seq`, or of every transaction when `seq` is `None`.
async fn staged_rows(store: &SqlStore, seq: Option<u64>) -> Result<i64> {
    let sql = match seq {
        Some(seq) => format!("SELECT COUNT(*) FROM kausal_parts WHERE seq = {seq}"),
        None => "SELECT COUNT(*) FROM kausal_parts".to_string(),
    };
    let row = sqlx::query(AssertSqlSafe(sql))
        .fetch_one(store.pool())
        .await?;
    Ok(row.try_get(0)?)
}

async fn out_of_order_parts_complete_with_the_last_missing_one(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let staged = all_parts(4, 4);
    // The last part (with the count) early, then duplicates of parts already staged.
    for p in [2, 3, 0, 3, 2, 0] {
        let returned = store.stage_part(&staged[p]).await?;
        ensure!(
            returned.is_none(),
            "complete after part {p} with part 1 missing"
        );
    }
    assert_eq!(staged_rows(&store, Some(4)).await?, 4 - 1);
    assert_eq!(store.stage_part(&staged[1]).await?, Some(4));
    // A redelivery of any part once all are there says the set is complete again.
    assert_eq!(store.stage_part(&staged[0]).await?, Some(4));
    assert_eq!(staged_rows(&store, Some(4)).await?, 4);
    for (p, envelope) in staged.iter().enumerate() {
        assert_eq!(
            store.staged_part(&id(4), p as u32).await?.as_ref(),
            Some(envelope)
        );
    }

    // Without the part that carries the count, the set is never complete.
    let unknown = all_parts(5, 3);
    for envelope in &unknown[..2] {
        assert_eq!(store.stage_part(envelope).await?, None);
    }
    Ok(())
}

/// Two workers (two pools on one database) stage alternate parts at the same time. The
/// one whose commit comes last must see them all.
async fn concurrent_workers_complete_the_set(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let (a, b) = (db.store().await?, db.store().await?);
    let parts = 12;
    let staged = all_parts(9, parts);
    let worker = |store: SqlStore, mine: Vec<Envelope>| {
        tokio::spawn(async move {
            let mut completed = Vec::new();
            for envelope in &mine {
                if let Some(set) = store.stage_part(envelope).await? {
                    completed.push(set);
                }
            }
            anyhow::Ok(completed)
        })
    };
    let (evens, odds): (Vec<Envelope>, Vec<Envelope>) =
        staged.iter().cloned().partition(|e| e.part % 2 == 0);
    let (from_a, from_b) = (worker(a.clone(), evens), worker(b.clone(), odds));
    let completed: Vec<u32> = [from_a.await??, from_b.await??].concat();
    ensure!(!completed.is_empty(), "no worker saw the complete set");
    for total in completed {
        assert_eq!(total, parts);
    }
    assert_eq!(staged_rows(&a, Some(9)).await?, i64::from(parts));
    Ok(())
}

async fn recovery_finds_complete_sets_until_applied(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    assert_eq!(store.staged_complete().await?, Vec::new());

    // Seq 6 complete (the worker crashed before applying it), seq 8 still missing part 1.
    let six = all_parts(6, 3);
    for envelope in six.iter().rev() {
        store.stage_part(envelope).await?;
    }
    let eight = all_parts(8, 2);
    store.stage_part(&eight[0]).await?;
    assert_eq!(store.staged_complete().await?, [(id(6), 3)]);

    let none = Callbacks::default();
    assert_eq!(store.apply_group(&[assembled(6, 3)], &none).await?, [true]);
    assert_eq!(store.staged_complete().await?, Vec::new());
    assert_eq!(staged_rows(&store, Some(6)).await?, 0);

    // A redelivered part restaged after the apply is dropped again, not recovered.
    assert_eq!(store.stage_part(&six[1]).await?, None);
    assert_eq!(staged_rows(&store, Some(6)).await?, 0);

    // Compaction forgets the incomplete leftovers it covers.
    assert_eq!(staged_rows(&store, Some(8)).await?, 1);
    store.compact("app", 1, 8).await?;
    assert_eq!(staged_rows(&store, None).await?, 0);
    Ok(())
}

async fn parts_of_applied_transactions_are_dropped(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let none = Callbacks::default();

    // Recorded in kausal_applied.
    assert_eq!(store.apply_group(&[assembled(3, 2)], &none).await?, [true]);
    for envelope in &all_parts(3, 2) {
        assert_eq!(store.stage_part(envelope).await?, None);
    }
    assert_eq!(staged_rows(&store, Some(3)).await?, 0);

    // Covered by the compacted watermark.
    store.compact("app", 1, 3).await?;
    assert_eq!(store.stage_part(&part(2, 0, 2)).await?, None);
    assert_eq!(staged_rows(&store, Some(2)).await?, 0);

    // A part staged by a worker that lost the race with the apply (whose cleanup had
    // already run; `parts` of 1 skips it here): the next part of it clears it.
    assert_eq!(store.stage_part(&part(5, 0, 2)).await?, None);
    assert_eq!(store.apply_group(&[assembled(5, 1)], &none).await?, [true]);
    assert_eq!(staged_rows(&store, Some(5)).await?, 1);
    assert_eq!(store.stage_part(&part(5, 1, 2)).await?, None);
    assert_eq!(staged_rows(&store, None).await?, 0);
    Ok(())
}

async fn unreadable_staged_part_is_rejected(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let staged = all_parts(7, 2);
    store.stage_part(&staged[0]).await?;
    sqlx::query("UPDATE kausal_parts SET body = 'not json' WHERE part = 0")
        .execute(store.pool())
        .await?;
    assert_eq!(store.stage_part(&staged[1]).await?, Some(2));
    match store.staged_part(&id(7), 0).await {
        Err(kausal_subscriber::SinkError::Rejected { table, reason }) => {
            assert_eq!(table, "kausal_parts");
            ensure!(reason.contains("seq 7"), "`{reason}` does not name the seq");
        }
        other => bail!("expected a rejection, got {other:?}"),
    }
    Ok(())
}

/// A staged transaction is applied from the staging table part by part inside one
/// store transaction: all of its rows or none, callbacks with their index in the whole
/// transaction, its staged parts gone once applied.
async fn staged_transaction_applies_part_by_part_and_atomically(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    for envelope in all_parts(4, 4).iter().rev() {
        store.stage_part(envelope).await?;
    }
    let tx = admit_staged(&store, 4, 4).await?;
    ensure!(
        tx.changes.is_empty(),
        "the admitted transaction holds its changes"
    );
    assert_eq!(tx.staged.as_ref().map(|s| s.changes), Some(8));
    assert_eq!(tx.deps.len(), 4);

    // A callback refusing the last change of the last part rolls everything back.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut refusing = Callbacks::default();
    refusing.on_insert("items", |event: Event<Value>| async move {
        if event.idempotency_key.ends_with("/7") {
            return Err(CallbackError::permanent("refused"));
        }
        Ok(())
    });
    ensure!(
        store
            .apply_group(std::slice::from_ref(&tx), &refusing)
            .await
            .is_err(),
        "a refused change did not fail the transaction"
    );
    assert_eq!(count(&store, "items").await.unwrap_or(0), 0);
    assert_eq!(staged_rows(&store, Some(4)).await?, 4);

    let mut recording = Callbacks::default();
    let keys = seen.clone();
    recording.on_insert("items", move |event: Event<Value>| {
        let keys = keys.clone();
        async move {
            keys.lock().unwrap().push(event.idempotency_key);
            Ok(())
        }
    });
    assert_eq!(
        store
            .apply_group(std::slice::from_ref(&tx), &recording)
            .await?,
        [true]
    );
    assert_eq!(count(&store, "items").await?, 8);
    assert_eq!(staged_rows(&store, Some(4)).await?, 0);
    let expected: Vec<String> = (0..8).map(|i| format!("app/1/4/{i}")).collect();
    assert_eq!(*seen.lock().unwrap(), expected);
    // Applied once: a second apply skips it.
    assert_eq!(store.apply_group(&[tx], &recording).await?, [false]);
    assert_eq!(seen.lock().unwrap().len(), 8);
    Ok(())
}

scenario_tests!(staged_transaction_applies_part_by_part_and_atomically:
    a_staged_transaction_applies_part_by_part_all_or_nothing_on_postgres => Server::Postgres,
    a_staged_transaction_applies_part_by_part_all_or_nothing_on_mariadb => Server::MariaDb,
    a_staged_transaction_applies_part_by_part_all_or_nothing_on_sqlite => Server::Sqlite,
);
scenario_tests!(out_of_order_parts_complete_with_the_last_missing_one:
    parts_out_of_order_with_duplicates_complete_on_the_last_missing_one_on_postgres => Server::Postgres,
    parts_out_of_order_with_duplicates_complete_on_the_last_missing_one_on_mariadb => Server::MariaDb,
    parts_out_of_order_with_duplicates_complete_on_the_last_missing_one_on_sqlite => Server::Sqlite,
);
scenario_tests!(concurrent_workers_complete_the_set:
    two_workers_staging_at_once_leave_one_with_the_complete_set_on_postgres => Server::Postgres,
    two_workers_staging_at_once_leave_one_with_the_complete_set_on_mariadb => Server::MariaDb,
    two_workers_staging_at_once_leave_one_with_the_complete_set_on_sqlite => Server::Sqlite,
);
scenario_tests!(recovery_finds_complete_sets_until_applied:
    staged_complete_finds_unapplied_sets_and_nothing_once_applied_on_postgres => Server::Postgres,
    staged_complete_finds_unapplied_sets_and_nothing_once_applied_on_mariadb => Server::MariaDb,
    staged_complete_finds_unapplied_sets_and_nothing_once_applied_on_sqlite => Server::Sqlite,
);
scenario_tests!(parts_of_applied_transactions_are_dropped:
    a_part_of_an_applied_transaction_is_dropped_on_postgres => Server::Postgres,
    a_part_of_an_applied_transaction_is_dropped_on_mariadb => Server::MariaDb,
    a_part_of_an_applied_transaction_is_dropped_on_sqlite => Server::Sqlite,
);
scenario_tests!(unreadable_staged_part_is_rejected:
    an_unreadable_staged_part_is_rejected_naming_its_seq_on_postgres => Server::Postgres,
    an_unreadable_staged_part_is_rejected_naming_its_seq_on_mariadb => Server::MariaDb,
    an_unreadable_staged_part_is_rejected_naming_its_seq_on_sqlite => Server::Sqlite,
);
