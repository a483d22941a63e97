//! A bootstrap chunk meeting the stream's writes in the store, on each SQL server. The
//! worker applies a chunk only once the store applied every transaction up to the
//! chunk's version; these tests apply them in that order and check what the store ends
//! with when stream writes newer than the chunk came before it, and after it.

use anyhow::Result;
use kausal_bus::Snapshot;
use kausal_subscriber::config::TableMode;
use kausal_subscriber::sink::Callbacks;
use kausal_subscriber::txn::{TableShape, Transaction};
use serde_json::{json, Value};
use std::sync::Arc;

#[macro_use]
mod common;

use common::build::*;
use common::*;

fn items() -> Arc<TableShape> {
    shape(
        "items",
        &[("id", "int4"), ("name", "text")],
        &["id"],
        TableMode::Mirror,
    )
}

fn row(id: i64, name: &str) -> Value {
    json!({"id": id, "name": name})
}

/// Chunk `chunk` of request `r1` of `items`, read at version `seq`, holding `rows`.
fn chunk(seq: u64, chunk: u64, rows: &[(i64, &str)], done: bool) -> (Transaction, Snapshot) {
    let shape = items();
    let changes = rows
        .iter()
        .map(|(id, name)| insert(&shape, row(*id, name)))
        .collect();
    let tx = Arc::unwrap_or_clone(tx(seq, changes));
    let last = rows.last().map(|(id, _)| obj(json!({"id": id})));
    let snapshot = Snapshot {
        request: "r1".into(),
        table: "items".into(),
        chunk,
        last_key: last,
        done,
        estimated_rows: 6,
        join_after: Some(0),
    };
    (tx, snapshot)
}

async fn names(store: &kausal_subscriber::sink::sql::SqlStore) -> Result<Vec<Vec<Value>>> {
    rows(store, "SELECT id, name FROM items ORDER BY id").await
}

async fn chunk_yields_to_newer_stream_writes(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let none = Callbacks::default();
    let t = items();
    store
        .begin_bootstrap("app", &["items".to_string()], "r1", false)
        .await?;

    // Before the chunk (version 10): a write it includes (5), and writes after it
    // (12: an update, 13: a delete, 14: a key change from 5 to 50).
    let older = tx(5, vec![insert(&t, row(1, "stream-5"))]);
    let renamed = {
        let mut c = update(&t, row(50, "stream-14"), &[]);
        c.old_key = Some(obj(json!({"id": 5})));
        c
    };
    let newer = [
        tx(12, vec![update(&t, row(2, "stream-12"), &[])]),
        tx(13, vec![delete(&t, json!({"id": 3}))]),
        tx(14, vec![renamed]),
    ];
    assert_eq!(store.apply_group(&[older], &none).await?, [true]);
    assert_eq!(store.apply_group(&newer, &none).await?, [true, true, true]);

    let (tx10, first) = chunk(
        10,
        0,
        &[
            (1, "chunk"),
            (2, "chunk"),
            (3, "chunk"),
            (4, "chunk"),
            (5, "chunk"),
        ],
        false,
    );
    let applied = store.apply_chunk(tx10, &first).await?;
    assert!(applied.current);
    assert_eq!(
        applied.written, 2,
        "rows 1 and 4: the others were written after"
    );
    assert_eq!(
        names(&store).await?,
        [
            vec![json!(1), json!("chunk")],
            vec![json!(2), json!("stream-12")],
            vec![json!(4), json!("chunk")],
            vec![json!(50), json!("stream-14")],
        ],
        "the chunk overwrites the write it includes, never one after it"
    );

    // After the chunk: every stream write is newer and goes ahead; a truncate newer
    // than a later chunk keeps that chunk's rows out.
    let after = tx(15, vec![update(&t, row(4, "stream-15"), &[])]);
    assert_eq!(store.apply_group(&[after], &none).await?, [true]);
    assert_eq!(
        store
            .apply_group(&[tx(16, vec![truncate(&t)])], &none)
            .await?,
        [true]
    );
    let (tx11, last) = chunk(11, 1, &[(6, "chunk")], true);
    let applied = store.apply_chunk(tx11, &last).await?;
    assert!(applied.done);
    assert_eq!(
        applied.written, 0,
        "the truncate at 16 is newer than the chunk"
    );
    assert!(names(&store).await?.is_empty(), "emptied by the truncate");

    let after = tx(17, vec![insert(&t, row(7, "stream-17"))]);
    assert_eq!(store.apply_group(&[after], &none).await?, [true]);
    assert_eq!(names(&store).await?, [vec![json!(7), json!("stream-17")]]);
    Ok(())
}
scenario_tests!(chunk_yields_to_newer_stream_writes:
    a_chunk_keeps_the_rows_the_stream_wrote_after_it_and_later_writes_go_ahead_on_postgres => Server::Postgres,
    a_chunk_keeps_the_rows_the_stream_wrote_after_it_and_later_writes_go_ahead_on_mariadb => Server::MariaDb,
    a_chunk_keeps_the_rows_the_stream_wrote_after_it_and_later_writes_go_ahead_on_sqlite => Server::Sqlite,
);
