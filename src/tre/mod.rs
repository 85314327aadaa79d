//! The Trusted Research Environment boundary: `gpdp query` (and, with
//! `gpdp serve`, Arrow Flight SQL) — the Five Safes as code.
//!
//! A request passes, in order: [`auth`] (safe people, safe projects), a
//! per-request [`session`] holding only the project's views with the opt-out
//! filters inside them (safe settings), the [`guard`] over the logical plan
//! (safe outputs, before anything runs), execution under memory and time
//! limits, and [`sdc`] on every released cell (safe outputs, after). Every
//! request — released, refused or failed — is appended to the store's
//! hash-chained audit log with its user, project, SQL, plan fingerprint,
//! outcome, rule, suppressed cells and result checksum.

pub mod auth;
pub mod dominance;
pub mod guard;
pub mod patients;
pub mod sdc;
pub mod session;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Field, Int64Type, Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::dataframe::DataFrame;
use datafusion::prelude::SQLOptions;
use serde_json::{Value, json};

use self::sdc::{ColumnKind, Controlled};
use crate::error::{Classify, ExitStatus};
use crate::policy::PolicyError;
use crate::policy::sha256_hex;
use crate::policy::tre::{Disclosure, TrePolicy};
use crate::store::StoreError;
use crate::store::audit::AuditLog;

/// A refusal by policy: not an error of the program. It names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused by rule {rule}: {reason}")]
pub struct Refusal {
    pub rule: &'static str,
    pub reason: String,
}

impl Refusal {
    pub fn new(rule: &'static str, reason: impl Into<String>) -> Refusal {
        Refusal {
            rule,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TreError {
    #[error(transparent)]
    Refused(Refusal),
    /// The SQL does not parse or plan; the message is DataFusion's, with any
    /// file path removed.
    #[error("query error: {0}")]
    Sql(String),
    #[error("the store holds no collected data yet (run gpdp collect first)")]
    NoData,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
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

    fn rule(&self) -> Option<&'static str> {
        match self {
            TreError::Refused(r) => Some(r.rule),
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
            TreError::Refused(_) => ExitStatus::Refused,
            TreError::Sql(_) | TreError::NoData | TreError::Policy(_) => ExitStatus::BadInput,
            TreError::Store(e) => e.exit_status(),
            TreError::Internal(_) => ExitStatus::Internal,
        }
    }
}

/// Removes anything that looks like a filesystem path from a message shown
/// to a researcher.
fn scrub(message: &str) -> String {
    message
        .split_whitespace()
        .map(|w| if w.contains('/') { "<path>" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone)]
pub struct Request {
    pub store: PathBuf,
    pub user: String,
    pub token: Option<String>,
    pub project: String,
    pub sql: String,
}

/// A released result: the controlled batch and how it was controlled.
#[derive(Debug, Clone)]
pub struct Released {
    pub result: Controlled,
    pub kinds: Vec<ColumnKind>,
    pub disclosure: Disclosure,
    pub checksum: String,
    pub fingerprint: String,
    pub seconds: f64,
}

/// Answers one request through the whole boundary and audits it.
pub async fn query(policy: &TrePolicy, req: &Request) -> Result<Released, TreError> {
    let started = Instant::now();
    let mut fingerprint = String::new();
    let outcome = answer(policy, req, &mut fingerprint).await;
    audit(
        "query",
        req,
        &fingerprint,
        started,
        outcome.as_ref().map(Some),
    )?;
    outcome.map(|mut r| {
        r.fingerprint = fingerprint;
        r.seconds = started.elapsed().as_secs_f64();
        r
    })
}

/// Appends one request to the store's audit log: who asked what, the plan
/// fingerprint, and the outcome: `released` with the result's figures
/// (`Some`), `described` (`None`), or `refused` / `error` with the rule and
/// reason. A path that is not a store has no log and must not gain one.
fn audit(
    event: &str,
    req: &Request,
    fingerprint: &str,
    started: Instant,
    outcome: Result<Option<&Released>, &TreError>,
) -> Result<(), TreError> {
    if !crate::store::is_store(&req.store) {
        return Ok(());
    }
    let mut entry = json!({
        "event": event,
        "time": crate::store::now_rfc3339(),
        "user": req.user,
        "project": req.project,
        "sql": req.sql,
        "plan_fingerprint": fingerprint,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let Some(o) = entry.as_object_mut() else {
        return Ok(());
    };
    match outcome {
        Ok(Some(r)) => {
            o.insert("outcome".into(), json!("released"));
            o.insert("rows".into(), json!(r.result.batch.num_rows()));
            o.insert("suppressed_cells".into(), json!(r.result.suppressed_cells));
            o.insert("disclosure".into(), json!(r.disclosure.name));
            o.insert("result_sha256".into(), json!(r.checksum));
        }
        Ok(None) => {
            o.insert("outcome".into(), json!("described"));
        }
        Err(e) => {
            o.insert(
                "outcome".into(),
                json!(if e.rule().is_some() {
                    "refused"
                } else {
                    "error"
                }),
            );
            o.insert("rule".into(), json!(e.rule()));
            o.insert(
                "reason".into(),
                json!(match e {
                    TreError::Internal(detail) => detail.clone(),
                    other => other.to_string(),
                }),
            );
        }
    }
    AuditLog::at(&req.store)
        .append(&[entry])
        .map_err(StoreError::from)?;
    Ok(())
}

/// A request that passed authentication and the plan guard, ready to run.
struct Guarded {
    state: datafusion::execution::SessionState,
    checked: guard::Checked,
    disclosure: Disclosure,
}

/// Authentication, the project's session, planning and the plan guard: every
/// path (running, describing, preparing) goes through here.
async fn guarded(
    policy: &TrePolicy,
    req: &Request,
    fingerprint: &mut String,
) -> Result<Guarded, TreError> {
    let project = auth::authorise(policy, &req.user, req.token.as_deref(), &req.project)?;
    if req.sql.contains(guard::HIDDEN) {
        return Err(Refusal::new(
            "reserved_name",
            format!("names starting with {} are reserved", guard::HIDDEN),
        )
        .into());
    }
    let manifest = crate::store::read_manifest(&req.store)?;
    let session = session::open(&req.store, &manifest, policy, project).await?;
    let state = session.ctx.state();
    let plan = state.create_logical_plan(&req.sql).await.map_err(|e| {
        let message = scrub(&e.to_string());
        // Anything outside the project's views is not there for this researcher.
        if message.contains("not found") && message.contains("table") {
            TreError::Refused(Refusal::new(
                "unknown_table",
                format!("{message} (available: {})", project.tables.join(", ")),
            ))
        } else {
            TreError::Sql(message)
        }
    })?;
    *fingerprint = sha256_hex(plan.display_indent().to_string().as_bytes());
    guard::check_statement_kind(&plan)?;
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|_| {
            Refusal::new(
                "statement_not_allowed",
                "only SELECT queries are allowed (no DDL, DML or statements)",
            )
        })?;
    let checked = guard::check(&plan, &session.views, project)?;
    Ok(Guarded {
        state,
        checked,
        disclosure: project.disclosure,
    })
}

/// The schema a query's released result will have (hidden columns removed;
/// counts as Int64 and statistics nullable, as disclosure control makes
/// them), without running it. The same guard as [`query`] decides, and the
/// request is audited (`event: describe`).
pub async fn describe(policy: &TrePolicy, req: &Request) -> Result<SchemaRef, TreError> {
    let started = Instant::now();
    let mut fingerprint = String::new();
    let outcome = guarded(policy, req, &mut fingerprint)
        .await
        .map(|g| released_schema(&g.checked));
    audit(
        "describe",
        req,
        &fingerprint,
        started,
        outcome.as_ref().map(|_| None),
    )?;
    outcome
}

fn released_schema(checked: &guard::Checked) -> SchemaRef {
    let fields: Vec<Field> = checked
        .plan
        .schema()
        .fields()
        .iter()
        .filter(|f| !f.name().starts_with(guard::HIDDEN))
        .zip(&checked.kinds)
        .map(|(f, kind)| match kind {
            ColumnKind::Key => f.as_ref().clone(),
            ColumnKind::Count => Field::new(f.name(), arrow::datatypes::DataType::Int64, true),
            ColumnKind::Statistic => f.as_ref().clone().with_nullable(true),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

async fn answer(
    policy: &TrePolicy,
    req: &Request,
    fingerprint: &mut String,
) -> Result<Released, TreError> {
    let Guarded {
        state,
        checked,
        disclosure,
    } = guarded(policy, req, fingerprint).await?;
    let output_schema = checked.plan.schema().clone();
    let run = DataFrame::new(state, checked.plan).collect();
    let batches = match tokio::time::timeout(Duration::from_secs(policy.timeout_seconds), run).await
    {
        Err(_) => {
            return Err(Refusal::new(
                "time_limit",
                format!("the query ran longer than {} s", policy.timeout_seconds),
            )
            .into());
        }
        Ok(Err(e)) => {
            let text = e.to_string();
            if text.contains("Resources exhausted") {
                return Err(Refusal::new(
                    "memory_limit",
                    format!("the query needed more than {} MiB", policy.memory_mb),
                )
                .into());
            }
            return Err(TreError::Internal(text));
        }
        Ok(Ok(b)) => b,
    };
    // An empty result (e.g. HAVING that matches nothing) has no batches: use the plan's schema.
    let schema = batches.first().map_or_else(
        || Arc::new(output_schema.as_arrow().clone()),
        |b| b.schema(),
    );
    let batch = arrow::compute::concat_batches(&schema, &batches).map_err(TreError::internal)?;
    if batch.num_rows() > policy.max_rows {
        return Err(Refusal::new(
            "too_many_rows",
            format!(
                "{} rows; at most {} may be released",
                batch.num_rows(),
                policy.max_rows
            ),
        )
        .into());
    }
    let hidden = |name: &str| {
        let column = batch
            .column_by_name(name)
            .ok_or_else(|| TreError::Internal(format!("the plan lost {name}")))?;
        arrow::compute::cast(column, &arrow::datatypes::DataType::Int64)
            .map(|c| c.as_primitive::<Int64Type>().clone())
            .map_err(TreError::internal)
    };
    let behind = sdc::Behind {
        patients: hidden(guard::PATIENTS)?,
        dominance: if disclosure.checks_contributions() {
            Some(hidden(guard::DOMINANCE)?)
        } else {
            None
        },
    };
    let visible_columns: Vec<usize> = (0..batch.num_columns())
        .filter(|&i| !schema.field(i).name().starts_with(guard::HIDDEN))
        .collect();
    let visible = batch
        .project(&visible_columns)
        .map_err(TreError::internal)?;
    let result =
        sdc::control(&visible, &checked.kinds, &behind, &disclosure).map_err(TreError::internal)?;
    let checksum = sha256_hex(to_csv(&result).as_bytes());
    Ok(Released {
        result,
        kinds: checked.kinds,
        disclosure,
        checksum,
        fingerprint: String::new(),
        seconds: 0.0,
    })
}

/// Text of one released cell; suppressed statistics read `[REDACTED]`.
fn cell(r: &Controlled, formatters: &[ArrayFormatter], row: usize, col: usize) -> String {
    let column = r.batch.column(col);
    if column.is_null(row) && r.suppressed[row].is_some() {
        "[REDACTED]".into()
    } else {
        formatters[col].value(row).to_string()
    }
}

fn formatters(r: &Controlled) -> Vec<ArrayFormatter<'_>> {
    let options = FormatOptions::default();
    r.batch
        .columns()
        .iter()
        .filter_map(|c| ArrayFormatter::try_new(c.as_ref(), &options).ok())
        .collect()
}

/// CSV with a final `suppressed` column giving the reason, if any.
pub fn to_csv(r: &Controlled) -> String {
    let f = formatters(r);
    let schema = r.batch.schema();
    let mut out = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .chain(["suppressed"])
        .collect::<Vec<_>>()
        .join(",")
        + "\n";
    for row in 0..r.batch.num_rows() {
        let mut cells: Vec<String> = (0..r.batch.num_columns())
            .map(|c| cell(r, &f, row, c))
            .collect();
        cells.push(r.suppressed[row].clone().unwrap_or_default());
        out.push_str(
            &cells
                .iter()
                .map(|c| {
                    if c.contains(',') {
                        format!("\"{c}\"")
                    } else {
                        c.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push('\n');
    }
    out
}

fn column_names(c: &Controlled) -> Vec<String> {
    c.batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// A human table, then a note on what was suppressed and why.
pub fn to_table(r: &Released) -> String {
    let c = &r.result;
    let f = formatters(c);
    let names = column_names(c);
    let rows: Vec<Vec<String>> = (0..c.batch.num_rows())
        .map(|row| (0..names.len()).map(|col| cell(c, &f, row, col)).collect())
        .collect();
    let mut out = grid(&names, &rows);
    out.push_str(&format!(
        "({} rows; disclosure control {}: {} cells suppressed; counts rounded to the nearest {})\n",
        c.batch.num_rows(),
        r.disclosure.name,
        c.suppressed_cells,
        r.disclosure.round_to
    ));
    out
}

/// Record batches as received by a client (nulls as `null`), as a table.
pub fn batches_to_table(batches: &[arrow::array::RecordBatch]) -> String {
    let Some(first) = batches.first() else {
        return "(no rows)\n".into();
    };
    let names: Vec<String> = first
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut rows = Vec::new();
    for b in batches {
        let f: Vec<_> = b
            .columns()
            .iter()
            .filter_map(|c| ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default()).ok())
            .collect();
        for row in 0..b.num_rows() {
            rows.push(
                b.columns()
                    .iter()
                    .zip(&f)
                    .map(|(c, f)| {
                        if c.is_null(row) {
                            "null".to_owned()
                        } else {
                            f.value(row).to_string()
                        }
                    })
                    .collect(),
            );
        }
    }
    grid(&names, &rows) + &format!("({} rows)\n", rows.len())
}

/// Right-aligned columns under a header and a rule.
fn grid(names: &[String], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..names.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([names[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = line(names) + "\n";
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  "),
    );
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

/// JSON: columns, rows (suppressed statistics as null) and suppression metadata.
pub fn to_json(r: &Released) -> Value {
    let c = &r.result;
    let f = formatters(c);
    let names = column_names(c);
    let rows: Vec<Value> = (0..c.batch.num_rows())
        .map(|row| {
            let mut o = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                let column = c.batch.column(i);
                let v = if column.is_null(row) {
                    Value::Null
                } else {
                    let text = f[i].value(row).to_string();
                    match r.kinds.get(i) {
                        Some(ColumnKind::Count) => text
                            .parse::<i64>()
                            .map(Value::from)
                            .unwrap_or(Value::String(text)),
                        Some(ColumnKind::Statistic) => text
                            .parse::<f64>()
                            .map(Value::from)
                            .unwrap_or(Value::String(text)),
                        _ => Value::String(text),
                    }
                };
                o.insert(name.clone(), v);
            }
            Value::Object(o)
        })
        .collect();
    let suppressed: Vec<Value> = c
        .suppressed
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().map(|s| json!({"row": i, "reason": s})))
        .collect();
    json!({
        "columns": names,
        "kinds": r.kinds.iter().map(|k| format!("{k:?}").to_lowercase()).collect::<Vec<_>>(),
        "rows": rows,
        "disclosure": r.disclosure.name,
        "redact_at_or_below": r.disclosure.redact_at_or_below,
        "round_to": r.disclosure.round_to,
        "suppressed_cells": c.suppressed_cells,
        "suppressed": suppressed,
        "result_sha256": r.checksum,
        "plan_fingerprint": r.fingerprint,
    })
}

/// Runs a request on a fresh runtime (for the command line).
pub fn query_blocking(policy: &TrePolicy, req: &Request) -> Result<Released, TreError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(TreError::internal)?;
    runtime.block_on(query(policy, req))
}
