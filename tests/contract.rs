//! `kausal contract export` against real Postgres and MariaDB catalogs, and
//! `kausal contract check` of subscriber configurations against the exported file.

mod common;

use common::mysql::*;
use common::sub::*;
use common::*;
use kausal::bus::contract::{Contract, ContractReference};
use std::process::Command;

/// Runs `kausal <args>`; returns (exit code, stdout, stderr).
fn kausal(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kausal");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn types(c: &Contract, table: &str) -> Vec<(String, String)> {
    c.table(table)
        .unwrap_or_else(|| panic!("no table {table} in {c:?}"))
        .columns
        .iter()
        .map(|c| (c.name.clone(), c.type_name.clone()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_contract_lists_published_names_types_keys_and_references() {
    let ns = unique("contract_pg");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    // email is not published; messages are published as "posts" with text renamed.
    let tables = "[[table]]\nname = \"users\"\ncolumns = [\"id\", \"name\"]\n\
                  [[table]]\nname = \"messages\"\nas = \"posts\"\ncolumns = [\"*\"]\n\
                  rename = { text = \"body\" }\n";
    let pub_config = write_config(&config_text(&ns, &db.url, tables), &format!("{ns}.pub"));
    let out = std::env::temp_dir().join(format!("kausal-tests/{ns}.contract.json"));
    let (code, _, err) = kausal(&[
        "contract",
        "export",
        "--config",
        pub_config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let contract = Contract::parse(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(contract.namespace, ns);
    assert_eq!(contract.source, "postgres");
    assert_eq!(
        types(&contract, "users"),
        pairs(&[("id", "int8"), ("name", "text")])
    );
    assert_eq!(
        types(&contract, "posts"),
        pairs(&[
            ("id", "int8"),
            ("user_id", "int8"),
            ("body", "text"),
            ("seen", "bool")
        ])
    );
    let posts = contract.table("posts").unwrap();
    assert_eq!(posts.key, vec!["id".to_string()]);
    assert!(posts.all_columns && !contract.table("users").unwrap().all_columns);
    assert_eq!(
        posts.references,
        vec![ContractReference {
            columns: vec!["user_id".into()],
            table: "users".into()
        }]
    );

    // A subscriber naming an unpublished column, a source-side name and a table that
    // is not published: each named, exit code 1.
    let wrong = sub_config_text(
        "contract-app",
        "sqlite://unused.db",
        &format!(
            "[[table]]\nnamespace = \"{ns}\"\nname = \"users\"\ncolumns = [\"name\", \"email\"]\n\
             [[table]]\nnamespace = \"{ns}\"\nname = \"posts\"\ncolumns = [\"text\"]\n\
             [[table]]\nnamespace = \"{ns}\"\nname = \"messages\"\n"
        ),
    );
    let wrong = write_config(&wrong, &format!("{ns}.wrong"));
    let (code, stdout, _) = kausal(&[
        "contract",
        "check",
        "--contract",
        out.to_str().unwrap(),
        "--config",
        wrong.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stdout}");
    for expected in [
        "column \"email\" is not published",
        "column \"text\" is not published",
        "table \"messages\": namespace",
        "3 problem(s)",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    let right = sub_config_text(
        "contract-app",
        "sqlite://unused.db",
        &format!(
            "[[table]]\nnamespace = \"{ns}\"\nname = \"users\"\ncolumns = [\"name\"]\n\
             [[table]]\nnamespace = \"{ns}\"\nname = \"posts\"\nrename = {{ body = \"text\" }}\n"
        ),
    );
    let right = write_config(&right, &format!("{ns}.right"));
    let (code, stdout, err) = kausal(&[
        "contract",
        "check",
        "--contract",
        out.to_str().unwrap(),
        "--config",
        right.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("matches the contract"), "{stdout}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mariadb_contract_names_types_as_its_envelopes_do() {
    let ns = unique("contract_my");
    let db = MyDb::new(
        &ns,
        "CREATE TABLE things (id INT UNSIGNED PRIMARY KEY, small TINYINT, flag BOOLEAN, \
           big BIGINT UNSIGNED, price DECIMAL(10,2), doc JSON, raw VARBINARY(16), \
           at DATETIME(6), ts TIMESTAMP(6) NULL, name VARCHAR(20), kind ENUM('a','b'))",
    )
    .await;
    let tables = "[[table]]\nname = \"things\"\ncolumns = [\"*\"]\n";
    let pub_config = write_config(&my_config_text(&ns, &db.url, tables), &format!("{ns}.pub"));
    let (code, stdout, err) = kausal(&[
        "contract",
        "export",
        "--config",
        pub_config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let contract = Contract::parse(&stdout).unwrap();
    assert_eq!(contract.source, "mysql");
    assert_eq!(
        types(&contract, "things"),
        pairs(&[
            ("id", "int8"),
            ("small", "int2"),
            ("flag", "bool"),
            ("big", "numeric"),
            ("price", "numeric"),
            ("doc", "json"),
            ("raw", "bytea"),
            ("at", "timestamp"),
            ("ts", "timestamptz"),
            ("name", "text"),
            ("kind", "text"),
        ])
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exporting_a_table_that_does_not_exist_names_it() {
    let ns = unique("contract_missing");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    let tables = "[[table]]\nname = \"orders\"\ncolumns = [\"*\"]\n";
    let pub_config = write_config(&config_text(&ns, &db.url, tables), &format!("{ns}.pub"));
    let (code, stdout, err) = kausal(&[
        "contract",
        "export",
        "--config",
        pub_config.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stdout}");
    assert!(err.contains("orders"), "{err}");
    assert!(stdout.is_empty(), "a contract was printed: {stdout}");
    db.drop().await;
}
