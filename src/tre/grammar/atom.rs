//! The leaves of a predicate: a filter column the project allows, compared
//! with literals coerced here, once, to the column's own type (so that the
//! comparison runs without casting data, and cannot fail on it); and
//! `patient_id`, which may be tested only as a cohort.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Column, ScalarValue};
use datafusion::logical_expr::{Expr, Operator};

use super::constructs::{expr_construct, refuse_expr};
use super::{PATIENT_ID, Scope, outside};
use crate::tre::checked::{Lineage, Predicate, Source, lineage};
use crate::tre::error::Refusal;

pub(super) fn patient_column(source: &Source, c: &Column) -> Result<(), Refusal> {
    match lineage(source, c)? {
        (_, l) if l.column == PATIENT_ID => Ok(()),
        (_, l) => {
            let traced = format!("{}.{}", l.view, l.column);
            let what = if c.flat_name() == traced {
                traced
            } else {
                format!("{c} (which is {traced})")
            };
            Err(outside(
                "cohort",
                format!(
                    "{what} is not patient_id; cohorts and EXISTS link patient_id to patient_id"
                ),
            ))
        }
    }
}

pub(super) fn filter_column<'s>(
    source: &'s Source,
    c: &Column,
    scope: &Scope,
) -> Result<(usize, &'s Lineage), Refusal> {
    let (i, l) = lineage(source, c)?;
    if scope.project.filter_columns.contains(&l.column) {
        return Ok((i, l));
    }
    let why = if l.column == PATIENT_ID {
        "patient_id may be tested only as a cohort: patient_id IN (SELECT patient_id FROM … WHERE …)".to_owned()
    } else {
        format!(
            "{}.{} is not a filter column of this project (allowed: {})",
            l.view,
            l.column,
            scope.project.filter_columns.join(", ")
        )
    };
    Err(Refusal::new(
        "filter_column_not_allowed",
        format!("{c}: {why}"),
    ))
}

/// `fcol op literal` (or `literal op fcol`).
pub(super) fn compare(
    left: &Expr,
    op: Operator,
    right: &Expr,
    source: &Source,
    scope: &Scope,
) -> Result<Predicate, Refusal> {
    let (c, other, op) = match (left, right) {
        (Expr::Column(c), other) => (c, other, op),
        (other, Expr::Column(c)) => (c, other, op.swap().unwrap_or(op)),
        (l, r) => {
            let e = if matches!(l, Expr::Literal(..)) { r } else { l };
            return Err(refuse_expr(e));
        }
    };
    let (i, _) = filter_column(source, c, scope)?;
    Ok(Predicate::Compare {
        column: c.clone(),
        op,
        value: literal(other, source.schema.field(i).data_type(), c)?,
    })
}

/// A literal (or a cast of one: `DATE '2024-01-01'`), as a value of the
/// column's own type, so that the comparison runs without casting data.
pub(super) fn literal(
    e: &Expr,
    target: &DataType,
    column: &Column,
) -> Result<ScalarValue, Refusal> {
    let value = match e {
        Expr::Literal(v, _) => v.clone(),
        Expr::Cast(cast) => match cast.expr.as_ref() {
            Expr::Literal(v, _) => v.cast_to(cast.field.data_type()).map_err(|_| {
                Refusal::new(
                    "bad_literal",
                    format!("{v} is not a valid {}", cast.field.data_type()),
                )
            })?,
            other => return Err(refuse_expr(other)),
        },
        Expr::Negative(inner) => match inner.as_ref() {
            Expr::Literal(v, _) => v
                .arithmetic_negate()
                .map_err(|_| Refusal::new("bad_literal", format!("-{v} is not a number")))?,
            other => return Err(refuse_expr(other)),
        },
        other => {
            let (construct, reason) = expr_construct(other);
            return Err(outside(
                construct,
                format!("{reason}; {column} may be compared only with a literal"),
            ));
        }
    };
    if value.is_null() {
        return Err(Refusal::new(
            "bad_literal",
            format!("{column} compared with NULL: use {column} IS NULL"),
        ));
    }
    let bad = || {
        Refusal::new(
            "bad_literal",
            format!("{value} is not a value {column} can have ({target})"),
        )
    };
    let coerced = value.cast_to(target).map_err(|_| bad())?;
    // A lossy cast (1.5 → 1) would compare with a different value than written.
    if value.data_type().is_numeric()
        && target.is_numeric()
        && coerced.cast_to(&value.data_type()).ok().as_ref() != Some(&value)
    {
        return Err(bad());
    }
    if coerced.is_null() {
        return Err(bad());
    }
    Ok(coerced)
}
