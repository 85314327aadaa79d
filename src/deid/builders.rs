//! Checked rows into Arrow record batches of a [`Plan`]'s schema: one
//! builder per stored column, sized for [`BATCH_ROWS`] rows, emptied into
//! a batch whenever the caller writes one.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Builder, FixedSizeBinaryBuilder, Float64Builder, Int64Builder, RecordBatch,
    StringBuilder, UInt8Builder,
};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;

use super::plan::{Fill, Plan};
use super::pseudonym::{Pseudonym, patient_key};
use super::row::Value;

/// Rows per Arrow record batch.
pub const BATCH_ROWS: usize = 64 * 1024;

/// The builders of one stored table.
pub struct Builders {
    schema: SchemaRef,
    ids: FixedSizeBinaryBuilder,
    keys: Int64Builder,
    /// Only when the plan stores `practice_id`: its builder and the value.
    practice: Option<(FixedSizeBinaryBuilder, Option<Pseudonym>)>,
    cols: Vec<ColBuilder>,
    rows: usize,
}

enum ColBuilder {
    Date(Date32Builder),
    Text(StringBuilder),
    Number(Float64Builder),
    Area(StringBuilder, UInt8Builder),
}

impl Builders {
    /// `practice_id` is stored in every row when the plan has the column
    /// (a plan with it and no value fails at [`Builders::finish`]).
    pub fn new(plan: &Plan, practice_id: Option<Pseudonym>) -> Builders {
        let cols = plan
            .fills
            .iter()
            .map(|f| match f {
                Fill::Date { .. } => ColBuilder::Date(Date32Builder::with_capacity(BATCH_ROWS)),
                Fill::Text { .. } => {
                    ColBuilder::Text(StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 8))
                }
                Fill::Number { .. } => {
                    ColBuilder::Number(Float64Builder::with_capacity(BATCH_ROWS))
                }
                Fill::Area { .. } => ColBuilder::Area(
                    StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 9),
                    UInt8Builder::with_capacity(BATCH_ROWS),
                ),
            })
            .collect();
        Builders {
            schema: plan.schema.clone(),
            ids: FixedSizeBinaryBuilder::with_capacity(BATCH_ROWS, 32),
            keys: Int64Builder::with_capacity(BATCH_ROWS),
            practice: plan.practice.then(|| {
                (
                    FixedSizeBinaryBuilder::with_capacity(BATCH_ROWS, 32),
                    practice_id,
                )
            }),
            cols,
            rows: 0,
        }
    }

    /// Appends one row: its pseudonym and the values [`super::row::Checker`]
    /// checked (one per fill, in order). Returns whether the batch is full.
    #[inline]
    pub fn append(&mut self, id: &Pseudonym, values: &[Value]) -> Result<bool, ArrowError> {
        self.ids.append_value(id)?;
        self.keys.append_value(patient_key(id));
        if let Some((b, practice_id)) = &mut self.practice {
            match practice_id {
                Some(p) => b.append_value(p)?,
                None => b.append_null(),
            }
        }
        for (b, v) in self.cols.iter_mut().zip(values) {
            match (b, v) {
                (ColBuilder::Date(b), Value::Date(d)) => b.append_option(*d),
                (ColBuilder::Text(b), Value::Text(s)) => b.append_option(*s),
                (ColBuilder::Number(b), Value::Number(x)) => b.append_option(*x),
                (ColBuilder::Area(l, d), Value::Area(a)) => {
                    l.append_option(a.map(|a| a.0));
                    d.append_option(a.map(|a| a.1));
                }
                _ => unreachable!("values follow the plan"),
            }
        }
        self.rows += 1;
        Ok(self.rows == BATCH_ROWS)
    }

    /// The rows appended since the last batch, as one batch (`None` if none).
    pub fn finish(&mut self) -> Result<Option<RecordBatch>, ArrowError> {
        if self.rows == 0 {
            return Ok(None);
        }
        let mut arrays: Vec<ArrayRef> =
            vec![Arc::new(self.ids.finish()), Arc::new(self.keys.finish())];
        if let Some((b, _)) = &mut self.practice {
            arrays.push(Arc::new(b.finish()));
        }
        for c in &mut self.cols {
            match c {
                ColBuilder::Date(b) => arrays.push(Arc::new(b.finish())),
                ColBuilder::Text(b) => arrays.push(Arc::new(b.finish())),
                ColBuilder::Number(b) => arrays.push(Arc::new(b.finish())),
                ColBuilder::Area(l, d) => {
                    arrays.push(Arc::new(l.finish()));
                    arrays.push(Arc::new(d.finish()));
                }
            }
        }
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), arrays).map(Some)
    }
}
