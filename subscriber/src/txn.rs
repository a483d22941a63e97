//! A source transaction as a subscriber sees it: all parts assembled, mapped onto the
//! subscribed tables and columns, with its merged dependency set.

use crate::error::MappingError;
use crate::table::TableMode;
use kausal_bus::{Context, Dep, Envelope, Op};
use serde_json::{Map, Value};
use std::sync::Arc;

/// Identifies a transaction across redeliveries and publisher replays.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId {
    pub namespace: Arc<str>,
    pub generation: u64,
    pub seq: u64,
}

impl std::fmt::Display for TxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.generation, self.seq)
    }
}

/// The shape of a destination table, from the published schema and the subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct TableShape {
    /// Destination table name.
    pub name: String,
    /// Destination column name and the source type name (`int4`, `text`, …).
    pub columns: Vec<(String, String)>,
    /// Destination names of the key columns.
    pub key: Vec<String>,
    pub mode: TableMode,
}

/// One row change, in destination names.
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    pub op: Op,
    /// Published table name.
    pub source_table: String,
    pub shape: Arc<TableShape>,
    /// Key after the change (before it, for a delete). Empty for truncate.
    pub key: Map<String, Value>,
    /// Key before an update that changed it.
    pub old_key: Option<Map<String, Value>>,
    /// Subscribed columns after the change.
    pub new: Option<Map<String, Value>>,
    /// Subscribed columns before the change, when the source logged them.
    pub old: Option<Map<String, Value>>,
    /// Subscribed columns the source did not log (unchanged TOAST): keep what is stored.
    pub unchanged: Vec<String>,
}

/// A whole source transaction, ready for the causal gate and the sinks.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub id: TxId,
    pub position: String,
    pub commit_ts_us: i64,
    pub txid: String,
    pub context: Context,
    /// Changes to subscribed tables only; may be empty (the transaction is still counted).
    pub changes: Vec<RowChange>,
    /// One dependency per key (a read upgraded to a write in a later part counts as the
    /// write).
    pub deps: Vec<Dep>,
    /// Published names of every table the transaction changed, subscribed or not.
    pub tables: Vec<String>,
    /// Number of envelope parts it came in.
    pub parts: u32,
    /// Set on a split transaction admitted without its changes (`changes` is empty):
    /// they are read from the store's staging table part by part when it is applied.
    pub staged: Option<Arc<Staged>>,
    /// Set on the view of one part of a staged transaction, as sinks and callbacks get
    /// it: the part's index. Sinks that version rows order by (seq, part) then.
    pub part: Option<u32>,
}

impl Transaction {
    /// Stable across redeliveries and replays: `<namespace>/<generation>/<seq>`. Give it
    /// to anything a callback does outside the store (an email API, a webhook).
    pub fn idempotency_key(&self) -> String {
        self.id.to_string()
    }
}

/// What turns envelopes into a transaction of destination rows ([`crate::mapping::Mapping`]):
/// a staged transaction keeps one to map its parts again one at a time. Contract:
/// `assemble` of the same envelopes gives the same transaction.
pub trait Remap: Send + std::fmt::Debug {
    fn assemble(&mut self, envelopes: &[Envelope]) -> Result<Transaction, MappingError>;
}

/// A split transaction admitted without its changes, which stay in the store's staging
/// table: it is applied part by part inside one store transaction, so memory holds one
/// part at a time however large the transaction is.
#[derive(Debug)]
pub struct Staged {
    pub parts: u32,
    /// Every destination shape its changes write (tables are prepared before the store
    /// transaction begins).
    pub shapes: Vec<Arc<TableShape>>,
    /// Subscribed changes over all parts.
    pub changes: usize,
    /// The mapping as it was when the parts were admitted (its shapes built).
    pub(crate) mapping: std::sync::Mutex<Box<dyn Remap>>,
}

impl Staged {
    /// One staged part mapped again: a view of the transaction that holds this part's
    /// changes only, with [`Transaction::part`] set.
    pub fn part(&self, envelope: &Envelope) -> Result<Transaction, MappingError> {
        let mut mapping = self.mapping.lock().unwrap_or_else(|p| p.into_inner());
        let mut tx = mapping.assemble(std::slice::from_ref(envelope))?;
        tx.part = Some(envelope.part);
        Ok(tx)
    }
}
