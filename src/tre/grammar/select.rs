//! `release := [ORDER BY outputs] [LIMIT n] SELECT (group key | statistic
//! [AS name])… FROM source [GROUP BY group keys]`: the walk from the
//! plan's root, through ORDER BY, LIMIT and column-only projections, to
//! its one aggregate; then the group keys, the statistics (`statistic.rs`),
//! the source (`source.rs`) and the released columns.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DFSchemaRef, ScalarValue};
use datafusion::logical_expr::logical_plan::{Sort, SubqueryAlias};
use datafusion::logical_expr::{Expr, LogicalPlan};

use super::constructs::{plan_construct, released_expression};
use super::source::source;
use super::statement::statement_kind;
use super::statistic::statistic;
use super::{Scope, check_names, outside, reserved, unalias};
use crate::tre::checked::{GroupKey, Item, Order, Output, Release, Source, index_of, lineage};
use crate::tre::error::Refusal;

/// Reads a planned query as a [`Release`], or refuses it.
pub fn release(plan: &LogicalPlan, scope: &Scope) -> Result<Release, Refusal> {
    check_names(plan.schema())?;
    // Walk down from the root through column-only layers to the aggregate,
    // tracking where each released column is in the current node's schema.
    let names: Vec<String> = plan
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut at: Vec<usize> = (0..names.len()).collect();
    let mut order: Option<Vec<Order>> = None;
    let mut limit: Option<usize> = None;
    let mut node = plan;
    let aggregate = loop {
        match node {
            LogicalPlan::Limit(l) => {
                if order.is_some() || limit.is_some() {
                    return Err(outside(
                        "limit",
                        "one LIMIT, after ORDER BY, on the released result",
                    ));
                }
                limit = Some(limit_of(l)?);
                node = &l.input;
            }
            LogicalPlan::Sort(s) => {
                if order.is_some() {
                    return Err(outside("order_by", "one ORDER BY, on the released result"));
                }
                if s.fetch.is_some() {
                    return Err(outside("limit", "LIMIT inside ORDER BY is not available"));
                }
                order = Some(order_by(s, node.schema(), &at)?);
                node = &s.input;
            }
            LogicalPlan::Projection(p) => {
                let mut next = Vec::with_capacity(at.len());
                for &i in &at {
                    let Expr::Column(c) = unalias(&p.expr[i]) else {
                        return Err(if contains_aggregate(&p.input) {
                            released_expression(&p.expr[i])
                        } else {
                            not_an_aggregate()
                        });
                    };
                    next.push(index_of(p.input.schema(), c)?);
                }
                check_names(p.input.schema())?;
                at = next;
                node = &p.input;
            }
            LogicalPlan::SubqueryAlias(a) if !is_view(a, scope) => {
                reserved(a.alias.table())?;
                node = &a.input;
            }
            LogicalPlan::Aggregate(a) => break a,
            // A condition on an aggregate's output is HAVING, however written.
            LogicalPlan::Filter(f) if contains_aggregate(&f.input) => {
                let (construct, reason) = plan_construct(node);
                return Err(outside(construct, reason));
            }
            LogicalPlan::Distinct(_)
            | LogicalPlan::TableScan(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Join(_) => return Err(not_an_aggregate()),
            LogicalPlan::Explain(_)
            | LogicalPlan::Analyze(_)
            | LogicalPlan::DescribeTable(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Ddl(_)
            | LogicalPlan::Copy(_) => return Err(statement_kind(node).unwrap_err()),
            other => {
                let (construct, reason) = plan_construct(other);
                return Err(outside(construct, reason));
            }
        }
    };
    let source = source(&aggregate.input, scope)?;
    let groups = aggregate.group_expr.len();
    let mut keys = Vec::with_capacity(groups);
    for g in &aggregate.group_expr {
        keys.push(group_key(g, &source, scope)?);
    }
    let mut statistics = Vec::with_capacity(aggregate.aggr_expr.len());
    for e in &aggregate.aggr_expr {
        statistics.push(statistic(e, &source, scope)?);
    }
    let outputs = outputs(names, &at, &keys)?;
    Ok(Release {
        source,
        keys,
        statistics,
        outputs,
        order: order.unwrap_or_default(),
        limit,
    })
}

/// `ORDER BY` of the released result: released columns only, by name or
/// position (`at[i]` is where output `i` is in `schema`).
fn order_by(s: &Sort, schema: &DFSchemaRef, at: &[usize]) -> Result<Vec<Order>, Refusal> {
    let mut by = Vec::new();
    for e in &s.expr {
        let Expr::Column(c) = unalias(&e.expr) else {
            return Err(outside(
                "order_by",
                "ORDER BY released columns only (by name or position), not expressions",
            ));
        };
        let i = index_of(schema, c)?;
        let output = at.iter().position(|&a| a == i).ok_or_else(|| {
            outside(
                "order_by",
                format!("ORDER BY {c}: order by a column the query releases"),
            )
        })?;
        by.push(Order {
            output,
            descending: !e.asc,
            nulls_first: e.nulls_first,
        });
    }
    Ok(by)
}

/// The released columns in SELECT order (`at[i]` is where column `i` is in
/// the aggregate's output: group keys, then statistics): every group key
/// released, at least one statistic, no two columns of one name.
fn outputs(names: Vec<String>, at: &[usize], keys: &[GroupKey]) -> Result<Vec<Output>, Refusal> {
    let groups = keys.len();
    let outputs: Vec<Output> = names
        .into_iter()
        .zip(at)
        .map(|(name, &i)| Output {
            name,
            item: if i < groups {
                Item::Key(i)
            } else {
                Item::Statistic(i - groups)
            },
        })
        .collect();
    for (k, key) in keys.iter().enumerate() {
        if !outputs.iter().any(|o| o.item == Item::Key(k)) {
            return Err(outside(
                "unreleased_group_key",
                format!(
                    "GROUP BY {}: select every group key, so that each released row says which group it is",
                    key.column
                ),
            ));
        }
    }
    if !outputs.iter().any(|o| matches!(o.item, Item::Statistic(_))) {
        return Err(outside(
            "no_statistic",
            "a released result needs at least one statistic (count, sum, avg…); the groups alone would show which exist",
        ));
    }
    for (i, o) in outputs.iter().enumerate() {
        if outputs[..i].iter().any(|p| p.name == o.name) {
            return Err(outside(
                "duplicate_name",
                format!(
                    "two released columns are called {:?}; name them apart with AS",
                    o.name
                ),
            ));
        }
    }
    Ok(outputs)
}

fn not_an_aggregate() -> Refusal {
    outside(
        "not_an_aggregate",
        "a released result must be statistics over groups: SELECT keys, count(*)… FROM … GROUP BY keys; row-level results are never released",
    )
}

/// Whether an alias stands for one of the project's views (the planner
/// inlines a view as an alias of the view's own plan).
fn is_view(a: &SubqueryAlias, scope: &Scope) -> bool {
    scope.views.values().any(|v| v == a.input.as_ref())
}

fn contains_aggregate(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Aggregate(_) => true,
        LogicalPlan::Projection(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::Filter(_) => plan.inputs().into_iter().any(contains_aggregate),
        _ => false,
    }
}

fn limit_of(l: &datafusion::logical_expr::Limit) -> Result<usize, Refusal> {
    let literal = |e: &Expr| match e {
        Expr::Literal(v, _) if !v.is_null() => {
            v.cast_to(&DataType::UInt64).ok().and_then(|v| match v {
                ScalarValue::UInt64(Some(n)) => usize::try_from(n).ok(),
                _ => None,
            })
        }
        _ => None,
    };
    if let Some(skip) = &l.skip
        && literal(skip) != Some(0)
    {
        return Err(outside(
            "offset",
            "OFFSET is not available (it walks a result row by row)",
        ));
    }
    match &l.fetch {
        Some(f) => literal(f).ok_or_else(|| outside("limit", "LIMIT takes a whole number")),
        None => Ok(usize::MAX),
    }
}

fn group_key(g: &Expr, source: &Source, scope: &Scope) -> Result<GroupKey, Refusal> {
    let column = match g {
        Expr::Column(c) => c,
        Expr::GroupingSet(_) => {
            return Err(outside(
                "grouping_sets",
                "ROLLUP, CUBE and GROUPING SETS are not available",
            ));
        }
        other => {
            return Err(Refusal::new(
                "group_key_not_allowed",
                format!(
                    "GROUP BY {}: group keys are view columns, not expressions (allowed: {})",
                    other.schema_name(),
                    scope.project.group_keys.join(", ")
                ),
            ));
        }
    };
    let (i, l) = lineage(source, column)?;
    if !scope.project.group_keys.contains(&l.column) {
        return Err(Refusal::new(
            "group_key_not_allowed",
            format!(
                "{column} is {}.{}, which is not a group key of this project (allowed: {})",
                l.view,
                l.column,
                scope.project.group_keys.join(", ")
            ),
        ));
    }
    Ok(GroupKey {
        column: column.clone(),
        lineage: l.clone(),
        field: source.schema.field(i).as_ref().clone(),
    })
}
