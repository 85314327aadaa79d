//! Safe outputs, before anything runs: the allow-list grammar of released
//! queries (DESIGN §5.2).
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
//! [`super::compile`] builds the plan that actually runs. Nothing of the
//! researcher's plan runs except what this module rebuilt from allowed parts.

use std::collections::HashMap;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::logical_expr::expr::{AggregateFunction, Exists, InList, InSubquery};
use datafusion::logical_expr::logical_plan::{Distinct, JoinConstraint, JoinType, SubqueryAlias};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, LogicalPlan, Operator};

use super::checked::{
    GroupKey, Item, JoinKind, Lineage, Order, Output, Predicate, Release, Source, SourceNode,
    StatKind, Statistic, index_of, lineage,
};
use super::error::Refusal;
use crate::policy::tre::Project;

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

/// The construct a refused plan node or expression is, in words.
fn plan_construct(plan: &LogicalPlan) -> (&'static str, String) {
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
fn expr_construct(e: &Expr) -> (&'static str, String) {
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

fn correlated() -> Refusal {
    outside(
        "correlated_subquery",
        "a subquery may refer to the outer query only in EXISTS (… WHERE x.patient_id = outer.patient_id)",
    )
}

fn refuse_expr(e: &Expr) -> Refusal {
    let (construct, reason) = expr_construct(e);
    outside(construct, reason)
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

fn reserved(name: &str) -> Result<(), Refusal> {
    if name.to_ascii_lowercase().starts_with(HIDDEN) {
        return Err(Refusal::new(
            "reserved_name",
            format!("names starting with {HIDDEN} are reserved"),
        ));
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

// ---------------------------------------------------------------------------
// release := [ORDER BY outputs] [LIMIT n] SELECT (group key | statistic)… FROM source GROUP BY keys

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
                let mut by = Vec::new();
                for e in &s.expr {
                    let Expr::Column(c) = unalias(&e.expr) else {
                        return Err(outside(
                            "order_by",
                            "ORDER BY released columns only (by name or position), not expressions",
                        ));
                    };
                    let i = index_of(node.schema(), c)?;
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
                order = Some(by);
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
    let outputs: Vec<Output> = names
        .into_iter()
        .zip(&at)
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
    Ok(Release {
        source,
        keys,
        statistics,
        outputs,
        order: order.unwrap_or_default(),
        limit,
    })
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

/// An expression in the select list of the released result.
fn released_expression(e: &Expr) -> Refusal {
    match unalias(e) {
        Expr::BinaryExpr(_) => outside(
            "arithmetic_on_statistics",
            "no arithmetic on statistics: release the numbers and derive rates from them",
        ),
        other => refuse_expr(other),
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

/// The most terms — words, names, operators and parentheses; not literals,
/// commas or white space — a query may have. Every nesting level of an
/// expression costs at least one term, so this bounds the depth of the tree
/// the SQL parser and planner build (they recurse over it, and a chain of
/// ten thousand `OR`s overflowed the stack inside the planner before the
/// grammar ever saw it). A codelist of any length in `IN (…)` is free.
pub const MAX_TERMS: usize = 2000;

/// Refuses SQL text too long or too complex to plan safely, before it is
/// parsed. Tokenising is a loop; what does not tokenise is left for the
/// parser to report.
pub fn text_bounds(sql: &str, max_bytes: usize) -> Result<(), Refusal> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    if sql.len() > max_bytes {
        return Err(Refusal::new(
            "query_too_long",
            format!(
                "a query may be at most {} KiB of SQL (this one is {} KiB)",
                max_bytes / 1024,
                sql.len().div_ceil(1024)
            ),
        ));
    }
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize() else {
        return Ok(());
    };
    let terms = tokens
        .iter()
        .filter(|t| {
            !matches!(
                t,
                Token::Whitespace(_)
                    | Token::Comma
                    | Token::Number(..)
                    | Token::SingleQuotedString(_)
                    | Token::EOF
            )
        })
        .count();
    if terms > MAX_TERMS {
        return Err(Refusal::new(
            "query_too_complex",
            format!(
                "a query may have at most {MAX_TERMS} words, names and operators (this one has {terms}; values in IN (…) lists are not counted)"
            ),
        ));
    }
    Ok(())
}

/// How deeply an expression may nest. The grammar's own checks and the
/// compiler recurse over expressions; a left-deep chain of thousands of
/// `OR`s would overflow the stack and take the whole server down (an
/// unaudited denial of service). Nothing a researcher writes by hand comes
/// near this; a long list of alternatives is `IN (…)`, which is flat.
pub const MAX_EXPRESSION_DEPTH: usize = 128;

/// Refuses a plan with an expression nested deeper than
/// [`MAX_EXPRESSION_DEPTH`]. It walks with an explicit stack, so it is the
/// one walk that cannot overflow; it runs before anything else looks at
/// the plan's expressions.
pub fn expression_depth(plan: &LogicalPlan) -> Result<(), Refusal> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut deepest = 0;
    // Plans nest only as deep as the SQL parser's recursion limit allows.
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|root| {
            let mut stack = vec![(root, 1usize)];
            while let Some((e, depth)) = stack.pop() {
                deepest = deepest.max(depth);
                if depth > MAX_EXPRESSION_DEPTH {
                    return Ok(TreeNodeRecursion::Stop);
                }
                e.apply_children(|child| {
                    stack.push((child, depth + 1));
                    Ok(TreeNodeRecursion::Continue)
                })?;
            }
            Ok(TreeNodeRecursion::Continue)
        })
    });
    if deepest > MAX_EXPRESSION_DEPTH {
        return Err(outside(
            "expression_depth",
            format!(
                "expressions may nest at most {MAX_EXPRESSION_DEPTH} deep; write a list of alternatives as column IN (…)"
            ),
        ));
    }
    Ok(())
}

/// Refuses, from the SQL text alone, what no plan would name by its rule:
/// a statement the planner cannot plan over a view (`INSERT INTO patients
/// VALUES …` fails in the planner, not as a statement), and parentheses
/// nested past the SQL parser's recursion limit (the parser stops before
/// [`expression_depth`] could see the plan). A single query, EXPLAIN and
/// DESCRIBE go on to be planned and checked as plans; text that does not
/// parse is left for the planner to report as an SQL error.
pub fn statement_text(sql: &str) -> Result<(), Refusal> {
    use datafusion::sql::parser::{DFParser, Statement};
    use datafusion::sql::sqlparser::ast::Statement as Sql;
    let statements = match DFParser::parse_sql(sql) {
        Ok(s) => s,
        Err(e) if e.to_string().contains("RecursionLimitExceeded") => {
            return Err(outside(
                "expression_depth",
                "parentheses and subqueries nest deeper than the SQL parser allows; write a list of alternatives as column IN (…)",
            ));
        }
        Err(_) => return Ok(()),
    };
    if statements.len() != 1 {
        return Ok(());
    }
    match &statements[0] {
        Statement::Statement(s)
            if matches!(
                **s,
                Sql::Query(_) | Sql::Explain { .. } | Sql::ExplainTable { .. }
            ) =>
        {
            Ok(())
        }
        Statement::Explain(_) => Ok(()),
        _ => Err(Refusal::new(
            "statement_not_allowed",
            "only SELECT queries are allowed (no DDL, DML or statements)",
        )),
    }
}

/// Refuses what is not a query at all (EXPLAIN, statements, DDL), before
/// anything else: DataFusion turns analyzer errors into EXPLAIN output.
pub fn statement_kind(plan: &LogicalPlan) -> Result<(), Refusal> {
    match plan {
        LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => Err(Refusal::new(
            "explain_not_allowed",
            "EXPLAIN is not available in the TRE (plans can reveal what queries could not)",
        )),
        LogicalPlan::DescribeTable(_) => Err(Refusal::new(
            "describe_not_allowed",
            "DESCRIBE is not available; the views are documented in the README",
        )),
        LogicalPlan::Statement(_)
        | LogicalPlan::Dml(_)
        | LogicalPlan::Ddl(_)
        | LogicalPlan::Copy(_) => Err(Refusal::new(
            "statement_not_allowed",
            "only SELECT queries are allowed (no DDL, DML or statements)",
        )),
        _ => Ok(()),
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

// statistic := count(*) | count(DISTINCT patient_id) | count(vcol) | sum(vcol) | avg(vcol)
//            | stddev(vcol) | variance(vcol)   [FILTER (WHERE predicate)]

fn statistic(e: &Expr, source: &Source, scope: &Scope) -> Result<Statistic, Refusal> {
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

// source := view | source JOIN source ON a.patient_id = b.patient_id | source WHERE predicate
//         | (SELECT [DISTINCT] columns FROM source) [AS alias]

fn source(plan: &LogicalPlan, scope: &Scope) -> Result<Source, Refusal> {
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
enum Cohorts {
    Allowed,
    /// Inside `FILTER (WHERE …)`, where DataFusion cannot run subqueries.
    Refused,
}

fn predicate(
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

fn patient_column(source: &Source, c: &Column) -> Result<(), Refusal> {
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

fn filter_column<'s>(
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
fn compare(
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
fn literal(e: &Expr, target: &DataType, column: &Column) -> Result<ScalarValue, Refusal> {
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
