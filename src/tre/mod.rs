//! The Trusted Research Environment boundary: `gpdp query` (and, with
//! `gpdp serve`, Arrow Flight SQL) — the Five Safes as code.
//!
//! A request passes, in order: [`auth`] (safe people, safe projects); a
//! per-request [`session`] holding only the project's views with the opt-out
//! filters inside them (safe settings); DataFusion's SQL planner, which
//! resolves names against those views; the [`grammar`], which accepts only
//! plans in the allow-list of DESIGN §5.2 and reads them as a typed
//! [`grammar::Release`] (safe outputs, before anything runs); [`compile`],
//! which builds the only plan that runs from that release, with every
//! statistic's contributing patients beside it; execution under memory and
//! time limits; and [`sdc`], disclosure control per statistic (safe
//! outputs, after) — or, for projects under differential privacy, [`dp`]:
//! its noise plan fixed before running, its cost charged to the
//! researcher's budget in the audit log, then noise and every cell of the
//! keys' public domains; under the cell key method, [`contributors`]
//! finds who contributes to each cell, and [`ckm`] and [`ptable`] perturb
//! its statistics by who that is. Every request — released,
//! refused or failed — is appended to the store's hash-chained audit log
//! with its user, project, SQL, plan fingerprint, outcome, rule, privacy
//! charged and, for the operator only, the rows withheld and why.

pub mod aggregates;
pub mod auth;
pub mod compile;
pub mod control;
pub mod grammar;
pub mod session;
pub mod views;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arrow::array::Array;
use arrow::datatypes::SchemaRef;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::dataframe::DataFrame;
use datafusion::prelude::SQLOptions;
use futures::StreamExt;
use serde_json::{Value, json};

use self::control::sdc::{ColumnKind, Controlled};
use self::control::{ckm, dp, sdc};
use crate::error::{Classify, ExitStatus};
use crate::policy::PolicyError;
use crate::policy::sha256_hex;
use crate::policy::tre::{Disclosure, TrePolicy};
use crate::store::StoreError;
use crate::store::audit::AuditLog;

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

    /// A query that is not in the grammar of released queries (DESIGN §5.2).
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
    pub disclosure: Disclosure,
    /// Under `dp`: each statistic's noise and the researcher's budget.
    pub privacy: Option<dp::Report>,
    pub checksum: String,
    pub fingerprint: String,
    pub seconds: f64,
}

impl Released {
    pub fn kinds(&self) -> &[ColumnKind] {
        &self.result.kinds
    }
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

/// Statistics released in a result: the non-null cells of its statistic
/// columns (a 95% interval's ends go with their mean, not counted apart).
fn released_cells(batch: &arrow::array::RecordBatch) -> u64 {
    batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(f, _)| {
            f.metadata()
                .get("gpdp.statistic")
                .is_some_and(|s| !s.starts_with("ci95"))
        })
        .map(|(_, c)| (c.len() - c.null_count()) as u64)
        .sum()
}

/// Appends one request to the store's audit log: who asked what, the plan
/// fingerprint, and the outcome: `released` with the result's figures
/// (`Some`) — including, for the operator, the rows withheld —, `described`
/// (`None`), or `refused` / `failed` / `error` with the rule and reason. A
/// path that is not a store has no log and must not gain one.
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
            let c = &r.result;
            o.insert("outcome".into(), json!("released"));
            o.insert("rows".into(), json!(c.batch.num_rows()));
            o.insert("cells_released".into(), json!(released_cells(&c.batch)));
            o.insert("redacted_cells".into(), json!(c.redacted_cells));
            o.insert("withheld_rows".into(), json!(c.operator.withheld_rows));
            o.insert("groups".into(), json!(c.operator.groups));
            o.insert(
                "redacted_by_reason".into(),
                json!(c.operator.redacted_by_reason),
            );
            o.insert("disclosure".into(), json!(r.disclosure.name));
            if let Some(p) = &r.privacy {
                o.insert("rho_charged".into(), json!(p.ledger.charged));
            }
            o.insert("result_sha256".into(), json!(r.checksum));
        }
        Ok(None) => {
            o.insert("outcome".into(), json!("described"));
        }
        Err(e) => {
            let outcome = match e {
                TreError::Refused(_) => "refused",
                TreError::Failed(_) => "failed",
                _ => "error",
            };
            o.insert("outcome".into(), json!(outcome));
            o.insert("rule".into(), json!(e.rule()));
            if let TreError::Refused(r) = e
                && let Some(c) = r.construct
            {
                o.insert("construct".into(), json!(c));
            }
            o.insert(
                "reason".into(),
                json!(match e {
                    TreError::Internal(detail) | TreError::Failed(detail) => detail.clone(),
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

/// A request that passed authentication and the grammar, ready to run.
struct Guarded {
    state: datafusion::execution::SessionState,
    release: grammar::Release,
    disclosure: Disclosure,
    /// Under `dp`: the noise plan, fixed before anything runs.
    dp: Option<dp::Plan>,
    /// The store generation in force (its manifest's).
    generation: u64,
    /// The population the store holds: its collection key's id.
    population: String,
}

/// The longest SQL text a researcher may send: room for a codelist of
/// about 10,000 codes in `IN (…)`, and a bound on how large a tree the
/// parser builds before the grammar sees it.
pub const MAX_SQL_BYTES: usize = 256 * 1024;

/// Authentication, the project's session, planning and the grammar: every
/// path (running, describing, preparing) goes through here, and nothing of
/// the request has run when it returns.
async fn guarded(
    policy: &TrePolicy,
    req: &Request,
    fingerprint: &mut String,
) -> Result<Guarded, TreError> {
    let project = auth::authorise(policy, &req.user, req.token.as_deref(), &req.project)?;
    grammar::text_bounds(&req.sql, MAX_SQL_BYTES)?;
    if project.disclosure.ckm.is_some() && policy.record_keys.is_none() {
        return Err(Refusal::new(
            "no_perturbation_key",
            format!(
                "project {} uses the cell key method ({}), and this TRE was started without its perturbation key (--perturbation-key); nothing is released without it",
                req.project, project.disclosure.name
            ),
        )
        .into());
    }
    if req.sql.to_ascii_lowercase().contains(grammar::HIDDEN) {
        return Err(Refusal::new(
            "reserved_name",
            format!("names starting with {} are reserved", grammar::HIDDEN),
        )
        .into());
    }
    grammar::statement_text(&req.sql)?;
    let manifest = crate::store::read_manifest(&req.store)?;
    if project.disclosure.ckm.is_some()
        && let Some(keys) = &policy.record_keys
    {
        ckm::bind(&req.store, keys)?;
    }
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
    grammar::expression_depth(&plan)?;
    *fingerprint = sha256_hex(plan.display_indent().to_string().as_bytes());
    grammar::statement_kind(&plan)?;
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
    let release = grammar::release(
        &plan,
        &grammar::Scope {
            project,
            views: &session.views,
        },
    )?;
    if project.disclosure.ckm.is_some()
        && release.statistics.iter().any(|s| {
            matches!(
                s.kind,
                grammar::StatKind::Variance | grammar::StatKind::StdDev
            )
        })
    {
        return Err(Refusal::new(
            "statistic_not_available",
            format!(
                "variances and standard deviations are not released under the cell key method ({}): it perturbs counts and sums; ask for counts, sums or means",
                project.disclosure.name
            ),
        )
        .into());
    }
    let dp = project
        .disclosure
        .dp
        .as_ref()
        .map(|params| dp::plan(&release, params, policy))
        .transpose()?;
    Ok(Guarded {
        state,
        release,
        disclosure: project.disclosure,
        dp,
        generation: manifest.generation,
        population: manifest.key_id.clone().unwrap_or_default(),
    })
}

/// The schema a query's released result will have, without running it.
/// The same grammar as [`query`] decides, and the request is audited
/// (`event: describe`).
pub async fn describe(policy: &TrePolicy, req: &Request) -> Result<SchemaRef, TreError> {
    let started = Instant::now();
    let mut fingerprint = String::new();
    let outcome = guarded(policy, req, &mut fingerprint)
        .await
        .map(|g| sdc::released_schema(&g.release, g.dp.as_ref()).0);
    audit(
        "describe",
        req,
        &fingerprint,
        started,
        outcome.as_ref().map(|_| None),
    )?;
    outcome
}

async fn answer(
    policy: &TrePolicy,
    req: &Request,
    fingerprint: &mut String,
) -> Result<Released, TreError> {
    let Guarded {
        state,
        release,
        disclosure,
        dp,
        generation,
        population,
    } = guarded(policy, req, fingerprint).await?;
    let compiled = compile::compile(
        &release,
        &disclosure,
        policy.record_keys.as_ref(),
        dp.as_ref(),
    )
    .map_err(TreError::internal)?;
    // Under `dp` the budget is charged before anything runs; a refusal
    // costs nothing.
    let ledger = match &dp {
        Some(plan) => {
            let budget = policy.researcher(&req.user).map_or(0.0, |r| r.rho_budget);
            Some(
                dp::charge(
                    &req.store,
                    &dp::ledger_path(&req.store, policy.ledger_dir.as_deref(), &population),
                    generation,
                    &req.user,
                    &req.project,
                    budget,
                    plan.rho,
                    fingerprint,
                )
                .map_err(StoreError::from)??,
            )
        }
        None => None,
    };
    // Threshold rule sets control batch by batch; `dp` needs every cell
    // before it can release the domains' product.
    let mut control = dp
        .is_none()
        .then(|| sdc::Control::new(&release, &compiled.parts, &disclosure));
    let mut raw = Vec::new();
    let run = async {
        let mut stream = DataFrame::new(state, compiled.plan.clone())
            .execute_stream()
            .await?;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            match control.as_mut() {
                Some(c) => c.push(&batch)?,
                None => raw.push(batch),
            }
        }
        Ok::<_, datafusion::error::DataFusionError>(())
    };
    match tokio::time::timeout(Duration::from_secs(policy.timeout_seconds), run).await {
        Err(_) => {
            return Err(TreError::Failed(format!(
                "time limit: ran longer than {} s",
                policy.timeout_seconds
            )));
        }
        Ok(Err(e)) => return Err(TreError::Failed(e.to_string())),
        Ok(Ok(())) => {}
    }
    let (result, privacy) = match (control, &dp, ledger) {
        (Some(control), _, _) => {
            let result = control
                .finish(policy.max_rows)
                .map_err(TreError::internal)?
                .map_err(|_| {
                    Refusal::new(
                        "too_many_rows",
                        format!(
                            "more than {} rows would be released; narrow the query or add ORDER BY … LIMIT",
                            policy.max_rows
                        ),
                    )
                })?;
            // A rule set with a budget of released cells charges them now,
            // before anything is released ([`dp::charge_cells`]).
            if let Some(budget) = disclosure.cell_budget {
                let ledger = dp::ledger_path(&req.store, policy.ledger_dir.as_deref(), &population);
                dp::charge_cells(
                    &req.store,
                    &ledger,
                    &req.user,
                    &req.project,
                    budget,
                    released_cells(&result.batch),
                    fingerprint,
                )
                .map_err(StoreError::from)?
                .map_err(TreError::Refused)?;
            }
            (result, None)
        }
        (None, Some(plan), Some(ledger)) => {
            let (result, report) = dp::control(&release, &disclosure, plan, &raw, ledger)
                .map_err(TreError::internal)?;
            (result, Some(report))
        }
        _ => {
            return Err(TreError::internal(
                "differential privacy without its plan or charge",
            ));
        }
    };
    let checksum = sha256_hex(to_csv(&result).as_bytes());
    Ok(Released {
        result,
        disclosure,
        privacy,
        checksum,
        fingerprint: String::new(),
        seconds: 0.0,
    })
}

/// Text of one released cell; redacted statistics read `[REDACTED]`.
fn cell(r: &Controlled, formatters: &[ArrayFormatter], row: usize, col: usize) -> String {
    if r.batch.column(col).is_null(row) && r.kinds[col] != ColumnKind::Key {
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

/// CSV; redacted statistics read `[REDACTED]`.
pub fn to_csv(r: &Controlled) -> String {
    let f = formatters(r);
    let schema = r.batch.schema();
    let mut out = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(",")
        + "\n";
    for row in 0..r.batch.num_rows() {
        let cells: Vec<String> = (0..r.batch.num_columns())
            .map(|c| cell(r, &f, row, c))
            .collect();
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

/// A human table, then the rule set that controlled it.
pub fn to_table(r: &Released) -> String {
    let c = &r.result;
    let f = formatters(c);
    let names = column_names(c);
    let rows: Vec<Vec<String>> = (0..c.batch.num_rows())
        .map(|row| (0..names.len()).map(|col| cell(c, &f, row, col)).collect())
        .collect();
    let mut out = grid(&names, &rows);
    out.push_str(&format!(
        "({} rows; {})\n",
        c.batch.num_rows(),
        sdc::describe(&r.disclosure)
    ));
    if let Some(p) = &r.privacy {
        out.push_str(&format!("(noise: {})\n", p.describe(&names)));
    }
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

/// JSON: columns, rows (redacted statistics as null) and the rule set.
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
                    match c.kinds.get(i) {
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
    let privacy = r.privacy.as_ref().map(|p| p.to_json(&names));
    json!({
        "privacy": privacy,
        "columns": names,
        "kinds": c.kinds.iter().map(|k| format!("{k:?}").to_lowercase()).collect::<Vec<_>>(),
        "rows": rows,
        "disclosure": r.disclosure.name,
        "disclosure_rules": sdc::describe(&r.disclosure),
        "redact_at_or_below": r.disclosure.redact_at_or_below,
        "round_to": r.disclosure.round_to,
        "redacted_cells": c.redacted_cells,
        "result_sha256": r.checksum,
        "plan_fingerprint": r.fingerprint,
    })
}

/// The stack of every thread that plans and runs TRE queries. SQL
/// planning recurses over the query's expressions; [`grammar::text_bounds`]
/// bounds their depth, and this leaves a wide margin over it (the memory is
/// reserved, and used only as deep as a query goes).
pub const THREAD_STACK: usize = 16 * 1024 * 1024;

/// A runtime for the TRE: its worker threads have [`THREAD_STACK`].
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.thread_stack_size(THREAD_STACK).enable_all().build()
}

/// Runs a request on a fresh runtime (for the command line), on one of its
/// worker threads rather than the caller's (whose stack may be small).
pub fn query_blocking(policy: &TrePolicy, req: &Request) -> Result<Released, TreError> {
    let runtime = runtime(Some(2)).map_err(TreError::internal)?;
    let (policy, req) = (policy.clone(), req.clone());
    runtime
        .block_on(runtime.spawn(async move { query(&policy, &req).await }))
        .map_err(TreError::internal)?
}
