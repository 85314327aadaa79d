//! Safe outputs, after running: the disclosure-control rule sets a
//! project's answers pass through before anyone sees them.
//!
//! The compiled plan hands over every statistic as its parts (counts,
//! sums) beside the patients who contribute to it; a rule set turns those
//! into what is released:
//! - [`sdc`] — threshold rule sets: statistics of too few patients are
//!   redacted, counts rounded, and (where the rule set says) contributions
//!   checked for [`dominance`] by a few patients; it also applies the cell
//!   key method, cell by cell;
//! - [`ckm`] — the cell key method: every statistic perturbed by a key
//!   fixed by who contributes to it, looked up in its perturbation table
//!   ([`ptable`](crate::policy::ptable), part of the published policy);
//! - [`dp`] — differential privacy: the noise plan and the privacy
//!   ledger's charge fixed before anything runs, then noise on every cell
//!   of the group keys' public domains.
//!
//! What every rule set releases is here: a [`Controlled`] result, its
//! columns' kinds and schema, known before running ([`released_schema`]),
//! its rows in the query's order within its LIMIT, and the rule set in
//! words ([`describe`]). The rule sets read the typed query
//! ([`checked`](crate::tre::checked)) and the kernels' totals
//! ([`aggregates`](crate::tre::aggregates)); nothing here imports the
//! request pipeline.

pub mod ckm;
pub mod dominance;
pub mod dp;
pub mod sdc;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::{SortColumn, SortOptions, lexsort_to_indices};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;

use crate::policy::tre::Disclosure;
use crate::tre::checked::{Item, Release, StatKind};

/// What a released column is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// A group key: released as is.
    Key,
    /// A count of rows, values or patients: rounded.
    Count,
    /// A sum, mean, variance or standard deviation.
    Statistic,
}

/// The released result.
#[derive(Debug, Clone)]
pub struct Controlled {
    pub batch: RecordBatch,
    pub kinds: Vec<ColumnKind>,
    /// Redacted statistics in the released rows (visible as nulls).
    pub redacted_cells: usize,
    /// What the operator's audit log records and the researcher never sees.
    pub operator: OperatorOnly,
}

/// Figures about withheld rows and redaction reasons: for the audit log only.
#[derive(Debug, Clone, Default)]
pub struct OperatorOnly {
    pub withheld_rows: usize,
    pub redacted_by_reason: BTreeMap<&'static str, usize>,
    pub groups: usize,
}

/// The schema and column kinds of a release's result, known before running.
/// Every statistic's field says what it is (metadata `gpdp.statistic`:
/// `count`, `patients`, `sum`, `mean`, …, so that a client can tell
/// statistics from group keys). Under differential privacy (`noise`, each
/// statistic's from the noise plan, [`dp::Plan`]) it also carries its noise (`gpdp.sigma`, and for counts and
/// sums `gpdp.ci95_half_width`), and each mean is followed by its 95%
/// interval, `<name>_ci95_low` and `<name>_ci95_high`.
pub fn released_schema(release: &Release, noise: Option<&[Noise]>) -> (SchemaRef, Vec<ColumnKind>) {
    let mut fields = Vec::with_capacity(release.outputs.len());
    let mut kinds = Vec::with_capacity(release.outputs.len());
    for o in &release.outputs {
        match o.item {
            Item::Key(k) => {
                let f = &release.keys[k].field;
                fields.push(Field::new(&o.name, f.data_type().clone(), f.is_nullable()));
                kinds.push(ColumnKind::Key);
            }
            Item::Statistic(s) => {
                let kind = release.statistics[s].kind;
                let (data_type, column_kind) = if kind.is_count() {
                    (DataType::Int64, ColumnKind::Count)
                } else {
                    (DataType::Float64, ColumnKind::Statistic)
                };
                let mut metadata = std::collections::HashMap::from([(
                    "gpdp.statistic".to_owned(),
                    kind.name().to_owned(),
                )]);
                if let Some(noise) = noise.map(|n| n[s]) {
                    let sigma = noise.released_sigma(kind);
                    metadata.insert("gpdp.sigma".to_owned(), sigma.to_string());
                    if kind != StatKind::Mean {
                        metadata
                            .insert("gpdp.ci95_half_width".to_owned(), (Z95 * sigma).to_string());
                    }
                }
                fields.push(Field::new(&o.name, data_type, true).with_metadata(metadata));
                kinds.push(column_kind);
                if noise.is_some() && kind == StatKind::Mean {
                    for end in ["low", "high"] {
                        fields.push(
                            Field::new(format!("{}_ci95_{end}", o.name), DataType::Float64, true)
                                .with_metadata(std::collections::HashMap::from([(
                                    "gpdp.statistic".to_owned(),
                                    format!("ci95_{end}"),
                                )])),
                        );
                        kinds.push(ColumnKind::Statistic);
                    }
                }
            }
        }
    }
    (Arc::new(Schema::new(fields)), kinds)
}

/// The two-sided 95% quantile of the normal distribution; the discrete
/// Gaussian's intervals are at least as tight for σ ≥ 1.
pub const Z95: f64 = 1.959_963_984_540_054;

/// One statistic's noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Noise {
    /// σ of the count part (the released value of a count).
    pub count_sigma: f64,
    /// σ of the sum part (sums and means).
    pub sum_sigma: Option<f64>,
    /// ρ this statistic costs.
    pub rho: f64,
}

impl Noise {
    /// σ of the value a statistic releases: a sum's sum part, a count's
    /// count (for a mean, the σ of its sum part; its interval is per row).
    pub fn released_sigma(&self, kind: StatKind) -> f64 {
        match kind {
            StatKind::Sum | StatKind::Mean => self.sum_sigma.unwrap_or(self.count_sigma),
            _ => self.count_sigma,
        }
    }
}

/// Released rows in order (see [`order`]) and within the query's LIMIT,
/// with the number of redacted statistics among them.
pub(crate) fn ordered_and_limited(
    batch: &RecordBatch,
    release: &Release,
    column_of: &[usize],
    kinds: &[ColumnKind],
) -> Result<(RecordBatch, usize), ArrowError> {
    let batch = order(batch, release, column_of)?;
    let limit = release.limit.unwrap_or(usize::MAX);
    let batch = batch.slice(0, batch.num_rows().min(limit));
    let redacted = batch
        .columns()
        .iter()
        .zip(kinds)
        .filter(|(_, k)| **k != ColumnKind::Key)
        .map(|(c, _)| c.null_count())
        .sum();
    Ok((batch, redacted))
}

/// Sorts released rows by the query's ORDER BY, then by the group keys (so
/// the order never depends on how the engine happened to emit groups).
/// `column_of[i]` is the batch column of the release's output `i` (they
/// differ where columns follow an output, as a mean's interval does).
fn order(
    batch: &RecordBatch,
    release: &Release,
    column_of: &[usize],
) -> Result<RecordBatch, ArrowError> {
    if batch.num_rows() < 2 {
        return Ok(batch.clone());
    }
    let mut columns: Vec<SortColumn> = release
        .order
        .iter()
        .map(|o| SortColumn {
            values: batch.column(column_of[o.output]).clone(),
            options: Some(SortOptions {
                descending: o.descending,
                nulls_first: o.nulls_first,
            }),
        })
        .collect();
    for (i, o) in release.outputs.iter().enumerate() {
        if matches!(o.item, Item::Key(_)) && !release.order.iter().any(|x| x.output == i) {
            columns.push(SortColumn {
                values: batch.column(column_of[i]).clone(),
                options: Some(SortOptions {
                    descending: false,
                    nulls_first: false,
                }),
            });
        }
    }
    if columns.is_empty() {
        return Ok(batch.clone());
    }
    let indices = lexsort_to_indices(&columns, None)?;
    arrow::compute::take_record_batch(batch, &indices)
}

/// The rule set in words, as the researcher sees it under every result.
pub fn describe(rules: &Disclosure) -> String {
    if let Some(p) = rules.dp {
        return format!(
            "disclosure control {}: differential privacy (zCDP, the patient as the unit): every cell of the group keys' public domains (as far as the WHERE allows), zeros included, with discrete Gaussian noise; each patient counts in at most {} cells and with at most {} rows per cell, values clamped to public bounds; then statistics whose noisy count is {} or less are [REDACTED]",
            rules.name, p.max_groups, p.max_rows, rules.redact_at_or_below
        );
    }
    if let Some(p) = rules.ckm {
        return format!(
            "disclosure control {}: counts carry cell-key noise (at most ±{}, the same for the same records every time; none released in 1..{}), sums ±{}–{}% of the cell's largest contribution and means are the noisy sum over the noisy count; then statistics of {} or fewer patients are [REDACTED]; rows with nothing releasable are left out",
            rules.name,
            p.max_perturbation,
            p.small_values,
            p.magnitude * 50.0,
            p.magnitude * 150.0,
            rules.redact_at_or_below
        );
    }
    let mut s = format!(
        "disclosure control {}: statistics of {} or fewer patients are [REDACTED]",
        rules.name, rules.redact_at_or_below
    );
    if let Some(d) = rules.dominance {
        s.push_str(&format!(
            ", as are those where {} patients make up more than {}% of the total",
            d.n,
            d.k * 100.0
        ));
    }
    if let Some(p) = rules.p_percent {
        s.push_str(&format!(
            ", fail the p% rule ({}%) or hold negative values",
            p * 100.0
        ));
    }
    s.push_str(&format!(
        "; rows with nothing releasable are left out; counts rounded to the nearest {}",
        rules.round_to
    ));
    s
}
