//! What a request can end in other than a release: a [`Refusal`] by
//! policy, which names its rule, or a [`TreError`]. Every layer of the
//! TRE — the pipeline, the rule sets — refuses with these, and the
//! boundary maps them to exit statuses and audit-log outcomes.

use crate::error::{Classify, ExitStatus};
use crate::policy::PolicyError;
use crate::store::StoreError;

/// A refusal by policy: not an error of the program. It names the rule
/// (and, for queries outside the grammar, the construct).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused by rule {rule}{}: {reason}", construct.map(|c| format!(" ({c})")).unwrap_or_default())]
pub struct Refusal {
    pub rule: &'static str,
    /// For `outside_grammar`: the construct that is not in the grammar.
    pub construct: Option<&'static str>,
    pub reason: String,
}

impl Refusal {
    pub fn new(rule: &'static str, reason: impl Into<String>) -> Refusal {
        Refusal {
            rule,
            construct: None,
            reason: reason.into(),
        }
    }

    /// A query that is not in the grammar of released queries (docs/design.md §5.2).
    pub fn outside_grammar(construct: &'static str, reason: impl Into<String>) -> Refusal {
        Refusal {
            rule: "outside_grammar",
            construct: Some(construct),
            reason: reason.into(),
        }
    }
}

/// What a researcher is told about any failure while a query runs: one
/// fixed message, whatever happened (memory, time, anything else), so that a
/// failure cannot tell them about the data. The detail goes to the audit log.
pub const EXECUTION_FAILED: &str = "the query could not be completed within this TRE's limits; nothing was released (the TRE operator can see why in the audit log)";

#[derive(Debug, thiserror::Error)]
pub enum TreError {
    #[error(transparent)]
    Refused(Refusal),
    /// The SQL does not parse or plan; the message is DataFusion's, with any
    /// file path removed. Planning sees only the views' schemas, never data.
    #[error("query error: {0}")]
    Sql(String),
    #[error("the store holds no collected data yet (run gpdp collect first)")]
    NoData,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A failure while the query ran. The researcher sees only
    /// [`EXECUTION_FAILED`]; the detail is for the audit log.
    #[error("refused by rule execution_failed: {EXECUTION_FAILED}")]
    Failed(String),
    /// Details stay in the operator's log; the researcher sees only this.
    #[error(
        "internal error while running the query (the TRE operator can find it in the audit log)"
    )]
    Internal(String),
}

impl TreError {
    pub fn internal(e: impl std::fmt::Display) -> TreError {
        TreError::Internal(e.to_string())
    }

    pub fn rule(&self) -> Option<&'static str> {
        match self {
            TreError::Refused(r) => Some(r.rule),
            TreError::Failed(_) => Some("execution_failed"),
            _ => None,
        }
    }
}

impl From<Refusal> for TreError {
    fn from(r: Refusal) -> Self {
        TreError::Refused(r)
    }
}

impl Classify for TreError {
    fn exit_status(&self) -> ExitStatus {
        match self {
            TreError::Refused(_) | TreError::Failed(_) => ExitStatus::Refused,
            TreError::Sql(_) | TreError::NoData | TreError::Policy(_) => ExitStatus::BadInput,
            TreError::Store(e) => e.exit_status(),
            TreError::Internal(_) => ExitStatus::Internal,
        }
    }
}
