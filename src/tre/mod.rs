//! The Trusted Research Environment boundary: `gpdp query` (and, with
//! `gpdp serve`, Arrow Flight SQL) — the Five Safes as code.
//!
//! A request passes, in order: [`auth`] (safe people, safe projects); a
//! per-request [`session`] holding only the project's views with the
//! opt-out filters inside them (safe settings; [`views`] computes their
//! derived columns); DataFusion's SQL planner, which resolves names against
//! those views; the [`grammar`], which accepts only plans in the allow-list
//! of docs/design.md §5.2 and reads them as a typed [`checked::Release`] (safe
//! outputs, before anything runs); [`compile`], which builds the only plan
//! that runs from that release, with every statistic's contributing
//! patients beside it; and the release step (`release.rs`): execution under
//! memory and time limits, then the project's disclosure control (safe
//! outputs, after). [`output`] writes what was released as a table, CSV or
//! JSON.
//!
//! The folders follow the roles:
//! - here, the request pipeline: the modules above, and this module's
//!   entry points ([`query`], [`describe`]) and the request's line in the
//!   audit log (`log_request`);
//! - [`control`] — the disclosure-control rule sets: thresholds, rounding
//!   and dominance ([`control::sdc`]); the cell key method, whose
//!   perturbation follows who contributes to each cell
//!   ([`control::ckm`]); and differential privacy ([`control::dp`]): its
//!   noise plan fixed before running, its cost charged to the researcher's
//!   budget in the audit log, then noise and every cell of the keys' public
//!   domains;
//! - [`aggregates`] — the DataFusion kernels the compiled plan calls by
//!   name, and the cell key method's record keys.
//!
//! The TRE runs as a [`Boundary`]: the policy as loaded from its file,
//! and beside it what the operator hands in when starting it and the
//! policy file never holds — the perturbation key's record keys (a secret)
//! and where the privacy ledgers live. The policy is never patched with
//! them, so a [`TrePolicy`] is the same value for everyone who loads the
//! same file, and whatever reads only the policy (sessions, the grammar,
//! the rule sets, the register and report) cannot reach the secret.
//!
//! Imports point one way, pipeline → control → aggregates; the typed query
//! ([`checked`]) and what a request ends in when nothing is released
//! ([`Refusal`], [`TreError`]) are used at every level and use nothing of
//! the TRE. Every request — released, refused or failed — is appended to
//! the store's hash-chained audit log with its user, project, SQL, plan
//! fingerprint, outcome, rule, privacy charged and, for the operator only,
//! the rows withheld and why.

pub mod aggregates;
pub mod auth;
pub mod checked;
pub mod compile;
pub mod control;
mod error;
pub mod grammar;
pub mod output;
mod release;
pub mod session;
pub mod table;
pub mod views;

pub use error::{EXECUTION_FAILED, Refusal, TreError};
pub use release::Released;

use std::path::PathBuf;
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use serde_json::json;

use self::aggregates::record_keys::RecordKeys;
use self::control::{ckm, dp};
use crate::digest::sha256_hex;
use crate::policy::tre::{Disclosure, TrePolicy};
use crate::store::StoreError;
use crate::store::log::AuditLog;

/// Removes anything that looks like a filesystem path from a message shown
/// to a researcher.
fn scrub(message: &str) -> String {
    message
        .split_whitespace()
        .map(|w| if w.contains('/') { "<path>" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The TRE as its operator starts it: the published policy, and beside it
/// the inputs that are not the policy's to hold.
#[derive(Debug, Clone)]
pub struct Boundary {
    /// The TRE policy, as loaded from its file.
    pub policy: TrePolicy,
    /// The cell key method's record-key function, from the perturbation
    /// key the operator passes (`--perturbation-key`). Projects under
    /// `ckm` are refused without it (`no_perturbation_key`).
    pub record_keys: Option<RecordKeys>,
    /// Where the privacy ledgers live, one per population
    /// ([`dp::ledger_path`]): `--ledger DIR` (or `GPDP_LEDGER`). `None`:
    /// beside the store.
    pub ledger_dir: Option<PathBuf>,
    /// How many partitions a query's scan is split into: the engine's
    /// parallelism, [`session::PARTITIONS`] unless a caller chooses.
    /// Nothing released depends on it: the same question gets the same
    /// answer, noise and all, however the work is split.
    pub partitions: usize,
}

impl Boundary {
    /// The policy alone: no perturbation key (projects under `ckm` are
    /// refused) and the ledgers beside the store.
    pub fn new(policy: TrePolicy) -> Boundary {
        Boundary {
            policy,
            record_keys: None,
            ledger_dir: None,
            partitions: session::PARTITIONS,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub store: PathBuf,
    pub user: String,
    pub token: Option<String>,
    pub project: String,
    pub sql: String,
}

/// Answers one request through the whole boundary and audits it.
pub async fn query(tre: &Boundary, req: &Request) -> Result<Released, TreError> {
    let started = Instant::now();
    let mut fingerprint = String::new();
    let outcome = answer(tre, req, &mut fingerprint).await;
    log_request(
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
/// (`Some`) — including, for the operator, the rows withheld —, `described`
/// (`None`), or `refused` / `failed` / `error` with the rule and reason. A
/// path that is not a store has no log and must not gain one.
fn log_request(
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
            o.insert(
                "cells_released".into(),
                json!(release::released_cells(&c.batch)),
            );
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
    release: checked::Release,
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
    tre: &Boundary,
    req: &Request,
    fingerprint: &mut String,
) -> Result<Guarded, TreError> {
    let policy = &tre.policy;
    let project = auth::authorise(policy, &req.user, req.token.as_deref(), &req.project)?;
    grammar::statement::text_bounds(&req.sql, MAX_SQL_BYTES)?;
    if project.disclosure.ckm.is_some() && tre.record_keys.is_none() {
        return Err(Refusal::new(
            "no_perturbation_key",
            format!(
                "project {} uses the cell key method ({}), and this TRE was started without its perturbation key (--perturbation-key); nothing is released without it",
                req.project, project.disclosure.name
            ),
        )
        .into());
    }
    grammar::statement::reserved_text(&req.sql)?;
    grammar::statement::statement_text(&req.sql)?;
    let manifest = crate::store::read_manifest(&req.store)?;
    if project.disclosure.ckm.is_some()
        && let Some(keys) = &tre.record_keys
    {
        ckm::bind(&req.store, keys)?;
    }
    let session =
        session::open_split(&req.store, &manifest, policy, project, tre.partitions).await?;
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
    grammar::statement::expression_depth(&plan)?;
    *fingerprint = sha256_hex(plan.display_indent().to_string().as_bytes());
    grammar::statement::statement_kind(&plan)?;
    let release = grammar::select::release(
        &plan,
        &grammar::Scope {
            project,
            views: &session.views,
        },
    )?;
    ckm::check_statistics(&release, &project.disclosure)?;
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
pub async fn describe(tre: &Boundary, req: &Request) -> Result<SchemaRef, TreError> {
    let started = Instant::now();
    let mut fingerprint = String::new();
    let outcome = guarded(tre, req, &mut fingerprint).await.map(|g| {
        let noise = g.dp.as_ref().map(|p| p.statistics.as_slice());
        control::released_schema(&g.release, noise).0
    });
    log_request(
        "describe",
        req,
        &fingerprint,
        started,
        outcome.as_ref().map(|_| None),
    )?;
    outcome
}

async fn answer(
    tre: &Boundary,
    req: &Request,
    fingerprint: &mut String,
) -> Result<Released, TreError> {
    let policy = &tre.policy;
    let Guarded {
        state,
        release,
        disclosure,
        dp,
        generation,
        population,
    } = guarded(tre, req, fingerprint).await?;
    let compiled = compile::compile(&release, &disclosure, tre.record_keys.as_ref(), dp.as_ref())
        .map_err(TreError::internal)?;
    // Under `dp` the budget is charged before anything runs; a refusal
    // costs nothing.
    let ledger = match &dp {
        Some(plan) => {
            let budget = policy.researcher(&req.user).map_or(0.0, |r| r.rho_budget);
            Some(
                dp::charge(
                    &req.store,
                    &dp::ledger_path(&req.store, tre.ledger_dir.as_deref(), &population),
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
    let (result, privacy) = release::run(
        policy,
        state,
        &compiled,
        &release,
        &disclosure,
        dp.as_ref(),
        ledger,
    )
    .await?;
    // A threshold rule set with a budget of released cells charges them
    // now, before anything is released ([`dp::charge_cells`]).
    if dp.is_none()
        && let Some(budget) = disclosure.cell_budget
    {
        let ledger = dp::ledger_path(&req.store, tre.ledger_dir.as_deref(), &population);
        dp::charge_cells(
            &req.store,
            &ledger,
            &req.user,
            &req.project,
            budget,
            release::released_cells(&result.batch),
            fingerprint,
        )
        .map_err(StoreError::from)?
        .map_err(TreError::Refused)?;
    }
    let checksum = sha256_hex(output::to_csv(&result).as_bytes());
    Ok(Released {
        result,
        disclosure,
        privacy,
        checksum,
        fingerprint: String::new(),
        seconds: 0.0,
    })
}

/// The stack of every thread that plans and runs TRE queries. SQL
/// planning recurses over the query's expressions; [`grammar::statement::text_bounds`]
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
pub fn query_blocking(tre: &Boundary, req: &Request) -> Result<Released, TreError> {
    let runtime = runtime(Some(2)).map_err(TreError::internal)?;
    let (tre, req) = (tre.clone(), req.clone());
    runtime
        .block_on(runtime.spawn(async move { query(&tre, &req).await }))
        .map_err(TreError::internal)?
}
