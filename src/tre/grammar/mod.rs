//! Safe outputs, before anything runs: the allow-list grammar of released
//! queries (docs/design.md §5.2).
//!
//! The researcher's SQL is planned by DataFusion against the project's views
//! (so names resolve exactly as SQL says), and the logical plan is then read
//! production by production. Whatever is not one of these is refused, naming
//! the rule `outside_grammar` and the construct:
//!
//! ```text
//! release   := [ORDER BY outputs] [LIMIT n] SELECT (group key | statistic [AS name])… FROM source [GROUP BY group keys]
//! source    := view [AS alias]
//!            | source [INNER | LEFT] JOIN source ON a.patient_id = b.patient_id
//!            | source WHERE predicate
//!            | (SELECT [DISTINCT] <columns, unchanged, optionally renamed> FROM source [WHERE predicate]) [AS alias]
//! predicate := atom | predicate AND predicate | predicate OR predicate | NOT predicate
//! atom      := fcol op literal | fcol [NOT] IN (literal, …) | fcol [NOT] BETWEEN literal AND literal
//!            | fcol IS [NOT] NULL | bcol
//!            | patient_id [NOT] IN (SELECT patient_id FROM source [WHERE predicate])
//!            | [NOT] EXISTS (SELECT … FROM source WHERE x.patient_id = outer.patient_id [AND predicate])
//! statistic := count(*) | count(DISTINCT patient_id) | count(vcol) | sum(vcol) | avg(vcol)
//!            | stddev(vcol) | var_samp(vcol)                       [FILTER (WHERE predicate)]
//! ```
//!
//! Every column is traced through aliases, derived tables, CTEs and joins to
//! the view column it is (its *lineage*): a group key must be a view column
//! on the project's `group_keys`, a filter column on its `filter_columns`, a
//! summed column on its `value_columns`, and `patient_id` may appear only in
//! join conditions, cohorts and `count(DISTINCT patient_id)`. A renamed
//! expression is never a column, because a source may only pass columns
//! through. Literals are coerced here, once, to the exact type of the column
//! they are compared with, so nothing in a released plan can fail on data.
//!
//! The result is a [`Release`]: a typed description of the query from which
//! [`compile`](super::compile) builds the plan that actually runs. Nothing
//! of the researcher's plan runs except what this module rebuilt from
//! allowed parts.
//!
//! One file per production, in the order a query is read:
//! - [`statement`] — before and around planning: the SQL text's size and
//!   complexity, one SELECT and nothing else, and how deeply expressions
//!   nest;
//! - [`select`] — `release`: the walk from the plan's root through ORDER BY
//!   and LIMIT to its one aggregate, the group keys and the released
//!   columns;
//! - `statistic` — `statistic`: the aggregate functions released, and
//!   their FILTER;
//! - `source` — `source` and `predicate`, which recurse into each other
//!   (a cohort is a source inside a predicate; a source's WHERE is a
//!   predicate);
//! - `atom` — the leaves of a predicate: a filter column and the literals
//!   it is compared with, coerced to its type, or `patient_id` in a cohort;
//! - `constructs` — what a refused construct is, in words.
//!
//! What every production shares — the [`Scope`] a query is checked
//! against, reserved names, and the `outside_grammar` refusal — is here.

pub mod select;
pub mod statement;

mod atom;
mod constructs;
mod source;
mod statistic;

use std::collections::HashMap;

use datafusion::common::DFSchemaRef;
use datafusion::logical_expr::{Expr, LogicalPlan, Operator};

use super::error::Refusal;
use crate::policy::tre::Project;

#[cfg(doc)]
use super::checked::Release;

/// Names of hidden columns the boundary adds start with this; a query may
/// not use it (in any case).
pub const HIDDEN: &str = "__gpdp_";

/// The view column that identifies a patient.
pub const PATIENT_ID: &str = "patient_id";

/// The most views one source may join: with one row per patient on one
/// side of every join, a patient's rows are multiplied at most by their
/// registrations to this power.
pub const MAX_JOINED: usize = 4;

/// What the grammar checks a query against: the project's allow-lists and
/// the plans of its views (the only subtrees trusted as they are).
pub struct Scope<'a> {
    pub project: &'a Project,
    pub views: &'a HashMap<String, LogicalPlan>,
}

fn outside(construct: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal::outside_grammar(construct, reason)
}

fn is_comparison(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
    )
}

/// Removes aliases (the planner nests them: `count(*) AS count(*) AS n`).
fn unalias(mut e: &Expr) -> &Expr {
    while let Expr::Alias(a) = e {
        e = &a.expr;
    }
    e
}

/// The refusal of a name the boundary keeps for its hidden columns.
fn reserved_name() -> Refusal {
    Refusal::new(
        "reserved_name",
        format!("names starting with {HIDDEN} are reserved"),
    )
}

fn reserved(name: &str) -> Result<(), Refusal> {
    if name.to_ascii_lowercase().starts_with(HIDDEN) {
        return Err(reserved_name());
    }
    Ok(())
}

fn check_names(schema: &DFSchemaRef) -> Result<(), Refusal> {
    for (q, f) in schema.iter() {
        reserved(f.name())?;
        if let Some(q) = q {
            reserved(q.table())?;
        }
    }
    Ok(())
}
