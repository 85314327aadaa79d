//! A query the grammar has checked, as typed values: the [`Release`] that
//! [`grammar`](crate::tre::grammar) reads a planned query as, and that
//! everything after it works from — [`compile`](crate::tre::compile)
//! builds the plan that runs from it, and disclosure control
//! ([`control`](crate::tre::control)) reads its outputs, keys and
//! statistics to decide what is released. Only the grammar builds these;
//! every column in them is traced to the view column it is
//! ([`Lineage`]).

use datafusion::arrow::datatypes::Field;
use datafusion::common::{Column, DFSchemaRef, ScalarValue, TableReference};
use datafusion::logical_expr::{LogicalPlan, Operator};

use crate::tre::error::Refusal;

/// Where a column of a source comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    pub view: String,
    pub column: String,
}

/// A source of rows, each row belonging to exactly one patient.
#[derive(Debug, Clone)]
pub struct Source {
    pub node: SourceNode,
    /// The schema this node has in the researcher's plan (names and
    /// qualifiers, which the compiled plan keeps).
    pub schema: DFSchemaRef,
    /// For each field of `schema`: the view column it is.
    pub lineage: Vec<Lineage>,
    /// The field that is the patient_id of the row's own patient (the left
    /// side's, through joins), if the source still has it.
    pub root: Option<usize>,
    /// Whether the source has (at most a few) rows per patient: the
    /// `patients` view (one row per registration) or a DISTINCT of patient
    /// ids. Joins need one such side, so that no query multiplies one
    /// patient's rows by their own rows (a fan-out whose cost — time,
    /// memory, failure — would depend on one person's record).
    pub per_patient: bool,
    /// How many views this source joins (the grammar allows at most
    /// [`MAX_JOINED`](crate::tre::grammar::MAX_JOINED)).
    pub joined: usize,
}

#[derive(Debug, Clone)]
pub enum SourceNode {
    /// A project view, as the planner inlined it (`SubqueryAlias` of the
    /// view's own plan, which holds the opt-out filters).
    View { name: String, plan: LogicalPlan },
    Alias {
        alias: TableReference,
        input: Box<Source>,
    },
    /// `SELECT col [AS name], …` in a derived table or CTE.
    Select {
        columns: Vec<(Column, String)>,
        input: Box<Source>,
    },
    /// `SELECT DISTINCT …` over columns that include the row's patient.
    Distinct(Box<Source>),
    Filter {
        predicate: Predicate,
        input: Box<Source>,
    },
    Join {
        left: Box<Source>,
        right: Box<Source>,
        kind: JoinKind,
        on: (Column, Column),
        /// Both sides of `on` are their side's own row patient.
        rows_own: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    Inner,
    Left,
}

#[derive(Debug, Clone)]
pub enum Predicate {
    And(Box<Predicate>, Box<Predicate>),
    Or(Box<Predicate>, Box<Predicate>),
    Not(Box<Predicate>),
    Compare {
        column: Column,
        op: Operator,
        value: ScalarValue,
    },
    InList {
        column: Column,
        values: Vec<ScalarValue>,
        negated: bool,
    },
    Between {
        column: Column,
        low: ScalarValue,
        high: ScalarValue,
        negated: bool,
    },
    IsNull {
        column: Column,
        negated: bool,
    },
    /// `column [NOT] IN (SELECT member FROM cohort)`: `column` and `member`
    /// are both patient ids. `rows_own` when each is its source's own row
    /// patient (the usual case), so the compiled plan can match the integer
    /// patient keys it carries instead of 32-byte pseudonyms.
    Cohort {
        column: Column,
        negated: bool,
        cohort: Box<Source>,
        member: Column,
        rows_own: bool,
    },
}

/// What a statistic computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    /// `count(*)`: rows.
    Rows,
    /// `count(DISTINCT patient_id)`: patients.
    Patients,
    /// `count(col)`: rows where `col` is not null.
    Values,
    Sum,
    Mean,
    Variance,
    StdDev,
}

impl StatKind {
    /// The statistic in words (`gpdp.statistic` metadata on released fields).
    pub fn name(self) -> &'static str {
        match self {
            StatKind::Rows => "rows",
            StatKind::Patients => "patients",
            StatKind::Values => "values",
            StatKind::Sum => "sum",
            StatKind::Mean => "mean",
            StatKind::Variance => "variance",
            StatKind::StdDev => "stddev",
        }
    }

    /// Counts are integers and are rounded (or perturbed) as counts.
    pub fn is_count(self) -> bool {
        matches!(self, StatKind::Rows | StatKind::Patients | StatKind::Values)
    }
}

#[derive(Debug, Clone)]
pub struct Statistic {
    pub kind: StatKind,
    /// The column counted or summed (none for `count(*)`).
    pub column: Option<Column>,
    /// `FILTER (WHERE …)`.
    pub filter: Option<Predicate>,
}

#[derive(Debug, Clone)]
pub struct GroupKey {
    pub column: Column,
    pub lineage: Lineage,
    pub field: Field,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    Key(usize),
    Statistic(usize),
}

/// One column of the released result, in SELECT order.
#[derive(Debug, Clone)]
pub struct Output {
    pub name: String,
    pub item: Item,
}

/// `ORDER BY` one output, applied to the released (controlled) values.
#[derive(Debug, Clone, Copy)]
pub struct Order {
    pub output: usize,
    pub descending: bool,
    pub nulls_first: bool,
}

/// A query in the grammar.
#[derive(Debug, Clone)]
pub struct Release {
    pub source: Source,
    pub keys: Vec<GroupKey>,
    pub statistics: Vec<Statistic>,
    pub outputs: Vec<Output>,
    pub order: Vec<Order>,
    pub limit: Option<usize>,
}

/// Where column `c` is in `schema`, or the refusal of a column that
/// cannot be traced to a view column.
pub fn index_of(schema: &DFSchemaRef, c: &Column) -> Result<usize, Refusal> {
    schema.index_of_column(c).map_err(|_| {
        Refusal::outside_grammar(
            "unresolved_column",
            format!("{c} cannot be traced to a view column"),
        )
    })
}

/// The view column a column of a release's source is.
pub fn lineage_of(source: &Source, c: &Column) -> Result<Lineage, Refusal> {
    lineage(source, c).map(|(_, l)| l.clone())
}

/// The view column a column reference is, in `source`.
pub fn lineage<'s>(source: &'s Source, c: &Column) -> Result<(usize, &'s Lineage), Refusal> {
    let i = index_of(&source.schema, c)?;
    Ok((i, &source.lineage[i]))
}
