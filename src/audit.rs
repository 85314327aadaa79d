//! `gpdp audit`: independent checks an information-governance auditor can
//! run against a store. For now: the audit log's hash chain, and that every
//! store generation in the manifest has its commit recorded in the log.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{Classify, ExitStatus};
use crate::store::StoreError;
use crate::store::audit::{AuditError, AuditLog};

#[derive(Debug, thiserror::Error)]
pub enum AuditFailure {
    #[error("audit log check failed: {0}")]
    Broken(AuditError),
    #[error(
        "audit log check failed: store generations {0} have no entry in the audit log (the log was cut short)"
    )]
    Missing(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for AuditFailure {
    fn exit_status(&self) -> ExitStatus {
        match self {
            AuditFailure::Broken(AuditError::Io { .. }) => ExitStatus::Internal,
            AuditFailure::Broken(_) | AuditFailure::Missing(_) => ExitStatus::Refused,
            AuditFailure::Store(e) => e.exit_status(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LogReport {
    pub lines: u64,
    pub head: String,
    pub generation: u64,
    pub queries: u64,
    pub refused: u64,
}

/// Verifies the chain of `STORE/audit/log.jsonl` against the manifest.
pub fn verify_log(store: &Path) -> Result<LogReport, AuditFailure> {
    let manifest = crate::store::read_manifest(store)?;
    let verified = AuditLog::at(store).verify().map_err(AuditFailure::Broken)?;
    let logged: BTreeSet<u64> = verified
        .entries
        .iter()
        .filter_map(|e| e.get("generation").and_then(Value::as_u64))
        .collect();
    let missing: Vec<String> = (1..=manifest.generation)
        .filter(|g| !logged.contains(g))
        .map(|g| g.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(AuditFailure::Missing(missing.join(", ")));
    }
    let of = |kind: &str| {
        verified
            .entries
            .iter()
            .filter(|e| {
                e.get("event").and_then(Value::as_str) == Some("query")
                    && e.get("outcome").and_then(Value::as_str) == Some(kind)
            })
            .count() as u64
    };
    Ok(LogReport {
        lines: verified.lines,
        head: verified.head,
        generation: manifest.generation,
        queries: of("released") + of("refused") + of("error"),
        refused: of("refused"),
    })
}
