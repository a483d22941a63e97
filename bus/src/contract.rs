//! The publisher contract: what a publisher publishes — namespace, tables, columns with
//! their types, keys, references — as a versioned JSON file a publishing team hands to
//! subscribing teams (`kausal contract export`), against which a subscriber's
//! configuration is checked (`kausal contract check`).
//!
//! Names are the published ones (after `as` and `rename`); types are the type names the
//! envelopes carry in their table schemas (`int8`, `text`, `timestamptz`, …).

use serde::{Deserialize, Serialize};

/// The format version written into every contract file.
pub const CONTRACT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    /// Always [`CONTRACT_VERSION`] when written by this version.
    pub kausal_contract: u32,
    pub namespace: String,
    /// `postgres` or `mysql`.
    pub source: String,
    pub tables: Vec<ContractTable>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractTable {
    /// Published table name.
    pub name: String,
    /// Key columns in key order.
    pub key: Vec<String>,
    pub columns: Vec<ContractColumn>,
    /// `true` when the publisher publishes every column (`"*"`), so columns added later
    /// appear without a new contract.
    #[serde(default)]
    pub all_columns: bool,
    /// Rows this table's rows reference (foreign keys and configured references): a row
    /// is published after the row it references.
    #[serde(default)]
    pub references: Vec<ContractReference>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractReference {
    /// Columns of this table holding the referenced key.
    pub columns: Vec<String>,
    /// Published name of the referenced table.
    pub table: String,
}

/// A contract file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("not a Kausal contract: {0} (export one with `kausal contract export`)")]
    Invalid(String),
    #[error(
        "contract version {found} is newer than this Kausal understands ({CONTRACT_VERSION}): \
         upgrade Kausal, or ask the publishing team for a version {CONTRACT_VERSION} export"
    )]
    Version { found: u32 },
}

impl Contract {
    /// Reads a contract from its JSON text, refusing unknown fields and newer versions.
    pub fn parse(text: &str) -> Result<Contract, ContractError> {
        // The version first, so a newer file is refused for its version rather than for
        // a field this version does not know.
        #[derive(Deserialize)]
        struct Version {
            kausal_contract: Option<u32>,
        }
        let version: Version =
            serde_json::from_str(text).map_err(|e| ContractError::Invalid(e.to_string()))?;
        match version.kausal_contract {
            None => {
                return Err(ContractError::Invalid(
                    "no `kausal_contract` version field".into(),
                ))
            }
            Some(v) if v > CONTRACT_VERSION => return Err(ContractError::Version { found: v }),
            Some(_) => {}
        }
        serde_json::from_str(text).map_err(|e| ContractError::Invalid(e.to_string()))
    }

    /// The contract as pretty JSON, stable across runs (tables and columns in the order
    /// the publisher's configuration and the source give them).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    pub fn table(&self, name: &str) -> Option<&ContractTable> {
        self.tables.iter().find(|t| t.name == name)
    }
}

impl ContractTable {
    pub fn column(&self, name: &str) -> Option<&ContractColumn> {
        self.columns.iter().find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Contract {
        Contract {
            kausal_contract: CONTRACT_VERSION,
            namespace: "shop".into(),
            source: "postgres".into(),
            tables: vec![ContractTable {
                name: "messages".into(),
                key: vec!["id".into()],
                columns: vec![
                    ContractColumn {
                        name: "id".into(),
                        type_name: "int8".into(),
                    },
                    ContractColumn {
                        name: "user_id".into(),
                        type_name: "int8".into(),
                    },
                ],
                all_columns: false,
                references: vec![ContractReference {
                    columns: vec!["user_id".into()],
                    table: "users".into(),
                }],
            }],
        }
    }

    #[test]
    fn a_contract_reads_back_what_was_written() {
        let c = sample();
        assert_eq!(Contract::parse(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn a_newer_contract_is_refused_for_its_version() {
        let text = sample()
            .to_json()
            .replace("\"kausal_contract\": 1", "\"kausal_contract\": 7")
            .replace("\"namespace\"", "\"future_field\": 1, \"namespace\"");
        let err = Contract::parse(&text).unwrap_err().to_string();
        assert!(err.contains("version 7"), "{err}");
    }

    #[test]
    fn other_json_is_not_a_contract() {
        let err = Contract::parse("{\"tables\": []}").unwrap_err().to_string();
        assert!(err.contains("kausal contract export"), "{err}");
        assert!(Contract::parse("not json").is_err());
    }
}
