//! Checking a subscriber's configuration against a publisher's contract
//! (`kausal contract check`): every subscribed table, column and rename must name
//! something the publisher publishes.

use crate::config::SubscriberConfig;
use kausal_bus::contract::Contract;

/// What the check found about one `[[table]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `true`: the configuration names something that is not published; `false`: a
    /// remark (an entry of another namespace, not covered by this contract).
    pub problem: bool,
    pub message: String,
}

/// Checks `cfg`'s `[[table]]` entries of the contract's namespace against it.
pub fn check(cfg: &SubscriberConfig, contract: &Contract) -> Vec<Finding> {
    let ns = &contract.namespace;
    let mut out = Vec::new();
    let problem = |message: String| Finding {
        problem: true,
        message,
    };
    let mut covered = 0;
    for t in &cfg.tables {
        if &t.namespace != ns {
            out.push(Finding {
                problem: false,
                message: format!(
                    "table {:?} of namespace {:?}: not covered by this contract (namespace {ns:?})",
                    t.name, t.namespace
                ),
            });
            continue;
        }
        covered += 1;
        let Some(published) = contract.table(&t.name) else {
            let names: Vec<&str> = contract.tables.iter().map(|t| t.name.as_str()).collect();
            out.push(problem(format!(
                "table {:?}: namespace {ns:?} does not publish it (it publishes {})",
                t.name,
                names.join(", ")
            )));
            continue;
        };
        let columns: Vec<&str> = published.columns.iter().map(|c| c.name.as_str()).collect();
        let listed = t.columns.iter().flatten().filter(|c| c.as_str() != "*");
        for c in listed {
            if published.column(c).is_none() {
                out.push(problem(format!(
                    "table {:?}: column {c:?} is not published (published columns: {})",
                    t.name,
                    columns.join(", ")
                )));
            }
        }
        for (column, mask) in &t.mask {
            if published.column(column).is_none() {
                out.push(problem(format!(
                    "table {:?}: mask of {column:?}, which is not a published column \
                     (published columns: {})",
                    t.name,
                    columns.join(", ")
                )));
            } else if *mask == crate::mask::Mask::Redact && published.key.contains(column) {
                out.push(problem(format!(
                    "table {:?}: {column:?} is a key column and cannot be redacted (every row \
                     would have the same key): hash it or keep it",
                    t.name
                )));
            }
        }
        for from in t.rename.keys() {
            if published.column(from).is_none() {
                out.push(problem(format!(
                    "table {:?}: rename of {from:?}, which is not a published column \
                     (published columns: {})",
                    t.name,
                    columns.join(", ")
                )));
            }
        }
    }
    if covered == 0 {
        out.push(problem(format!(
            "no [[table]] entry subscribes namespace {ns:?}: is this the right contract?"
        )));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kausal_bus::contract::{ContractColumn, ContractTable, CONTRACT_VERSION};

    fn contract() -> Contract {
        let col = |n: &str| ContractColumn {
            name: n.into(),
            type_name: "text".into(),
        };
        Contract {
            kausal_contract: CONTRACT_VERSION,
            namespace: "shop".into(),
            source: "postgres".into(),
            tables: vec![ContractTable {
                name: "users".into(),
                key: vec!["id".into()],
                columns: vec![col("id"), col("name"), col("email")],
                all_columns: false,
                references: vec![],
            }],
        }
    }

    fn cfg() -> SubscriberConfig {
        SubscriberConfig::new("app", "amqp://127.0.0.1", "sqlite://x.db")
    }

    #[test]
    fn a_matching_config_has_no_problems() {
        let cfg = cfg().subscribe("shop", "users", &["name", "email"]);
        assert!(check(&cfg, &contract()).iter().all(|f| !f.problem));
    }

    #[test]
    fn every_unknown_table_column_and_rename_is_named() {
        let cfg = cfg()
            .subscribe("shop", "users", &["name", "phone"])
            .rename("nick", "nickname")
            .mask("id", crate::mask::Mask::Redact)
            .mask("ssn", crate::mask::Mask::Hash)
            .subscribe("shop", "orders", &[]);
        let problems: Vec<String> = check(&cfg, &contract())
            .into_iter()
            .filter(|f| f.problem)
            .map(|f| f.message)
            .collect();
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems[0].contains("\"phone\"") && problems[0].contains("name, email"));
        assert!(problems[1].contains("\"id\"") && problems[1].contains("key column"));
        assert!(problems[2].contains("mask of \"ssn\""));
        assert!(problems[3].contains("\"nick\""));
        assert!(problems[4].contains("\"orders\"") && problems[4].contains("publishes users"));
    }

    #[test]
    fn another_namespace_is_a_remark_and_none_of_ours_a_problem() {
        let cfg = cfg().subscribe("billing", "invoices", &[]);
        let found = check(&cfg, &contract());
        assert!(found
            .iter()
            .any(|f| !f.problem && f.message.contains("billing")));
        assert!(found
            .iter()
            .any(|f| f.problem && f.message.contains("no [[table]]")));
    }
}
