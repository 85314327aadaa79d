//! `statistic := count(*) | count(DISTINCT patient_id) | count(vcol) |
//! sum(vcol) | avg(vcol) | stddev(vcol) | var_samp(vcol) [FILTER (WHERE
//! predicate)]`: an aggregate function of the released result, over a
//! bare column the project allows, with its own FILTER (which holds no
//! cohort: DataFusion cannot run subqueries there).

use datafusion::common::{Column, ScalarValue};
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::expr::AggregateFunction;

use super::constructs::released_expression;
use super::source::{Cohorts, predicate};
use super::{PATIENT_ID, Scope, outside, unalias};
use crate::tre::checked::{Source, StatKind, Statistic, lineage};
use crate::tre::error::Refusal;

pub(super) fn statistic(e: &Expr, source: &Source, scope: &Scope) -> Result<Statistic, Refusal> {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = unalias(e) else {
        return Err(released_expression(e));
    };
    let name = func.name().to_ascii_lowercase();
    if !params.order_by.is_empty() || params.null_treatment.is_some() {
        return Err(outside(
            "aggregate_modifier",
            format!("{name}(… ORDER BY / IGNORE NULLS) is not available"),
        ));
    }
    let filter = params
        .filter
        .as_deref()
        .map(|f| predicate(f, source, scope, Cohorts::Refused))
        .transpose()?;
    let column_arg = || -> Result<&Column, Refusal> {
        match params.args.as_slice() {
            [Expr::Column(c)] => Ok(c),
            [other] => Err(outside(
                "aggregate_argument",
                format!(
                    "{name}({}): statistics take a bare column, not an expression",
                    other.schema_name()
                ),
            )),
            _ => Err(outside(
                "aggregate_argument",
                format!("{name}() takes one column"),
            )),
        }
    };
    let value_column = |c: &Column| -> Result<(), Refusal> {
        let (_, l) = lineage(source, c)?;
        if scope.project.value_columns.contains(&l.column) {
            Ok(())
        } else {
            Err(Refusal::new(
                "value_column_not_allowed",
                format!(
                    "{name}({c}): {}.{} is not a value column of this project (allowed: {})",
                    l.view,
                    l.column,
                    scope.project.value_columns.join(", ")
                ),
            ))
        }
    };
    let kind = match (name.as_str(), params.distinct) {
        ("count", false) if is_count_star(&params.args) => StatKind::Rows,
        ("count", true) => {
            let c = column_arg()?;
            if lineage(source, c)?.1.column != PATIENT_ID {
                return Err(outside(
                    "count_distinct",
                    format!("count(DISTINCT {c}): only count(DISTINCT patient_id) counts patients"),
                ));
            }
            StatKind::Patients
        }
        ("count", false) => {
            let c = column_arg()?;
            if lineage(source, c)?.1.column != PATIENT_ID {
                value_column(c)?;
            }
            StatKind::Values
        }
        (_, true) => {
            return Err(outside(
                "aggregate_distinct",
                format!("{name}(DISTINCT …) is not available"),
            ));
        }
        ("sum", false) => StatKind::Sum,
        ("avg", false) => StatKind::Mean,
        ("var_samp" | "var" | "variance", false) => StatKind::Variance,
        ("stddev" | "stddev_samp", false) => StatKind::StdDev,
        _ => {
            return Err(outside(
                "aggregate_function",
                format!(
                    "{name}() is not a released statistic; use count(*), count(DISTINCT patient_id), count, sum, avg, stddev or var_samp"
                ),
            ));
        }
    };
    let column = match kind {
        StatKind::Rows => None,
        StatKind::Patients | StatKind::Values => Some(column_arg()?.clone()),
        _ => {
            let c = column_arg()?;
            value_column(c)?;
            Some(c.clone())
        }
    };
    Ok(Statistic {
        kind,
        column,
        filter,
    })
}

/// `count(*)` plans as `count(Int64(1))` (and `count(1)` is the same).
fn is_count_star(args: &[Expr]) -> bool {
    matches!(args, [] | [Expr::Literal(ScalarValue::Int64(Some(1)), _)])
}
