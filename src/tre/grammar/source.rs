//! `source := view [AS alias] | source [INNER | LEFT] JOIN source ON
//! a.patient_id = b.patient_id | source WHERE predicate | (SELECT
//! [DISTINCT] columns FROM source [WHERE predicate]) [AS alias]` and
//! `predicate := atom | predicate AND predicate | predicate OR predicate |
//! NOT predicate`, with the cohorts among the atoms (`patient_id [NOT] IN
//! (SELECT patient_id FROM source …)`, `[NOT] EXISTS (…)`). The two
//! productions recurse into each other, so they are read here together;
//! the other atoms are in [`atom`](super::atom).

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::logical_expr::expr::{Exists, InList, InSubquery};
use datafusion::logical_expr::logical_plan::{Distinct, JoinConstraint, JoinType, SubqueryAlias};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, LogicalPlan, Operator};

use super::atom::{compare, filter_column, literal, patient_column};
use super::constructs::{correlated, expr_construct, plan_construct, refuse_expr};
use super::{
    MAX_JOINED, PATIENT_ID, Scope, check_names, is_comparison, outside, reserved, unalias,
};
use crate::tre::checked::{JoinKind, Lineage, Predicate, Source, SourceNode, index_of, lineage};
use crate::tre::error::Refusal;

pub(super) fn source(plan: &LogicalPlan, scope: &Scope) -> Result<Source, Refusal> {
    check_names(plan.schema())?;
    let schema = plan.schema().clone();
    match plan {
        // Views are the only tables in a researcher's session; the planner
        // inlines each as an alias of the view's plan.
        LogicalPlan::SubqueryAlias(a)
            if let Some((name, _)) = scope.views.iter().find(|(_, v)| *v == a.input.as_ref()) =>
        {
            view(a, name, scope)
        }
        LogicalPlan::TableScan(scan) => Err(unknown_table(scan.table_name.table(), scope)),
        LogicalPlan::SubqueryAlias(a) => {
            reserved(a.alias.table())?;
            let input = source(&a.input, scope)?;
            Ok(Source {
                lineage: input.lineage.clone(),
                root: input.root,
                per_patient: input.per_patient,
                joined: input.joined,
                schema,
                node: SourceNode::Alias {
                    alias: a.alias.clone(),
                    input: Box::new(input),
                },
            })
        }
        LogicalPlan::Projection(p) => {
            let input = source(&p.input, scope)?;
            select(&p.expr, input, schema)
        }
        LogicalPlan::Filter(f) => {
            let input = source(&f.input, scope)?;
            let predicate = predicate(&f.predicate, &input, scope, Cohorts::Allowed)?;
            Ok(Source {
                lineage: input.lineage.clone(),
                root: input.root,
                per_patient: input.per_patient,
                joined: input.joined,
                schema,
                node: SourceNode::Filter {
                    predicate,
                    input: Box::new(input),
                },
            })
        }
        LogicalPlan::Distinct(Distinct::All(inner)) => distinct(source(inner, scope)?, schema),
        // `SELECT patient_id FROM … GROUP BY patient_id`: DISTINCT by another name.
        LogicalPlan::Aggregate(a) if a.aggr_expr.is_empty() => {
            let input = source(&a.input, scope)?;
            let selected = select(&a.group_expr, input, schema.clone())?;
            distinct(selected, schema)
        }
        LogicalPlan::Join(j) => join(j, scope),
        other => {
            let (construct, reason) = plan_construct(other);
            Err(outside(construct, reason))
        }
    }
}

fn view(a: &SubqueryAlias, name: &str, scope: &Scope) -> Result<Source, Refusal> {
    let schema = a.schema.clone();
    let lineage: Vec<Lineage> = schema
        .fields()
        .iter()
        .map(|f| Lineage {
            view: name.to_owned(),
            column: f.name().clone(),
        })
        .collect();
    let root = lineage.iter().position(|l| l.column == PATIENT_ID);
    if root.is_none() || !scope.project.tables.iter().any(|t| t == name) {
        return Err(unknown_table(name, scope));
    }
    Ok(Source {
        node: SourceNode::View {
            name: name.to_owned(),
            plan: LogicalPlan::SubqueryAlias(a.clone()),
        },
        schema,
        lineage,
        root,
        per_patient: name == "patients",
        joined: 1,
    })
}

fn unknown_table(name: &str, scope: &Scope) -> Refusal {
    Refusal::new(
        "unknown_table",
        format!(
            "{name} is not one of this project's views ({})",
            scope.project.tables.join(", ")
        ),
    )
}

fn select(exprs: &[Expr], input: Source, schema: DFSchemaRef) -> Result<Source, Refusal> {
    let mut columns = Vec::with_capacity(exprs.len());
    let mut lineage = Vec::with_capacity(exprs.len());
    let mut root = None;
    for (k, e) in exprs.iter().enumerate() {
        let Expr::Column(c) = unalias(e) else {
            let (construct, reason) = expr_construct(unalias(e));
            return Err(outside(
                construct,
                format!(
                    "{reason} (derived tables and CTEs pass view columns through, optionally renamed; {} is computed)",
                    e.schema_name()
                ),
            ));
        };
        let i = index_of(&input.schema, c)?;
        if root.is_none() && input.root == Some(i) {
            root = Some(k);
        }
        lineage.push(input.lineage[i].clone());
        columns.push((c.clone(), schema.field(k).name().clone()));
    }
    Ok(Source {
        per_patient: input.per_patient,
        joined: input.joined,
        node: SourceNode::Select {
            columns,
            input: Box::new(input),
        },
        schema,
        lineage,
        root,
    })
}

fn distinct(input: Source, schema: DFSchemaRef) -> Result<Source, Refusal> {
    if input.root.is_none() {
        return Err(outside(
            "distinct",
            "SELECT DISTINCT must keep patient_id (each row stays one patient's)",
        ));
    }
    Ok(Source {
        lineage: input.lineage.clone(),
        root: input.root,
        per_patient: input.per_patient || input.lineage.iter().all(|l| l.column == PATIENT_ID),
        joined: input.joined,
        schema,
        node: SourceNode::Distinct(Box::new(input)),
    })
}

fn join(j: &datafusion::logical_expr::Join, scope: &Scope) -> Result<Source, Refusal> {
    let kind = match j.join_type {
        JoinType::Inner => JoinKind::Inner,
        JoinType::Left => JoinKind::Left,
        other => {
            return Err(outside(
                "join_type",
                format!(
                    "{other} JOIN (also how INTERSECT and EXCEPT are planned) is not available; use JOIN or LEFT JOIN on patient_id, or cohorts"
                ),
            ));
        }
    };
    if !matches!(
        j.join_constraint,
        JoinConstraint::On | JoinConstraint::Using
    ) {
        return Err(outside(
            "join_condition",
            "join with ON a.patient_id = b.patient_id",
        ));
    }
    let left = source(&j.left, scope)?;
    let right = source(&j.right, scope)?;
    let mut conditions: Vec<(&Expr, &Expr)> = j.on.iter().map(|(l, r)| (l, r)).collect();
    if let Some(filter) = &j.filter {
        for conjunct in split_conjunction(filter) {
            match conjunct {
                Expr::BinaryExpr(BinaryExpr {
                    left: l,
                    op: Operator::Eq,
                    right: r,
                }) => conditions.push((l, r)),
                _ => return Err(join_condition()),
            }
        }
    }
    let [(a, b)] = conditions[..] else {
        return Err(join_condition());
    };
    let (Expr::Column(a), Expr::Column(b)) = (a, b) else {
        return Err(join_condition());
    };
    // The planner may write the condition either way round.
    let is_patient =
        |s: &Source, c: &Column| lineage(s, c).is_ok_and(|(_, l)| l.column == PATIENT_ID);
    let on = if is_patient(&left, a) && is_patient(&right, b) {
        (a.clone(), b.clone())
    } else if is_patient(&left, b) && is_patient(&right, a) {
        (b.clone(), a.clone())
    } else {
        return Err(join_condition());
    };
    let rows_own = left.root == Some(index_of(&left.schema, &on.0)?)
        && right.root == Some(index_of(&right.schema, &on.1)?);
    if !left.per_patient && !right.per_patient {
        return Err(outside(
            "fan_out_join",
            "a table of events may be joined only to one row per patient: patients, or (SELECT DISTINCT patient_id FROM … WHERE …); or use a cohort, patient_id IN (SELECT patient_id FROM … WHERE …)",
        ));
    }
    let joined = left.joined + right.joined;
    if joined > MAX_JOINED {
        return Err(outside(
            "too_many_joins",
            format!(
                "a query may join at most {MAX_JOINED} views; use cohorts (IN / EXISTS) for the rest"
            ),
        ));
    }
    let mut lineage = left.lineage.clone();
    lineage.extend(right.lineage.iter().cloned());
    Ok(Source {
        per_patient: left.per_patient && right.per_patient,
        joined,
        root: left.root,
        schema: j.schema.clone(),
        lineage,
        node: SourceNode::Join {
            left: Box::new(left),
            right: Box::new(right),
            kind,
            on,
            rows_own,
        },
    })
}

fn join_condition() -> Refusal {
    outside(
        "join_condition",
        "tables are joined only with JOIN … ON a.patient_id = b.patient_id (no other condition, no cross joins)",
    )
}

// predicate := atom | predicate AND predicate | predicate OR predicate | NOT predicate

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Cohorts {
    Allowed,
    /// Inside `FILTER (WHERE …)`, where DataFusion cannot run subqueries.
    Refused,
}

pub(super) fn predicate(
    e: &Expr,
    source: &Source,
    scope: &Scope,
    cohorts: Cohorts,
) -> Result<Predicate, Refusal> {
    let recurse = |x: &Expr| predicate(x, source, scope, cohorts).map(Box::new);
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And => Ok(Predicate::And(recurse(left)?, recurse(right)?)),
            Operator::Or => Ok(Predicate::Or(recurse(left)?, recurse(right)?)),
            op if is_comparison(*op) => compare(left, *op, right, source, scope),
            _ => Err(refuse_expr(e)),
        },
        Expr::Not(inner) => Ok(Predicate::Not(recurse(inner)?)),
        Expr::Column(c) => {
            let (i, _) = filter_column(source, c, scope)?;
            if source.schema.field(i).data_type() != &DataType::Boolean {
                return Err(outside(
                    "non_boolean_condition",
                    format!("{c} is not true or false; compare it with a literal"),
                ));
            }
            Ok(Predicate::Compare {
                column: c.clone(),
                op: Operator::Eq,
                value: ScalarValue::Boolean(Some(true)),
            })
        }
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
            let Expr::Column(c) = inner.as_ref() else {
                return Err(refuse_expr(inner));
            };
            filter_column(source, c, scope)?;
            Ok(Predicate::IsNull {
                column: c.clone(),
                negated: matches!(e, Expr::IsNotNull(_)),
            })
        }
        Expr::Between(Between {
            expr,
            negated,
            low,
            high,
        }) => {
            let Expr::Column(c) = expr.as_ref() else {
                return Err(refuse_expr(expr));
            };
            let (i, _) = filter_column(source, c, scope)?;
            let t = source.schema.field(i).data_type();
            Ok(Predicate::Between {
                column: c.clone(),
                low: literal(low, t, c)?,
                high: literal(high, t, c)?,
                negated: *negated,
            })
        }
        Expr::InList(InList {
            expr,
            list,
            negated,
        }) => {
            let Expr::Column(c) = expr.as_ref() else {
                return Err(refuse_expr(expr));
            };
            let (i, _) = filter_column(source, c, scope)?;
            let t = source.schema.field(i).data_type();
            let values = list
                .iter()
                .map(|v| literal(v, t, c))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Predicate::InList {
                column: c.clone(),
                values,
                negated: *negated,
            })
        }
        Expr::InSubquery(InSubquery {
            expr,
            subquery,
            negated,
        }) if cohorts == Cohorts::Allowed => {
            let Expr::Column(c) = expr.as_ref() else {
                return Err(refuse_expr(expr));
            };
            patient_column(source, c)?;
            if !subquery.outer_ref_columns.is_empty() {
                return Err(correlated());
            }
            let cohort = self::source(&subquery.subquery, scope)?;
            if cohort.lineage.len() != 1 || cohort.lineage[0].column != PATIENT_ID {
                return Err(outside(
                    "cohort",
                    "a cohort is patient_id IN (SELECT patient_id FROM … WHERE …)",
                ));
            }
            let (q, f) = cohort.schema.qualified_field(0);
            let member = Column::new(q.cloned(), f.name());
            let rows_own =
                source.root == Some(index_of(&source.schema, c)?) && cohort.root == Some(0);
            Ok(Predicate::Cohort {
                column: c.clone(),
                negated: *negated,
                cohort: Box::new(cohort),
                member,
                rows_own,
            })
        }
        Expr::Exists(Exists { subquery, negated }) if cohorts == Cohorts::Allowed => {
            exists(&subquery.subquery, *negated, source, scope)
        }
        Expr::InSubquery(_) | Expr::Exists(_) => Err(outside(
            "subquery_in_filter",
            "cohorts (IN / EXISTS) go in WHERE, not in an aggregate's FILTER",
        )),
        other => Err(refuse_expr(other)),
    }
}

/// `[NOT] EXISTS (SELECT … FROM source WHERE inner.patient_id = outer.patient_id [AND predicate])`,
/// read as the cohort `outer.patient_id [NOT] IN (SELECT inner.patient_id FROM source WHERE predicate)`.
fn exists(
    plan: &LogicalPlan,
    negated: bool,
    outer: &Source,
    scope: &Scope,
) -> Result<Predicate, Refusal> {
    let not_cohort = || {
        outside(
            "exists",
            "EXISTS takes (SELECT … FROM … WHERE x.patient_id = outer.patient_id [AND condition])",
        )
    };
    // The select list of an EXISTS subquery is never evaluated; it may hold
    // only literals and columns all the same.
    let LogicalPlan::Projection(p) = plan else {
        return Err(not_cohort());
    };
    for e in &p.expr {
        if !matches!(unalias(e), Expr::Literal(..) | Expr::Column(_)) {
            return Err(refuse_expr(unalias(e)));
        }
    }
    let LogicalPlan::Filter(f) = p.input.as_ref() else {
        return Err(not_cohort());
    };
    let inner = source(&f.input, scope)?;
    let mut link = None;
    let mut rest = Vec::new();
    for conjunct in split_conjunction(&f.predicate) {
        if let Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) = conjunct
        {
            let pair = match (left.as_ref(), right.as_ref()) {
                (Expr::Column(i), Expr::OuterReferenceColumn(_, o))
                | (Expr::OuterReferenceColumn(_, o), Expr::Column(i)) => Some((i, o)),
                _ => None,
            };
            if let Some((i, o)) = pair {
                if link.is_some() {
                    return Err(not_cohort());
                }
                patient_column(&inner, i)?;
                patient_column(outer, o)?;
                link = Some((i.clone(), o.clone()));
                continue;
            }
        }
        rest.push(conjunct.clone());
    }
    let Some((member, column)) = link else {
        return Err(not_cohort());
    };
    let rows_own = outer.root == Some(index_of(&outer.schema, &column)?)
        && inner.root == Some(index_of(&inner.schema, &member)?);
    let cohort = match rest.into_iter().reduce(|a, b| a.and(b)) {
        None => inner,
        Some(condition) => Source {
            lineage: inner.lineage.clone(),
            root: inner.root,
            per_patient: inner.per_patient,
            joined: inner.joined,
            schema: inner.schema.clone(),
            node: SourceNode::Filter {
                predicate: predicate(&condition, &inner, scope, Cohorts::Allowed)?,
                input: Box::new(inner),
            },
        },
    };
    Ok(Predicate::Cohort {
        column,
        negated,
        cohort: Box::new(cohort),
        member,
        rows_own,
    })
}
