//! Set-based apply keeps every guarantee of row-by-row apply, on Postgres, MariaDB and
//! SQLite stores: a group is written as a few multi-row statements per table, and what
//! the store ends with is what applying the changes one by one, in order, would leave.

use anyhow::{bail, ensure, Result};
use kausal_subscriber::config::TableMode;
use kausal_subscriber::sink::sql::{Dialect, SqlStore};
use kausal_subscriber::sink::Callbacks;
use kausal_subscriber::txn::TableShape;
use kausal_subscriber::SinkError;
use serde_json::{json, Value};
use sqlx::Executor;
use std::sync::Arc;

#[macro_use]
mod common;

use common::build::*;
use common::*;

fn items() -> Arc<TableShape> {
    shape(
        "items",
        &[("id", "int4"), ("name", "text"), ("doc", "jsonb")],
        &["id"],
        TableMode::Mirror,
    )
}

/// (id, name, doc, _kausal_seq) of every item, by id.
async fn items_in(store: &SqlStore) -> Result<Vec<Vec<Value>>> {
    rows(
        store,
        "SELECT id, name, doc, _kausal_seq FROM items ORDER BY id",
    )
    .await
}

fn item(id: i64, name: &str) -> Value {
    json!({"id": id, "name": name, "doc": {"v": name}})
}

async fn a_key_written_several_times_in_a_group_ends_with_its_last_version(
    server: Server,
) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let items = items();
    let group: Vec<_> = (1..=5)
        .map(|seq| {
            let name = format!("v{seq}");
            let change = if seq == 1 {
                insert(&items, item(1, &name))
            } else {
                update(&items, item(1, &name), &[])
            };
            tx(
                seq,
                vec![change, insert(&items, item(100 + seq as i64, "other"))],
            )
        })
        .collect();
    assert_eq!(
        store.apply_group(&group, &Callbacks::default()).await?,
        [true; 5]
    );
    let rows = items_in(&store).await?;
    ensure!(rows.len() == 6, "{rows:?}");
    assert_eq!(
        rows[0],
        [json!(1), json!("v5"), json!("{\"v\":\"v5\"}"), json!(5)]
    );
    Ok(())
}

async fn an_older_replay_in_a_group_does_not_overwrite_a_newer_row(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let none = Callbacks::default();
    let items = items();
    let old = tx(1, vec![insert(&items, item(1, "old"))]);
    let new = tx(2, vec![update(&items, item(1, "new"), &[])]);
    assert_eq!(
        store.apply_group(&[old.clone(), new], &none).await?,
        [true, true]
    );
    // A redelivery of the older transaction, grouped with a fresh one.
    let fresh = tx(3, vec![insert(&items, item(2, "fresh"))]);
    assert_eq!(
        store.apply_group(&[old, fresh], &none).await?,
        [false, true]
    );
    let rows = items_in(&store).await?;
    assert_eq!(
        rows[0],
        [json!(1), json!("new"), json!("{\"v\":\"new\"}"), json!(2)]
    );
    assert_eq!(rows[1][1], json!("fresh"));
    Ok(())
}

async fn delete_and_reinsert_of_a_key_in_one_group_leaves_the_new_row(
    server: Server,
) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let none = Callbacks::default();
    let items = items();
    let first = tx(
        1,
        vec![
            insert(&items, item(1, "first")),
            insert(&items, item(2, "two")),
        ],
    );
    store.apply_group(&[first], &none).await?;
    // Re-inserted without `doc`: a replaced row, not merged with the stored one.
    let group = [
        tx(2, vec![delete(&items, json!({"id": 1}))]),
        tx(3, vec![insert(&items, json!({"id": 1, "name": "again"}))]),
        tx(
            4,
            vec![
                insert(&items, item(3, "three")),
                delete(&items, json!({"id": 3})),
            ],
        ),
        tx(5, vec![delete(&items, json!({"id": 2}))]),
    ];
    assert_eq!(store.apply_group(&group, &none).await?, [true; 4]);
    assert_eq!(
        items_in(&store).await?,
        [vec![json!(1), json!("again"), Value::Null, json!(3)]]
    );
    Ok(())
}

async fn unchanged_toast_columns_keep_their_value_across_a_group(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let none = Callbacks::default();
    let items = items();
    store
        .apply_group(&[tx(1, vec![insert(&items, item(1, "big"))])], &none)
        .await?;
    let group = [
        tx(
            2,
            vec![update(&items, json!({"id": 1, "name": "b2"}), &["doc"])],
        ),
        tx(
            3,
            vec![update(&items, json!({"id": 1, "name": "b3"}), &["doc"])],
        ),
        // Inserted and then updated without `doc` in the same group: the insert's value.
        tx(4, vec![insert(&items, item(2, "new"))]),
        tx(
            5,
            vec![update(&items, json!({"id": 2, "name": "n2"}), &["doc"])],
        ),
    ];
    assert_eq!(store.apply_group(&group, &none).await?, [true; 4]);
    assert_eq!(
        items_in(&store).await?,
        [
            vec![json!(1), json!("b3"), json!("{\"v\":\"big\"}"), json!(3)],
            vec![json!(2), json!("n2"), json!("{\"v\":\"new\"}"), json!(5)],
        ]
    );
    Ok(())
}

async fn key_changes_and_truncates_in_one_group_apply_in_order(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let none = Callbacks::default();
    let items = items();
    let moved = |from: i64, to: i64| {
        let mut change = update(&items, item(to, &format!("from {from}")), &[]);
        change.old_key = Some(obj(json!({"id": from})));
        change
    };
    let group = [
        tx(1, vec![insert(&items, item(1, "one"))]),
        tx(2, vec![moved(1, 2)]),
        tx(3, vec![moved(2, 3)]),
        tx(4, vec![insert(&items, item(1, "one again"))]),
    ];
    assert_eq!(store.apply_group(&group, &none).await?, [true; 4]);
    let names: Vec<Value> = items_in(&store)
        .await?
        .into_iter()
        .map(|r| r[1].clone())
        .collect();
    assert_eq!(names, [json!("one again"), json!("from 2")]);

    let group = [
        tx(5, vec![insert(&items, item(7, "before"))]),
        tx(6, vec![truncate(&items)]),
        tx(7, vec![insert(&items, item(8, "after"))]),
    ];
    assert_eq!(store.apply_group(&group, &none).await?, [true; 3]);
    assert_eq!(
        items_in(&store).await?,
        [vec![
            json!(8),
            json!("after"),
            json!("{\"v\":\"after\"}"),
            json!(7)
        ]]
    );
    Ok(())
}

async fn a_group_larger_than_one_statement_is_written_whole(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let items = items();
    // 5,000 rows of 4 parameters each: several statements of the parameter limit.
    let group: Vec<_> = (0..50)
        .map(|t| {
            let changes = (0..100)
                .map(|r| insert(&items, item(t * 100 + r, &format!("row {}", t * 100 + r))))
                .collect();
            tx(t as u64 + 1, changes)
        })
        .collect();
    assert_eq!(
        store.apply_group(&group, &Callbacks::default()).await?,
        [true; 50]
    );
    let rows = items_in(&store).await?;
    ensure!(rows.len() == 5000, "{} rows", rows.len());
    assert_eq!(
        rows[4999],
        [
            json!(4999),
            json!("row 4999"),
            json!("{\"v\":\"row 4999\"}"),
            json!(50)
        ]
    );
    let deletes: Vec<_> = (0..5000)
        .map(|id| delete(&items, json!({ "id": id })))
        .collect();
    store
        .apply_group(&[tx(51, deletes)], &Callbacks::default())
        .await?;
    assert_eq!(items_in(&store).await?.len(), 0);
    Ok(())
}

/// A table whose `name` must not be null: a null from the source is a poison row.
async fn create_people(store: &SqlStore) -> Result<Arc<TableShape>> {
    let ddl = match store.dialect() {
        Dialect::MySql => "CREATE TABLE people (a INT NOT NULL, b INT NOT NULL, name VARCHAR(50) NOT NULL, PRIMARY KEY (a, b))",
        Dialect::Postgres | Dialect::Sqlite => {
            "CREATE TABLE people (a INT NOT NULL, b INT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (a, b))"
        }
    };
    store.pool().execute(ddl).await?;
    Ok(shape(
        "people",
        &[("a", "int4"), ("b", "int4"), ("name", "text")],
        &["a", "b"],
        TableMode::Map,
    ))
}

async fn a_poison_row_names_table_column_and_seq_and_the_rest_commits(
    server: Server,
) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let none = Callbacks::default();
    let people = create_people(&store).await?;
    let good = tx(
        1,
        vec![insert(&people, json!({"a": 1, "b": 1, "name": "ann"}))],
    );
    let poison = tx(
        2,
        vec![insert(&people, json!({"a": 1, "b": 2, "name": null}))],
    );
    let later = tx(
        3,
        vec![insert(&people, json!({"a": 2, "b": 1, "name": "bob"}))],
    );
    let group = [good.clone(), poison.clone(), later.clone()];
    let error = match store.apply_group(&group, &none).await {
        Err(error) => error,
        Ok(flags) => bail!("the group with a null in a NOT NULL column applied: {flags:?}"),
    };
    ensure!(matches!(error, SinkError::Write(_)), "{error:?}");
    assert_eq!(
        rows(&store, "SELECT COUNT(*) FROM people").await?,
        [vec![json!(0)]]
    );
    // What the runtime does next: each transaction alone. Only the poison one fails,
    // and its error names the table, the column and its seq.
    assert_eq!(store.apply_group(&[good], &none).await?, [true]);
    let error = match store.apply_group(&[poison], &none).await {
        Err(error) => error,
        Ok(_) => bail!("the poison transaction applied"),
    };
    let message = error.to_string();
    for wanted in ["people", "seq 2", "column `name`"] {
        ensure!(
            message.contains(wanted),
            "`{message}` does not name {wanted}"
        );
    }
    assert_eq!(
        error.class(),
        kausal_subscriber::error::ErrorClass::Definite,
        "{message}"
    );
    assert_eq!(store.apply_group(&[later], &none).await?, [true]);
    // Composite keys are deleted by their whole key.
    let gone = tx(4, vec![delete(&people, json!({"a": 1, "b": 1}))]);
    assert_eq!(store.apply_group(&[gone], &none).await?, [true]);
    assert_eq!(
        rows(&store, "SELECT a, b, name FROM people").await?,
        [vec![json!(2), json!(1), json!("bob")]]
    );
    Ok(())
}

scenario_tests!(a_key_written_several_times_in_a_group_ends_with_its_last_version:
    a_key_written_several_times_in_a_group_ends_with_its_last_version_on_postgres => Server::Postgres,
    a_key_written_several_times_in_a_group_ends_with_its_last_version_on_mariadb => Server::MariaDb,
    a_key_written_several_times_in_a_group_ends_with_its_last_version_on_sqlite => Server::Sqlite,
);
scenario_tests!(an_older_replay_in_a_group_does_not_overwrite_a_newer_row:
    an_older_replay_in_a_group_does_not_overwrite_a_newer_row_on_postgres => Server::Postgres,
    an_older_replay_in_a_group_does_not_overwrite_a_newer_row_on_mariadb => Server::MariaDb,
    an_older_replay_in_a_group_does_not_overwrite_a_newer_row_on_sqlite => Server::Sqlite,
);
scenario_tests!(delete_and_reinsert_of_a_key_in_one_group_leaves_the_new_row:
    delete_and_reinsert_of_a_key_in_one_group_leaves_the_new_row_on_postgres => Server::Postgres,
    delete_and_reinsert_of_a_key_in_one_group_leaves_the_new_row_on_mariadb => Server::MariaDb,
    delete_and_reinsert_of_a_key_in_one_group_leaves_the_new_row_on_sqlite => Server::Sqlite,
);
scenario_tests!(unchanged_toast_columns_keep_their_value_across_a_group:
    unchanged_toast_columns_keep_their_value_across_a_group_on_postgres => Server::Postgres,
    unchanged_toast_columns_keep_their_value_across_a_group_on_mariadb => Server::MariaDb,
    unchanged_toast_columns_keep_their_value_across_a_group_on_sqlite => Server::Sqlite,
);
scenario_tests!(key_changes_and_truncates_in_one_group_apply_in_order:
    key_changes_and_truncates_in_one_group_apply_in_order_on_postgres => Server::Postgres,
    key_changes_and_truncates_in_one_group_apply_in_order_on_mariadb => Server::MariaDb,
    key_changes_and_truncates_in_one_group_apply_in_order_on_sqlite => Server::Sqlite,
);
scenario_tests!(a_group_larger_than_one_statement_is_written_whole:
    a_group_larger_than_one_statement_is_written_whole_on_postgres => Server::Postgres,
    a_group_larger_than_one_statement_is_written_whole_on_mariadb => Server::MariaDb,
    a_group_larger_than_one_statement_is_written_whole_on_sqlite => Server::Sqlite,
);
scenario_tests!(a_poison_row_names_table_column_and_seq_and_the_rest_commits:
    a_poison_row_names_table_column_and_seq_and_the_rest_commits_on_postgres => Server::Postgres,
    a_poison_row_names_table_column_and_seq_and_the_rest_commits_on_mariadb => Server::MariaDb,
    a_poison_row_names_table_column_and_seq_and_the_rest_commits_on_sqlite => Server::Sqlite,
);
