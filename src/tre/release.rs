//! The release step: the compiled plan runs under the TRE's memory and
//! time limits, and what it computes passes the project's disclosure
//! control before anything leaves it.
//!
//! Threshold rule sets and the cell key method control the plan's output
//! batch by batch as it streams ([`sdc::Control`]), and refuse a result
//! with more rows than the TRE releases; differential privacy needs every
//! cell's totals before it can release the domains' product
//! ([`dp::control`]). A failure while running — out of memory, out of
//! time, anything else — is one fixed message to the researcher
//! ([`TreError::Failed`]), its detail kept for the audit log.

use std::time::Duration;

use arrow::array::{Array, RecordBatch};
use datafusion::dataframe::DataFrame;
use datafusion::execution::SessionState;
use futures::StreamExt;

use crate::policy::tre::{Disclosure, TrePolicy};
use crate::tre::checked::Release;
use crate::tre::compile::Compiled;
use crate::tre::control::{ColumnKind, Controlled, dp, sdc};
use crate::tre::error::{Refusal, TreError};

/// A released result: the controlled batch and how it was controlled.
#[derive(Debug, Clone)]
pub struct Released {
    pub result: Controlled,
    pub disclosure: Disclosure,
    /// Under `dp`: each statistic's noise and the researcher's budget.
    pub privacy: Option<dp::Report>,
    pub checksum: String,
    pub fingerprint: String,
    pub seconds: f64,
}

impl Released {
    pub fn kinds(&self) -> &[ColumnKind] {
        &self.result.kinds
    }
}

/// Statistics released in a result: the non-null cells of its statistic
/// columns (a 95% interval's ends go with their mean, not counted apart).
pub(super) fn released_cells(batch: &RecordBatch) -> u64 {
    batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(f, _)| {
            f.metadata()
                .get("gpdp.statistic")
                .is_some_and(|s| !s.starts_with("ci95"))
        })
        .map(|(_, c)| (c.len() - c.null_count()) as u64)
        .sum()
}

/// Runs `compiled` and applies `disclosure` to its output: the released
/// result and, under `dp`, the noise it carries. Under `dp` the noise plan
/// and the budget's charge (`ledger`) were fixed before this runs.
pub(super) async fn run(
    policy: &TrePolicy,
    state: SessionState,
    compiled: &Compiled,
    release: &Release,
    disclosure: &Disclosure,
    dp: Option<&dp::Plan>,
    ledger: Option<dp::Ledger>,
) -> Result<(Controlled, Option<dp::Report>), TreError> {
    // Threshold rule sets control batch by batch; `dp` needs every cell
    // before it can release the domains' product.
    let mut control = dp
        .is_none()
        .then(|| sdc::Control::new(release, &compiled.parts, disclosure));
    let mut raw = Vec::new();
    let run = async {
        let mut stream = DataFrame::new(state, compiled.plan.clone())
            .execute_stream()
            .await?;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            match control.as_mut() {
                Some(c) => c.push(&batch)?,
                None => raw.push(batch),
            }
        }
        Ok::<_, datafusion::error::DataFusionError>(())
    };
    match tokio::time::timeout(Duration::from_secs(policy.timeout_seconds), run).await {
        Err(_) => {
            return Err(TreError::Failed(format!(
                "time limit: ran longer than {} s",
                policy.timeout_seconds
            )));
        }
        Ok(Err(e)) => return Err(TreError::Failed(e.to_string())),
        Ok(Ok(())) => {}
    }
    match (control, dp, ledger) {
        (Some(control), _, _) => {
            let result = control
                .finish(policy.max_rows)
                .map_err(TreError::internal)?
                .map_err(|_| {
                    Refusal::new(
                        "too_many_rows",
                        format!(
                            "more than {} rows would be released; narrow the query or add ORDER BY … LIMIT",
                            policy.max_rows
                        ),
                    )
                })?;
            Ok((result, None))
        }
        (None, Some(plan), Some(ledger)) => {
            let (result, report) =
                dp::control(release, disclosure, plan, &raw, ledger).map_err(TreError::internal)?;
            Ok((result, Some(report)))
        }
        _ => Err(TreError::internal(
            "differential privacy without its plan or charge",
        )),
    }
}
