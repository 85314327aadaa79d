//! From a [`Release`] to the plan that runs: the only plan that ever runs
//! in a researcher's session is built here, from the parts the grammar
//! accepted, in standard DataFusion expressions and named aggregates
//! (`gpdp_patients`, `gpdp_dominance`, `gpdp_contributors`,
//! `gpdp_bounded`) — so that it can also run on Ballista.
//!
//! Every source carries one hidden column, the row's patient (`patient_key`
//! of the left-most view: every row of a source belongs to exactly one
//! patient, because views are joined only on `patient_id`). Each statistic
//! is computed as its *parts* — counts, sums, sums of squares — next to the
//! number of distinct patients who contribute to it (its own, under its
//! own FILTER and non-null column), so disclosure control decides per
//! statistic ([`super::control::sdc`]). Means and variances are derived from the
//! parts in Rust after control, never inside SQL.
//!
//! Three shapes:
//! - **per cell** (threshold-only rule sets, and counts under the cell key
//!   method): one aggregate; contributors are counted up to one more than
//!   the threshold only ([`super::aggregates::patients`]), which costs one comparison
//!   per row once a cell has enough patients, or exactly with their cell
//!   key ([`super::aggregates::contributors`]);
//! - **per patient** (rule sets that check dominance, and sums under the
//!   cell key method): an inner aggregate by group keys and patient gives
//!   each patient's contribution to each statistic, and the outer
//!   aggregate sums them, counts contributors exactly and runs the N-K and
//!   p% checks over patients, not records;
//! - **bounded** (differential privacy): one aggregate without GROUP BY
//!   ([`super::aggregates::bounded`]) bounds each patient's contribution and totals
//!   every cell of the keys' public domains.
//!
//! Cohort subqueries keep only non-null patients, so `NOT IN` never meets a
//! NULL (which would empty the whole result: an oracle). A cohort that links
//! the rows' own patients is matched on the integer patient keys both sides
//! carry (1.5× faster than on 32-byte pseudonyms); two patients sharing a
//! 64-bit key (about one pair in 10⁴ among 60 million) would only blur a
//! statistic, never a patient count behind it.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Column, DFSchemaRef, ExprSchema, Result};
use datafusion::functions_aggregate::expr_fn::{count, count_distinct, max, min, sum};
use datafusion::logical_expr::expr::InList;
use datafusion::logical_expr::logical_plan::{Filter, Projection, SubqueryAlias};
use datafusion::logical_expr::{
    Between, Expr, JoinType, LogicalPlan, LogicalPlanBuilder, ScalarUDF, binary_expr, cast,
    in_subquery, not_in_subquery,
};
use datafusion::prelude::lit;

use super::aggregates::bounded::{Adds, Spec, bounded};
use super::aggregates::contributors::{contributors, unpack};
use super::aggregates::patients::patients_at_least;
use super::aggregates::record_keys::{RecordKeys, value_key_udf};
use super::checked::{JoinKind, Predicate, Release, Source, SourceNode, StatKind, Statistic};
use super::control::dominance::dominance;
use super::control::dp::Plan as DpPlan;
use super::control::sdc::Parts;
use crate::policy::tre::Disclosure;

/// The hidden column that carries each row's patient.
pub const PATIENT: &str = "__gpdp_patient";

/// The compiled plan: group keys first, then every statistic's parts.
pub struct Compiled {
    pub plan: LogicalPlan,
    pub parts: Vec<Parts>,
}

/// Builds the plan for `release` under `rules`; the cell key method needs
/// the TRE's record keys, differential privacy its noise plan.
pub fn compile(
    release: &Release,
    rules: &Disclosure,
    keys: Option<&RecordKeys>,
    dp: Option<&DpPlan>,
) -> Result<Compiled> {
    let input = source(&release.source)?;
    if rules.dp.is_some() {
        return match dp {
            Some(plan) => bounded_plan(release, input, plan),
            None => Err(datafusion::error::DataFusionError::Internal(
                "differential privacy without its noise plan".into(),
            )),
        };
    }
    let counts_only = release.statistics.iter().all(|s| s.kind.is_count());
    match (rules.ckm, keys) {
        // Counts need only each cell's contributors and cell key, which
        // one aggregate gives; sums and means need each patient's
        // contribution, for the largest one scales their noise.
        (Some(_), Some(keys)) if counts_only => per_cell(release, input, rules, Some(keys)),
        (Some(_), Some(keys)) => per_patient(release, input, rules, Some(keys)),
        (Some(_), None) => Err(datafusion::error::DataFusionError::Internal(
            "the cell key method without record keys".into(),
        )),
        (None, _) if rules.checks_contributions() => per_patient(release, input, rules, None),
        (None, _) => per_cell(release, input, rules, None),
    }
}

/// The aggregate expressions of one aggregate, named in order.
#[derive(Default)]
struct Outputs {
    offset: usize,
    exprs: Vec<Expr>,
}

impl Outputs {
    fn new(offset: usize) -> Outputs {
        Outputs {
            offset,
            exprs: Vec::new(),
        }
    }

    fn push(&mut self, e: Expr) -> usize {
        let i = self.offset + self.exprs.len();
        self.exprs.push(e.alias(format!("__gpdp_{i}")));
        i
    }

    /// The output an identical expression already has, if any.
    fn find(&self, e: &Expr) -> Option<usize> {
        self.exprs
            .iter()
            .position(|x| matches!(x, Expr::Alias(a) if a.expr.as_ref() == e))
            .map(|k| self.offset + k)
    }
}

/// `aggregate FILTER (WHERE filter)`, keeping everything else about the
/// aggregate. (DataFusion's `ExprFunctionExt::filter(..).build()` rebuilds
/// the call and resets `DISTINCT`, which turned `count(DISTINCT patient)
/// FILTER (..)` into a count of rows.)
fn filtered(aggregate: Expr, filter: Option<&Expr>) -> Result<Expr> {
    let Some(f) = filter else {
        return Ok(aggregate);
    };
    match aggregate {
        Expr::AggregateFunction(mut call) => {
            call.params.filter = Some(Box::new(f.clone()));
            Ok(Expr::AggregateFunction(call))
        }
        other => Err(datafusion::error::DataFusionError::Internal(format!(
            "a filter on something that is not an aggregate: {other}"
        ))),
    }
}

fn and(a: Option<Expr>, b: Option<Expr>) -> Option<Expr> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.and(b)),
        (a, b) => a.or(b),
    }
}

/// `column IS NOT NULL` when the column can be null.
fn present(column: &Column, schema: &DFSchemaRef) -> Result<Option<Expr>> {
    let field = schema.field_from_column(column)?;
    Ok(field
        .is_nullable()
        .then(|| Expr::Column(column.clone()).is_not_null()))
}

fn as_f64(column: &Column) -> Expr {
    cast(Expr::Column(column.clone()), DataType::Float64)
}

/// A patient's rows of a statistic, per cell and patient: their rows
/// under its FILTER, those with a value when it has a column.
fn rows_of(s: &Statistic, filter: Option<&Expr>) -> Result<Expr> {
    let rows = match s.column.as_ref() {
        None => count(lit(1i64)),
        Some(c) => count(Expr::Column(c.clone())),
    };
    filtered(rows, filter)
}

/// The `i`th column of a plan's output.
fn nth(schema: &DFSchemaRef, i: usize) -> Expr {
    let (q, f) = schema.qualified_field(i);
    Expr::Column(Column::new(q.cloned(), f.name()))
}

fn hidden_patient(schema: &DFSchemaRef) -> Result<Column> {
    let (q, f) = schema.qualified_field_with_unqualified_name(PATIENT)?;
    Ok(Column::new(q.cloned(), f.name()))
}

fn group_exprs(release: &Release) -> Vec<Expr> {
    release
        .keys
        .iter()
        .map(|k| Expr::Column(k.column.clone()))
        .collect()
}

/// The per-cell shape. Threshold rule sets count contributors only up to
/// the threshold + 1; the cell key method (`record_keys`) counts them
/// exactly and sums their record keys, in one aggregate per contributing
/// set ([`super::aggregates::contributors::contributors`]), unpacked after it.
fn per_cell(
    release: &Release,
    input: LogicalPlan,
    rules: &Disclosure,
    record_keys: Option<&RecordKeys>,
) -> Result<Compiled> {
    let schema = input.schema().clone();
    let patient = Expr::Column(hidden_patient(&schema)?);
    let cap = rules.redact_at_or_below + 1;
    let mut out = Outputs::new(release.keys.len());
    let mut parts = Vec::with_capacity(release.statistics.len());
    for s in &release.statistics {
        let f = s.filter.as_ref().map(predicate).transpose()?;
        let column = s.column.as_ref();
        let nonnull = column.map(|c| present(c, &schema)).transpose()?.flatten();
        let contributing = and(f.clone(), nonnull);
        // Under the cell key method, a count of rows or values is keyed by
        // each patient's rows too ([`super::aggregates::record_keys::weighted`]).
        let by_rows = s.kind != StatKind::Patients;
        let contributors = |out: &mut Outputs| -> Result<usize> {
            let counted = match record_keys {
                Some(keys) => contributors(keys, patient.clone(), by_rows),
                None => patients_at_least(patient.clone(), cap),
            };
            let e = filtered(counted, contributing.as_ref())?;
            Ok(out.find(&e).unwrap_or_else(|| out.push(e)))
        };
        let p = match (s.kind, column) {
            (StatKind::Rows, _) => {
                let count = out.push(filtered(count(lit(1i64)), f.as_ref())?);
                Parts {
                    count,
                    contributors: contributors(&mut out)?,
                    ..Parts::default()
                }
            }
            (StatKind::Patients, Some(_)) if record_keys.is_some() => {
                let count = contributors(&mut out)?;
                Parts {
                    count,
                    contributors: count,
                    ..Parts::default()
                }
            }
            (StatKind::Patients, Some(_)) => {
                let count = out.push(filtered(
                    count_distinct(patient.clone()),
                    contributing.as_ref(),
                )?);
                Parts {
                    count,
                    contributors: count,
                    ..Parts::default()
                }
            }
            (StatKind::Values, Some(c)) => {
                let count = out.push(filtered(count(Expr::Column(c.clone())), f.as_ref())?);
                Parts {
                    count,
                    contributors: contributors(&mut out)?,
                    ..Parts::default()
                }
            }
            (kind, Some(c)) => {
                let count = out.push(filtered(count(Expr::Column(c.clone())), f.as_ref())?);
                let total = out.push(filtered(sum(as_f64(c)), f.as_ref())?);
                let squares = matches!(kind, StatKind::Variance | StatKind::StdDev)
                    .then(|| filtered(sum(as_f64(c) * as_f64(c)), f.as_ref()).map(|e| out.push(e)))
                    .transpose()?;
                Parts {
                    count,
                    sum: Some(total),
                    squares,
                    contributors: contributors(&mut out)?,
                    ..Parts::default()
                }
            }
            (_, None) => {
                return Err(datafusion::error::DataFusionError::Internal(
                    "a statistic over a column without its column".into(),
                ));
            }
        };
        parts.push(p);
    }
    let width = release.keys.len() + out.exprs.len();
    let mut builder = LogicalPlanBuilder::from(input).aggregate(group_exprs(release), out.exprs)?;
    if record_keys.is_some() {
        // Each packed column becomes its contributors and its cell key,
        // appended after the aggregate's columns.
        let aggregated = builder.schema().clone();
        let column = |i: usize| nth(&aggregated, i);
        let mut columns: Vec<Expr> = (0..width).map(column).collect();
        let mut unpacked = std::collections::BTreeMap::new();
        for p in &mut parts {
            let packed = p.contributors;
            let (n, key) = *unpacked.entry(packed).or_insert_with(|| {
                let (n, key) = unpack(column(packed));
                columns.push(n.alias(format!("__gpdp_n{packed}")));
                columns.push(key.alias(format!("__gpdp_k{packed}")));
                (columns.len() - 2, columns.len() - 1)
            });
            if p.count == packed {
                p.count = n;
            }
            p.contributors = n;
            p.cell_key = Some(key);
        }
        builder = builder.project(columns)?;
    }
    Ok(Compiled {
        plan: builder.build()?,
        parts,
    })
}

fn per_patient(
    release: &Release,
    input: LogicalPlan,
    rules: &Disclosure,
    record_keys: Option<&RecordKeys>,
) -> Result<Compiled> {
    let record_key = record_keys.map(|k| Arc::new(k.udf()));
    let value_key = value_key_udf();
    let schema = input.schema().clone();
    let patient = Expr::Column(hidden_patient(&schema)?);
    let keys = release.keys.len();
    // Inner: each patient's part of each statistic, per cell.
    let mut inner = Outputs::new(keys + 1);
    let mut inner_parts = Vec::with_capacity(release.statistics.len());
    for s in &release.statistics {
        let f = s.filter.as_ref().map(predicate).transpose()?;
        let n = inner.push(rows_of(s, f.as_ref())?);
        let (mut total, mut squares, mut minimum, mut values) = (None, None, None, None);
        if let (false, Some(c)) = (s.kind.is_count(), s.column.as_ref()) {
            total = Some(inner.push(filtered(sum(as_f64(c)), f.as_ref())?));
            // What keys the patient's contribution: a sum of integers,
            // the same in any order (their total's bits are not).
            if record_key.is_some() {
                let keyed = value_key.call(vec![as_f64(c)]);
                values = Some(inner.push(filtered(sum(keyed), f.as_ref())?));
            }
            minimum = Some(inner.push(filtered(min(as_f64(c)), f.as_ref())?));
            if matches!(s.kind, StatKind::Variance | StatKind::StdDev) {
                squares = Some(inner.push(filtered(sum(as_f64(c) * as_f64(c)), f.as_ref())?));
            }
        }
        inner_parts.push((n, total, squares, minimum, values));
    }
    let mut group = group_exprs(release);
    group.push(patient);
    let inner_plan = LogicalPlanBuilder::from(input)
        .aggregate(group, inner.exprs)?
        .build()?;
    let inner_schema = inner_plan.schema().clone();
    let at = |i: usize| nth(&inner_schema, i);
    // Outer: per cell, over patients.
    let mut out = Outputs::new(keys);
    let mut parts = Vec::with_capacity(release.statistics.len());
    for (s, &(n, total, squares, minimum, values)) in release.statistics.iter().zip(&inner_parts) {
        let contributes = at(n).gt(lit(0i64));
        let patients = out.push(filtered(count(lit(1i64)), Some(&contributes))?);
        // The cell key: the record keys of this statistic's own contributors
        // (one inner row per patient, so each counts once), mixed with how
        // much each contributes unless it counts patients
        // ([`super::aggregates::record_keys::weighted`]).
        let keyed = |out: &mut Outputs, udf: &Arc<ScalarUDF>, args| -> Result<usize> {
            let e = filtered(sum(udf.call(args)), Some(&contributes))?;
            Ok(out.find(&e).unwrap_or_else(|| out.push(e)))
        };
        let cell_key = record_key
            .as_ref()
            .map(|udf| {
                let mut args = vec![at(keys)];
                if s.kind != StatKind::Patients {
                    args.push(at(n));
                    args.extend(values.map(&at));
                }
                keyed(&mut out, udf, args)
            })
            .transpose()?;
        // A sum's or mean's count of values is keyed as a count of those
        // values is (by rows alone): the same draw, not a second one.
        let count_key = match (&record_key, total) {
            (Some(udf), Some(_)) => Some(keyed(&mut out, udf, vec![at(keys), at(n)])?),
            _ => None,
        };
        let p = if s.kind == StatKind::Patients {
            Parts {
                count: patients,
                contributors: patients,
                cell_key,
                ..Parts::default()
            }
        } else {
            let count = out.push(sum(at(n)));
            // A patient's contribution: their number of rows for counts,
            // their sum for sums and means.
            let contribution = total.map_or_else(|| at(n), at);
            let mask = rules
                .checks_contributions()
                .then(|| {
                    filtered(dominance(vec![contribution], rules), Some(&contributes))
                        .map(|e| out.push(e))
                })
                .transpose()?;
            Parts {
                count,
                sum: total.map(|t| out.push(sum(at(t)))),
                squares: squares.map(|q| out.push(sum(at(q)))),
                contributors: patients,
                dominance: mask,
                minimum: minimum.map(|m| out.push(min(at(m)))),
                cell_key,
                // Contributions are not negative when released (a negative
                // value sends the statistic to review), so the largest is
                // the maximum.
                largest: total
                    .filter(|_| cell_key.is_some())
                    .map(|t| out.push(max(at(t)))),
                count_key,
            }
        };
        parts.push(p);
    }
    let group: Vec<Expr> = (0..keys).map(at).collect();
    let plan = LogicalPlanBuilder::from(inner_plan)
        .aggregate(group, out.exprs)?
        .build()?;
    Ok(Compiled { plan, parts })
}

/// The `dp` shape: one aggregate without GROUP BY, [`bounded`], that
/// bounds each patient's contribution and totals every cell of the keys'
/// public domains (rows outside them are left out).
fn bounded_plan(release: &Release, input: LogicalPlan, plan: &DpPlan) -> Result<Compiled> {
    let schema = input.schema().clone();
    let mut args = vec![Expr::Column(hidden_patient(&schema)?)];
    args.extend(group_exprs(release));
    let mut statistics = Vec::with_capacity(release.statistics.len());
    for (s, b) in release.statistics.iter().zip(&plan.bounds) {
        let filter = s.filter.as_ref().map(predicate).transpose()?;
        let has_value = match s.column.as_ref() {
            Some(c) => present(c, &schema)?,
            None => None,
        };
        args.push(and(filter, has_value).unwrap_or_else(|| lit(true)));
        statistics.push(match (s.kind, b, s.column.as_ref()) {
            (StatKind::Patients, _, _) => Adds::Patient,
            (_, Some(b), Some(c)) => {
                args.push(as_f64(c));
                Adds::Sum {
                    lo: b.lo,
                    hi: b.hi,
                    centre: b.centre,
                }
            }
            _ => Adds::Rows,
        });
    }
    let spec = Spec {
        domains: plan.domains.clone(),
        statistics,
        groups: plan.groups,
        bound_groups: plan.bound_groups,
        max_rows: plan.params.max_rows,
    };
    let plan = LogicalPlanBuilder::from(input)
        .aggregate(Vec::<Expr>::new(), vec![bounded(spec, args).alias(TOTALS)])?
        .build()?;
    Ok(Compiled {
        plan,
        parts: Vec::new(),
    })
}

/// The `dp` shape's one output: every cell's totals.
const TOTALS: &str = "__gpdp_totals";

/// A source with the hidden patient column appended.
fn source(s: &Source) -> Result<LogicalPlan> {
    match &s.node {
        SourceNode::View { plan, .. } => {
            let scan = plan.clone();
            let schema = scan.schema().clone();
            let mut exprs: Vec<Expr> = schema.columns().into_iter().map(Expr::Column).collect();
            let (q, f) = schema.qualified_field_with_unqualified_name("patient_key")?;
            exprs.push(Expr::Column(Column::new(q.cloned(), f.name())).alias(PATIENT));
            Ok(LogicalPlan::Projection(Projection::try_new(
                exprs,
                Arc::new(scan),
            )?))
        }
        SourceNode::Alias { alias, input } => Ok(LogicalPlan::SubqueryAlias(
            SubqueryAlias::try_new(Arc::new(source(input)?), alias.clone())?,
        )),
        SourceNode::Select { columns, input } => {
            let input = source(input)?;
            let patient = hidden_patient(input.schema())?;
            let mut exprs = Vec::with_capacity(columns.len() + 1);
            for (i, (c, _)) in columns.iter().enumerate() {
                // The same qualified name as in the researcher's plan, so
                // that the columns above resolve as they did there.
                let (q, f) = s.schema.qualified_field(i);
                exprs.push(Expr::Column(c.clone()).alias_qualified(q.cloned(), f.name()));
            }
            exprs.push(Expr::Column(patient).alias(PATIENT));
            Ok(LogicalPlan::Projection(Projection::try_new(
                exprs,
                Arc::new(input),
            )?))
        }
        // The hidden patient is a function of the patient_id DISTINCT keeps,
        // so it does not change which rows are distinct.
        SourceNode::Distinct(input) => LogicalPlanBuilder::from(source(input)?).distinct()?.build(),
        SourceNode::Filter {
            predicate: p,
            input,
        } => {
            let input = source(input)?;
            Ok(LogicalPlan::Filter(Filter::try_new(
                predicate_in(p, Some(input.schema()))?,
                Arc::new(input),
            )?))
        }
        SourceNode::Join {
            left,
            right,
            kind,
            on,
            rows_own,
        } => {
            let join_type = match kind {
                JoinKind::Inner => JoinType::Inner,
                JoinKind::Left => JoinType::Left,
            };
            let left = source(left)?;
            let right = source(right)?;
            if !rows_own {
                return LogicalPlanBuilder::from(left)
                    .join(
                        without_hidden(right, None)?,
                        join_type,
                        (vec![on.0.clone()], vec![on.1.clone()]),
                        None,
                    )?
                    .build();
            }
            // Both sides are their rows' own patients: join on the integer
            // keys (as for cohorts), then drop the right side's.
            let left_key = hidden_patient(left.schema())?;
            let joined = LogicalPlanBuilder::from(left)
                .join(
                    without_hidden(right, Some(JOINED))?,
                    join_type,
                    (vec![left_key], vec![Column::from_name(JOINED)]),
                    None,
                )?
                .build()?;
            without_hidden(joined, None)
        }
    }
}

/// The right side's patient key while it is being joined.
const JOINED: &str = "__gpdp_joined";

/// Drops the right side's hidden patient before a join (the row's patient
/// is the left side's) or, with `rename`, keeps it under that name to join
/// on; called again after such a join, it drops the renamed key and keeps
/// the left side's.
fn without_hidden(plan: LogicalPlan, rename: Option<&str>) -> Result<LogicalPlan> {
    let schema = plan.schema().clone();
    let joined_on_keys = schema.iter().any(|(_, f)| f.name() == JOINED);
    let mut exprs: Vec<Expr> = schema
        .iter()
        .filter(|(_, f)| f.name() != JOINED && (joined_on_keys || f.name() != PATIENT))
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
        .collect();
    if let Some(name) = rename {
        exprs.push(Expr::Column(hidden_patient(&schema)?).alias(name));
    }
    Ok(LogicalPlan::Projection(Projection::try_new(
        exprs,
        Arc::new(plan),
    )?))
}

/// A predicate of FILTER (WHERE …), which holds no cohort.
fn predicate(p: &Predicate) -> Result<Expr> {
    predicate_in(p, None)
}

/// A predicate over a source whose compiled schema is `over` (for cohorts).
fn predicate_in(p: &Predicate, over: Option<&DFSchemaRef>) -> Result<Expr> {
    let recurse = |x: &Predicate| predicate_in(x, over);
    Ok(match p {
        Predicate::And(a, b) => recurse(a)?.and(recurse(b)?),
        Predicate::Or(a, b) => recurse(a)?.or(recurse(b)?),
        Predicate::Not(a) => Expr::Not(Box::new(recurse(a)?)),
        Predicate::Compare { column, op, value } => {
            binary_expr(Expr::Column(column.clone()), *op, lit(value.clone()))
        }
        Predicate::InList {
            column,
            values,
            negated,
        } => Expr::InList(InList::new(
            Box::new(Expr::Column(column.clone())),
            values.iter().cloned().map(lit).collect(),
            *negated,
        )),
        Predicate::Between {
            column,
            low,
            high,
            negated,
        } => Expr::Between(Between::new(
            Box::new(Expr::Column(column.clone())),
            *negated,
            Box::new(lit(low.clone())),
            Box::new(lit(high.clone())),
        )),
        Predicate::IsNull { column, negated } => {
            let c = Expr::Column(column.clone());
            if *negated {
                c.is_not_null()
            } else {
                c.is_null()
            }
        }
        Predicate::Cohort {
            column,
            negated,
            cohort,
            member,
            rows_own,
        } => {
            let cohort = source(cohort)?;
            let (c, member) = match over {
                Some(outer) if *rows_own => (
                    Expr::Column(hidden_patient(outer)?),
                    Expr::Column(hidden_patient(cohort.schema())?),
                ),
                _ => (Expr::Column(column.clone()), Expr::Column(member.clone())),
            };
            // Its own name, so that the decorrelated join does not meet the
            // outer side's hidden column twice.
            let members = LogicalPlanBuilder::from(cohort)
                .filter(member.clone().is_not_null())?
                .project(vec![member.alias("__gpdp_member")])?
                .build()?;
            if *negated {
                not_in_subquery(c, Arc::new(members))
            } else {
                in_subquery(c, Arc::new(members))
            }
        }
    })
}
