//! The store's progress bookkeeping against the real servers (Postgres, MariaDB, SQLite):
//! what `progress` answers after applies and compactions, also while a compaction runs.
//! A coordinator is seeded from it after Redis lost its state.

use anyhow::{ensure, Result};
use kausal_subscriber::sink::Callbacks;
use std::sync::Arc;

#[macro_use]
mod common;

use common::build::*;
use common::*;

async fn progress_follows_applied_and_compaction(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let store = db.store().await?;
    let none = Callbacks::default();
    assert_eq!(store.progress("app", 1).await?, (0, vec![]));
    let group: Vec<_> = [1, 2, 3, 5].into_iter().map(|s| tx(s, vec![])).collect();
    assert_eq!(store.apply_group(&group, &none).await?, [true; 4]);
    assert_eq!(store.progress("app", 1).await?, (0, vec![1, 2, 3, 5]));

    store.compact("app", 1, 3).await?;
    assert_eq!(store.progress("app", 1).await?, (3, vec![5]));
    assert_eq!(
        store
            .apply_group(&[tx(2, vec![]), tx(4, vec![])], &none)
            .await?,
        [false, true]
    );
    assert_eq!(store.progress("app", 1).await?, (3, vec![4, 5]));

    // The watermark never moves back.
    store.compact("app", 1, 2).await?;
    assert_eq!(store.progress("app", 1).await?, (3, vec![4, 5]));

    // Other generations and namespaces are separate streams.
    let others = [tx_in("app", 2, 1, vec![]), tx_in("billing", 1, 3, vec![])];
    assert_eq!(store.apply_group(&others, &none).await?, [true, true]);
    assert_eq!(store.progress("app", 2).await?, (0, vec![1]));
    assert_eq!(store.progress("billing", 1).await?, (0, vec![3]));
    Ok(())
}

/// A coordinator is seeded from `progress` while other workers compact: every answer
/// must cover every applied seq, by the watermark or by the list.
async fn progress_read_during_compaction_covers_every_applied_seq(server: Server) -> Result<()> {
    const N: u64 = 300;
    let db = TestDb::create(server).await?;
    let store = Arc::new(db.store().await?);
    let none = Callbacks::default();
    for chunk in (1..=N).collect::<Vec<_>>().chunks(100) {
        let group: Vec<_> = chunk.iter().map(|s| tx(*s, vec![])).collect();
        store.apply_group(&group, &none).await?;
    }
    let compacting = {
        let store = store.clone();
        tokio::spawn(async move {
            for through in 1..=N {
                store.compact("app", 1, through).await?;
            }
            anyhow::Ok(())
        })
    };
    let mut reads = 0;
    while !compacting.is_finished() || reads == 0 {
        let (through, applied) = store.progress("app", 1).await?;
        let missing: Vec<u64> = (through + 1..=N)
            .filter(|s| applied.binary_search(s).is_err())
            .collect();
        ensure!(
            missing.is_empty(),
            "read {reads}: watermark {through} and the list miss {} applied seqs, from {}",
            missing.len(),
            missing[0]
        );
        reads += 1;
    }
    compacting.await??;
    Ok(())
}

scenario_tests!(progress_follows_applied_and_compaction:
    progress_reflects_applied_seqs_and_compaction_on_postgres => Server::Postgres,
    progress_reflects_applied_seqs_and_compaction_on_mariadb => Server::MariaDb,
    progress_reflects_applied_seqs_and_compaction_on_sqlite => Server::Sqlite,
);
scenario_tests!(progress_read_during_compaction_covers_every_applied_seq:
    progress_read_during_compaction_covers_every_applied_seq_on_postgres => Server::Postgres,
    progress_read_during_compaction_covers_every_applied_seq_on_mariadb => Server::MariaDb,
    progress_read_during_compaction_covers_every_applied_seq_on_sqlite => Server::Sqlite,
);
