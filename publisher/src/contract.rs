//! `kausal contract export`: the publisher's contract, read from its configuration and
//! the source's catalog — the same checks as a start (a table, column or key that is
//! missing is an error), then the published names and the type names its envelopes
//! carry.

use crate::config::{split_name, PublisherConfig, SourceConfig, TableConfig};
use crate::error::{PublisherError, SourceError};
use crate::source::{mysql, postgres};
use kausal_bus::contract::{
    Contract, ContractColumn, ContractReference, ContractTable, CONTRACT_VERSION,
};
use std::collections::HashMap;

/// Source columns of one table with their published type names, in table order.
type Typed = Vec<(String, String)>;
/// Declared foreign keys: (local columns, referenced schema, referenced table).
type ForeignKeys = Vec<(Vec<String>, String, String)>;

/// Connects to the source, checks the configuration against it and describes what the
/// publisher publishes.
pub async fn export(cfg: &PublisherConfig) -> Result<Contract, PublisherError> {
    cfg.validate()?;
    let mut facts: Vec<(Vec<String>, Typed, ForeignKeys)> = Vec::new();
    let (source, default_schema) = match &cfg.source {
        SourceConfig::Postgres(pg) => {
            let conn = postgres::catalog::ConnInfo::parse(&pg.url, pg.password()?)?;
            let client = conn.connect().await?;
            let slot = postgres::slot_name(cfg, pg);
            let metas =
                postgres::catalog::preflight(&client, cfg, &conn.user, &conn.database, &slot)
                    .await?;
            for t in &cfg.tables {
                let meta = &metas[&t.qualified()];
                let typed = postgres::catalog::column_types(&client, meta.oid).await?;
                let fks = meta
                    .foreign_keys
                    .iter()
                    .map(|(cols, s, t, _)| (cols.clone(), s.clone(), t.clone()))
                    .collect();
                facts.push((meta.key.clone(), typed, fks));
            }
            ("postgres", "public".to_string())
        }
        SourceConfig::Mysql(my) => {
            let info = mysql::catalog::ConnInfo::parse(my)?;
            let mut conn = info.connect().await?;
            let server = mysql::catalog::check_server(&mut conn, &info.user).await?;
            let metas =
                mysql::catalog::check_tables(&mut conn, &server, cfg, &info.user, &info.database)
                    .await?;
            for t in &cfg.tables {
                let (db, table) = mysql::catalog::table_qualified(t, &info.database);
                let meta = &metas[&(db.clone(), table.clone())];
                let typed = mysql::catalog::column_types(&mut conn, &db, &table, meta).await?;
                let fks = meta
                    .foreign_keys
                    .iter()
                    .map(|(cols, s, t, _)| (cols.clone(), s.clone(), t.clone()))
                    .collect();
                facts.push((meta.key.clone(), typed, fks));
            }
            let _ = conn.disconnect().await;
            ("mysql", info.database.clone())
        }
    };
    // Source (schema, table) → published name, to name referenced tables.
    let published: HashMap<(String, String), String> = cfg
        .tables
        .iter()
        .map(|t| (qualified(t, &default_schema), t.published_name()))
        .collect();
    let tables = cfg
        .tables
        .iter()
        .zip(facts)
        .map(|(t, (key, typed, fks))| describe(t, key, typed, fks, &published, &default_schema))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Contract {
        kausal_contract: CONTRACT_VERSION,
        namespace: cfg.namespace.clone(),
        source: source.to_string(),
        tables,
    })
}

fn qualified(t: &TableConfig, default_schema: &str) -> (String, String) {
    match t.name.split_once('.') {
        Some(_) => split_name(&t.name),
        None => (default_schema.to_string(), t.name.clone()),
    }
}

/// One table of the contract: published columns only, under their published names.
fn describe(
    t: &TableConfig,
    key: Vec<String>,
    typed: Typed,
    fks: ForeignKeys,
    published: &HashMap<(String, String), String>,
    default_schema: &str,
) -> Result<ContractTable, SourceError> {
    let columns = typed
        .iter()
        .filter(|(c, _)| t.publishes(c) || key.contains(c))
        .map(|(c, ty)| ContractColumn {
            name: t.published_column(c),
            type_name: ty.clone(),
        })
        .collect();
    let public = |cols: &[String]| -> Option<Vec<String>> {
        cols.iter()
            .map(|c| (t.publishes(c) || key.contains(c)).then(|| t.published_column(c)))
            .collect()
    };
    let mut references = Vec::new();
    let declared = fks.into_iter().map(|(cols, s, tb)| (cols, (s, tb)));
    let configured = t.references.iter().map(|r| {
        let target = match r.table.split_once('.') {
            Some(_) => split_name(&r.table),
            None => (default_schema.to_string(), r.table.clone()),
        };
        (r.columns.clone(), target)
    });
    for (cols, target) in declared.chain(configured) {
        // A reference to an unpublished table, or through unpublished columns, is the
        // publisher's business: subscribers cannot see either end.
        let (Some(table), Some(columns)) = (published.get(&target), public(&cols)) else {
            continue;
        };
        let reference = ContractReference {
            columns,
            table: table.clone(),
        };
        if !references.contains(&reference) {
            references.push(reference);
        }
    }
    Ok(ContractTable {
        name: t.published_name(),
        key: key.iter().map(|k| t.published_column(k)).collect(),
        columns,
        all_columns: t.columns.iter().any(|c| c == "*"),
        references,
    })
}
