//! `gpdp optout status`: a patient's own answer, at the practice.
//!
//! The question a patient asks their GP — "is my data in there, does my
//! opt-out work, who can see it?" — answered where the collection key is
//! (the practice side) and nowhere else: the NHS number is pseudonymised
//! with the key, then looked up in every table file the manifest has in
//! force (through the store's reader, deletion vectors applied: rows a
//! later opt-out masked are counted apart, as awaiting the purge), in the tombstones and in the National Data Opt-out set, and
//! through each project's own views (the TRE's session code, so the answer
//! is what a researcher on that project could reach). Nothing is written:
//! not the number, not the pseudonym, not the answer.

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::{Array, AsArray, FixedSizeBinaryArray};
use datafusion::prelude::{col, lit};
use datafusion::scalar::ScalarValue;
use serde::Serialize;

use crate::deid::key::CollectionKey;
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser};
use crate::error::BadInput;
use crate::nhs_number::NhsNumber;
use crate::policy::tre::TrePolicy;

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Whether any table in force holds a row of this patient that a
    /// reader can reach.
    pub in_store: bool,
    /// Rows a reader can reach, per table (GP tables, and provider tables linked in).
    pub rows: BTreeMap<String, u64>,
    /// Rows still in the stored bytes that a deletion vector makes
    /// unreachable (a later opt-out), per GP table: erased by the next
    /// `gpdp optout purge`. Empty when there are none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rows_awaiting_purge: BTreeMap<String, u64>,
    /// A tombstone in force: why and when (`None`: none).
    pub type1: Option<Type1Status>,
    /// On the National Data Opt-out set held for the store (`None`: no set ingested).
    pub national_data_opt_out: Option<bool>,
    pub projects: Vec<ProjectStatus>,
    pub store_generation: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Type1Status {
    /// `type1_at_collection` (dissent recorded at the practice when it was
    /// collected) or `type1_request` (a later opt-out, deleted with proof).
    pub kind: String,
    pub recorded_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProjectStatus {
    pub project: String,
    pub purpose: String,
    pub ndoo_applies: bool,
    /// Whether the project's views can include this patient.
    pub can_include: bool,
    /// Why, in words.
    pub because: String,
}

/// Looks one patient up (practice side: needs the collection key).
pub fn status(
    nhs_number: &str,
    store: &Path,
    key: &Path,
    policy: &TrePolicy,
) -> anyhow::Result<Status> {
    let number =
        NhsNumber::parse(nhs_number.trim().replace([' ', '-'], "").as_bytes()).map_err(|_| {
            BadInput("that is not a valid NHS number (10 digits with a valid check digit)".into())
        })?;
    let manifest = crate::store::read_manifest(store)?;
    let p = Pseudonymiser::new(&CollectionKey::load(key)?);
    manifest.check_key(&p.key_id())?;
    let patient = p.patient(&number);

    let mut rows = BTreeMap::new();
    let mut rows_awaiting_purge = BTreeMap::new();
    for batch in manifest.batches.values() {
        for (table, file) in &batch.files {
            // Fails closed: a vector that does not verify refuses the file.
            let dv = crate::store::parquet::vector(store, batch, table)?;
            let path = store.join(&file.path);
            let all = matching_rows(&path, &patient, None)?;
            let reachable = match &dv {
                Some(dv) => matching_rows(&path, &patient, Some(dv))?,
                None => all,
            };
            *rows.entry(table.clone()).or_insert(0) += reachable;
            if all > reachable {
                *rows_awaiting_purge.entry(table.clone()).or_insert(0) += all - reachable;
            }
        }
    }
    for (table, l) in &manifest.linked {
        *rows.entry(table.clone()).or_insert(0) +=
            matching_rows(&store.join(&l.file.path), &patient, None)?;
    }
    let type1 = match &manifest.tombstones {
        Some(t) => crate::store::read_tombstones(&store.join(&t.path))?
            .into_iter()
            .find(|t| t.patient_id == patient)
            .map(|t| Type1Status {
                kind: if t.source == crate::optout::apply::REQUEST_SOURCE {
                    "type1_request".into()
                } else {
                    "type1_at_collection".into()
                },
                recorded_at: t.recorded_at,
            }),
        None => None,
    };
    let national_data_opt_out = match &manifest.ndoo {
        Some(n) => Some(matching_rows(&store.join(&n.path), &patient, None)? > 0),
        None => None,
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut projects = Vec::new();
    for project in policy.projects.values() {
        let (can_include, because) =
            match rt.block_on(crate::tre::session::open(store, &manifest, policy, project)) {
                Ok(session) => {
                    let mut seen = Vec::new();
                    for table in &project.tables {
                        let n = rt.block_on(async {
                            session
                                .ctx
                                .table(table.as_str())
                                .await?
                                .filter(col("patient_id").eq(lit(ScalarValue::FixedSizeBinary(
                                    32,
                                    Some(patient.to_vec()),
                                ))))?
                                .count()
                                .await
                        })?;
                        if n > 0 {
                            seen.push(format!("{table} ({})", plural_rows(n as u64)));
                        }
                    }
                    if !seen.is_empty() {
                        (true, format!("its views include: {}", seen.join(", ")))
                    } else if project.ndoo_applies && national_data_opt_out == Some(true) {
                        (
                            false,
                            "the National Data Opt-out applies to this project".into(),
                        )
                    } else if type1.is_some() {
                        (false, "Type 1 opt-out: no GP records held".into())
                    } else {
                        (false, "no records of this patient in the store".into())
                    }
                }
                Err(crate::tre::TreError::Refused(r)) => {
                    (false, format!("the project sees no one yet ({})", r.rule))
                }
                Err(crate::tre::TreError::NoData) => (false, "the store holds no data".into()),
                Err(e) => return Err(anyhow::anyhow!("opening {}'s views: {e}", project.id)),
            };
        projects.push(ProjectStatus {
            project: project.id.clone(),
            purpose: project.purpose.clone(),
            ndoo_applies: project.ndoo_applies,
            can_include,
            because,
        });
    }
    Ok(Status {
        in_store: rows.values().any(|n| *n > 0),
        rows,
        rows_awaiting_purge,
        type1,
        national_data_opt_out,
        projects,
        store_generation: manifest.generation,
    })
}

/// Rows of a store file whose `patient_id` is `patient`, those `dv` masks left out.
fn matching_rows(
    path: &Path,
    patient: &Pseudonym,
    dv: Option<&crate::store::vectors::DeletionVector>,
) -> anyhow::Result<u64> {
    use parquet::arrow::ProjectionMask;
    let builder = crate::store::parquet::reader(path, dv)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let column = builder
        .schema()
        .index_of("patient_id")
        .map_err(|_| anyhow::anyhow!("{}: no patient_id column", path.display()))?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [column]);
    let mut n = 0;
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let ids: &FixedSizeBinaryArray = batch.column(0).as_fixed_size_binary();
        n += (0..ids.len())
            .filter(|&i| ids.is_valid(i) && ids.value(i) == patient.as_slice())
            .count() as u64;
    }
    Ok(n)
}

/// "1 row", "3 rows".
fn plural_rows(n: u64) -> String {
    format!("{n} row{}", if n == 1 { "" } else { "s" })
}

impl Status {
    /// The answer in words, for the practice to read to the patient.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if self.in_store {
            let parts: Vec<String> = self
                .rows
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(t, n)| format!("{n} in {t}"))
                .collect();
            out += &format!(
                "In the store: yes — {} ({}), store generation {}\n",
                plural_rows(self.rows.values().sum::<u64>()),
                parts.join(", "),
                self.store_generation
            );
        } else {
            out += &format!(
                "In the store: no — no row in any table (store generation {})\n",
                self.store_generation
            );
        }
        let awaiting: u64 = self.rows_awaiting_purge.values().sum();
        if awaiting > 0 {
            out += &format!(
                "Awaiting the purge: {} still in the stored files, unreachable (no reader returns them) until `gpdp optout purge` erases them\n",
                plural_rows(awaiting)
            );
        }
        out += &match &self.type1 {
            Some(t) if t.kind == "type1_request" && awaiting > 0 => format!(
                "Type 1 opt-out: applied — records made unreachable after the opt-out recorded {}, erased at the next purge\n",
                t.recorded_at
            ),
            Some(t) if t.kind == "type1_request" => format!(
                "Type 1 opt-out: applied — records deleted after the opt-out recorded {}\n",
                t.recorded_at
            ),
            Some(t) => format!(
                "Type 1 opt-out: applied — records never collected (dissent found at collection, {})\n",
                t.recorded_at
            ),
            None => "Type 1 opt-out: none recorded in the store\n".into(),
        };
        out += match self.national_data_opt_out {
            Some(true) => {
                "National Data Opt-out: on the list — projects it applies to never see this patient\n"
            }
            Some(false) => "National Data Opt-out: not on the list\n",
            None => {
                "National Data Opt-out: no list has been ingested; projects it applies to see no one\n"
            }
        };
        out += "Projects whose views can include this patient:\n";
        for p in &self.projects {
            out += &format!(
                "  {:<24} {:<4} {} ({}; NDOO {})\n",
                p.project,
                if p.can_include { "yes" } else { "no" },
                p.because,
                p.purpose,
                if p.ndoo_applies { "applies" } else { "exempt" }
            );
        }
        out
    }
}
