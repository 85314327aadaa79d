//! What a construct outside the grammar is, in words: the construct name
//! and the reason every `outside_grammar` refusal carries, for plan nodes
//! and for expressions.

use datafusion::logical_expr::logical_plan::Distinct;
use datafusion::logical_expr::{Expr, LogicalPlan, Operator};

use super::{is_comparison, outside, unalias};
use crate::tre::error::Refusal;

/// The construct a refused plan node or expression is, in words.
pub(super) fn plan_construct(plan: &LogicalPlan) -> (&'static str, String) {
    match plan {
        LogicalPlan::Union(_) => (
            "set_operation",
            "UNION, INTERSECT and EXCEPT are not available; ask each part as its own query".into(),
        ),
        LogicalPlan::Window(_) => (
            "window_function",
            "window functions can reveal individual rows".into(),
        ),
        LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => (
            "values",
            "a query must read the project's views (no VALUES or constant rows)".into(),
        ),
        LogicalPlan::Aggregate(_) => (
            "nested_aggregate",
            "an aggregate inside a derived table, subquery or join is not available; a query has exactly one GROUP BY, at its top".into(),
        ),
        LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => (
            "order_or_limit_in_source",
            "ORDER BY, LIMIT and OFFSET apply only to the released result".into(),
        ),
        LogicalPlan::Filter(_) => (
            "having",
            "HAVING (a condition on statistics) is not available: conditions on unrounded statistics are an oracle".into(),
        ),
        LogicalPlan::Unnest(_) | LogicalPlan::RecursiveQuery(_) | LogicalPlan::Extension(_) => (
            "unsupported_plan",
            "UNNEST, recursive queries and extensions are not available".into(),
        ),
        LogicalPlan::Distinct(Distinct::On(_)) => {
            ("distinct_on", "DISTINCT ON is not available".into())
        }
        other => (
            "unsupported_plan",
            format!("{} is not part of the query grammar", other.display()),
        ),
    }
}

/// The construct a refused expression is, in words.
pub(super) fn expr_construct(e: &Expr) -> (&'static str, String) {
    match e {
        Expr::ScalarSubquery(_) => (
            "scalar_subquery",
            "scalar subqueries are not available (they release values); use a cohort: patient_id IN (SELECT patient_id FROM … WHERE …)".into(),
        ),
        Expr::OuterReferenceColumn(..) => {
            let r = correlated();
            ("correlated_subquery", r.reason)
        }
        Expr::ScalarFunction(f) => (
            "function",
            format!("functions are not available ({}()); compare columns with literals", f.name()),
        ),
        Expr::Cast(_) | Expr::TryCast(_) => (
            "cast",
            "casts are not available except on literals (DATE '2024-01-01')".into(),
        ),
        Expr::Case(_) => ("case", "CASE is not available".into()),
        Expr::BinaryExpr(b) if !is_comparison(b.op) && !matches!(b.op, Operator::And | Operator::Or) => (
            "expression",
            format!("operator {} is not available: no arithmetic or string operators; compare columns with literals", b.op),
        ),
        Expr::Like(_) | Expr::SimilarTo(_) => (
            "pattern",
            "LIKE and SIMILAR TO are not available; use IN (…) with the codes".into(),
        ),
        Expr::WindowFunction(_) => (
            "window_function",
            "window functions can reveal individual rows".into(),
        ),
        Expr::AggregateFunction(_) => (
            "aggregate_in_predicate",
            "aggregates may appear only as released statistics".into(),
        ),
        Expr::Placeholder(_) => (
            "placeholder",
            "parameters ($1) are not available; write literals".into(),
        ),
        Expr::Literal(..) => (
            "literal",
            "a literal is not a condition or an output; compare a column with it".into(),
        ),
        other => (
            "expression",
            format!("{} is not part of the query grammar", other.schema_name()),
        ),
    }
}

pub(super) fn correlated() -> Refusal {
    outside(
        "correlated_subquery",
        "a subquery may refer to the outer query only in EXISTS (… WHERE x.patient_id = outer.patient_id)",
    )
}

pub(super) fn refuse_expr(e: &Expr) -> Refusal {
    let (construct, reason) = expr_construct(e);
    outside(construct, reason)
}

/// An expression in the select list of the released result.
pub(super) fn released_expression(e: &Expr) -> Refusal {
    match unalias(e) {
        Expr::BinaryExpr(_) => outside(
            "arithmetic_on_statistics",
            "no arithmetic on statistics: release the numbers and derive rates from them",
        ),
        other => refuse_expr(other),
    }
}
