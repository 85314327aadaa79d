//! Linkage quality, measured against the truth (docs/design.md §9): the bias a
//! researcher inherits from linked data.
//!
//! OpenSAFELY links on a keyed hash of the NHS number and cannot evaluate
//! linkage quality; gpdp has the generator's truth (`truth/linkage.csv`:
//! whose each provider record really is), so it can. A provider record
//! *should* link when its person's GP data is in the store; it *does* when
//! the provider recorded their NHS number validly, so its pseudonym is the
//! one GP collection made. The missed ones are the records of patients the
//! store holds that a researcher will never see joined — and they are not
//! missed at random. Deaths are also compared where both sides have them:
//! the GP record's date of death against the ONS registration (both to the
//! month in the store).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use arrow::array::{Array, AsArray};
use serde::Serialize;

use crate::deid::key::CollectionKey;
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser};
use crate::store::Manifest;

#[derive(Debug, Clone, Serialize)]
pub struct Linkage {
    pub sources: Vec<SourceLinkage>,
    pub deaths: Option<DeathAgreement>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceLinkage {
    pub source: String,
    /// Provider records in the extract.
    pub records: u64,
    /// Records whose person's GP data is in the store (they should link).
    pub of_stored_patients: u64,
    /// Of those, records that do link (valid NHS number, same pseudonym).
    pub linked: u64,
    pub linked_share: f64,
    /// By age band, sex, ethnicity and IMD decile.
    pub by: Vec<LinkDimension>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkDimension {
    pub name: String,
    pub groups: Vec<LinkGroup>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkGroup {
    pub value: String,
    pub of_stored_patients: u64,
    pub linked: u64,
    pub linked_share: f64,
}

/// GP-recorded deaths against ONS registrations, for patients in the store.
#[derive(Debug, Clone, Serialize)]
pub struct DeathAgreement {
    /// Stored patients whose GP record has a date of death.
    pub gp_deaths: u64,
    /// Of those, with an ONS registration linked.
    pub registered: u64,
    /// Of those, in the same month.
    pub same_month: u64,
    /// GP deaths with no ONS registration (not yet registered, or not linked).
    pub gp_only: u64,
    /// Stored patients alive in the GP record with an ONS death.
    pub ons_only: u64,
    /// Months between the two dates, for deaths in both: "0", "1", "2+".
    pub month_differences: BTreeMap<String, u64>,
}

/// The linkage section, when the store has linked data and the truth and
/// key are given.
pub fn build(
    store: &Path,
    manifest: &Manifest,
    truth_dir: &Path,
    key: &Path,
) -> anyhow::Result<Option<Linkage>> {
    let path = truth_dir.join("linkage.csv");
    if manifest.linked.is_empty() || !path.is_file() {
        return Ok(None);
    }
    let p = Pseudonymiser::new(&CollectionKey::load(key)?);
    let gp = gp_patients(store, manifest)?;
    use crate::synth::linked::{LINKAGE_GROUPS, read_linkage_truth};
    // Per source: records, and per (dimension, value): (of stored, linked).
    type Counts = BTreeMap<(usize, String), (u64, u64)>;
    let mut per: BTreeMap<String, (u64, Counts)> = BTreeMap::new();
    for r in read_linkage_truth(&path)? {
        if !manifest.linked.contains_key(&r.source) {
            continue;
        }
        let entry = per.entry(r.source).or_default();
        entry.0 += 1;
        if !gp.contains_key(&p.patient(&r.person)) {
            continue;
        }
        let linked = u64::from(r.reason == "linked");
        for (d, value) in r.groups.into_iter().enumerate() {
            let c = entry.1.entry((d, value)).or_default();
            c.0 += 1;
            c.1 += linked;
        }
        let total = entry.1.entry((usize::MAX, String::new())).or_default();
        total.0 += 1;
        total.1 += linked;
    }
    let share = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
    let sources = per
        .into_iter()
        .map(|(source, (records, counts))| {
            let (of, linked) = counts
                .get(&(usize::MAX, String::new()))
                .copied()
                .unwrap_or_default();
            let by = LINKAGE_GROUPS
                .iter()
                .enumerate()
                .map(|(d, name)| LinkDimension {
                    name: (*name).to_owned(),
                    groups: sorted_groups(
                        counts
                            .iter()
                            .filter(|((dd, _), _)| *dd == d)
                            .map(|((_, v), (of, linked))| LinkGroup {
                                value: v.clone(),
                                of_stored_patients: *of,
                                linked: *linked,
                                linked_share: share(*linked, *of),
                            })
                            .collect(),
                    ),
                })
                .collect();
            SourceLinkage {
                source,
                records,
                of_stored_patients: of,
                linked,
                linked_share: share(linked, of),
                by,
            }
        })
        .collect();
    Ok(Some(Linkage {
        sources,
        deaths: deaths(store, manifest, &gp)?,
    }))
}

/// IMD deciles in numeric order, the rest as they sort.
fn sorted_groups(mut groups: Vec<LinkGroup>) -> Vec<LinkGroup> {
    groups.sort_by_key(|g| (g.value.parse::<u32>().unwrap_or(u32::MAX), g.value.clone()));
    groups
}

/// Every stored GP patient readers can reach, with their GP date of death (if any).
fn gp_patients(
    store: &Path,
    manifest: &Manifest,
) -> anyhow::Result<HashMap<Pseudonym, Option<i32>>> {
    let mut out = HashMap::new();
    for batch in manifest.batches.values() {
        if !batch.files.contains_key("patients") {
            continue;
        }
        // Deletion vectors applied: a masked patient is no longer stored.
        for b in crate::store::parquet::open(store, batch, "patients")?.build()? {
            let b = b?;
            let ids = b
                .column_by_name("patient_id")
                .context("patients: no patient_id")?
                .as_fixed_size_binary();
            let died = b
                .column_by_name("date_of_death")
                .map(|c| c.as_primitive::<arrow::datatypes::Date32Type>().clone());
            for i in 0..b.num_rows() {
                let death = died.as_ref().filter(|d| d.is_valid(i)).map(|d| d.value(i));
                let e = out
                    .entry(crate::deid::pseudonym::from_slice(ids.value(i)))
                    .or_insert(None);
                *e = e.or(death);
            }
        }
    }
    Ok(out)
}

fn read(path: &Path) -> anyhow::Result<Vec<arrow::array::RecordBatch>> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?,
    )?
    .build()?;
    Ok(reader.collect::<Result<_, _>>()?)
}

fn deaths(
    store: &Path,
    manifest: &Manifest,
    gp: &HashMap<Pseudonym, Option<i32>>,
) -> anyhow::Result<Option<DeathAgreement>> {
    let Some(entry) = manifest.linked.get("ons_deaths") else {
        return Ok(None);
    };
    let mut ons: HashMap<Pseudonym, i32> = HashMap::new();
    for b in read(&store.join(&entry.file.path))? {
        let ids = b
            .column_by_name("patient_id")
            .context("ons_deaths: no patient_id")?
            .as_fixed_size_binary();
        let Some(dates) = b.column_by_name("date") else {
            return Ok(None);
        };
        let dates = dates.as_primitive::<arrow::datatypes::Date32Type>();
        for i in 0..b.num_rows() {
            ons.insert(
                crate::deid::pseudonym::from_slice(ids.value(i)),
                dates.value(i),
            );
        }
    }
    let months = |d: i32| {
        let (y, m, _) = crate::calendar::civil_from_days(d);
        i64::from(y) * 12 + i64::from(m)
    };
    let mut a = DeathAgreement {
        gp_deaths: 0,
        registered: 0,
        same_month: 0,
        gp_only: 0,
        ons_only: 0,
        month_differences: BTreeMap::new(),
    };
    let stored: HashSet<&Pseudonym> = gp.keys().collect();
    for (patient, died) in gp {
        match (died, ons.get(patient)) {
            (Some(g), Some(o)) => {
                a.gp_deaths += 1;
                a.registered += 1;
                let diff = (months(*g) - months(*o)).abs();
                a.same_month += u64::from(diff == 0);
                let bucket = match diff {
                    0 => "0",
                    1 => "1",
                    _ => "2+",
                };
                *a.month_differences.entry(bucket.into()).or_default() += 1;
            }
            (Some(_), None) => {
                a.gp_deaths += 1;
                a.gp_only += 1;
            }
            (None, Some(_)) => a.ons_only += 1,
            (None, None) => {}
        }
    }
    debug_assert!(ons.keys().filter(|k| stored.contains(k)).count() as u64 >= a.registered);
    Ok(Some(a))
}

/// The section of the page.
pub fn render(l: &Linkage) -> anyhow::Result<String> {
    use crate::page::{Difference, difference_chart, esc, kv_table};
    use std::fmt::Write as _;
    let mut h = String::from(
        "<h2>7. Linked data: linkage quality and its bias</h2><p>Hospital spells (<code>apcs</code>) and death registrations (<code>ons_deaths</code>) are linked on the pseudonym of the NHS number the provider recorded. A record <i>should</i> link when its person's GP data is in the store; it does when that number was recorded validly. The records that do not are not missed at random: whatever a researcher estimates from linked data inherits this.</p>",
    );
    for s in &l.sources {
        let _ = write!(
            h,
            "<h3><code>{}</code></h3>{}",
            esc(&s.source),
            kv_table(&[
                ("provider records", s.records.to_string()),
                (
                    "of patients whose GP data is stored (should link)",
                    s.of_stored_patients.to_string()
                ),
                (
                    "linked",
                    format!("{} ({:.2}%)", s.linked, 100.0 * s.linked_share)
                ),
            ])
        );
        for d in &s.by {
            if d.name == "sex" {
                continue;
            }
            let groups: Vec<Difference> = d
                .groups
                .iter()
                .map(|g| Difference {
                    label: &g.value,
                    points: 100.0 * (g.linked_share - s.linked_share),
                    count: g.of_stored_patients,
                })
                .collect();
            h += &difference_chart(
                &format!(
                    "{}: records that link by {}, difference from the overall {:.2}%",
                    s.source,
                    d.name,
                    100.0 * s.linked_share
                ),
                "percentage points (n = the group's records)",
                &groups,
            );
        }
    }
    if let Some(d) = &l.deaths {
        let _ = write!(
            h,
            "<h3>GP-recorded deaths and ONS registrations</h3>{}",
            kv_table(&[
                (
                    "stored patients with a GP date of death",
                    d.gp_deaths.to_string()
                ),
                (
                    "… with an ONS registration linked",
                    d.registered.to_string()
                ),
                ("… in the same month", d.same_month.to_string()),
                (
                    "… with none (not yet registered, or not linked)",
                    d.gp_only.to_string()
                ),
                (
                    "stored patients alive in the GP record with an ONS death",
                    d.ons_only.to_string()
                ),
                (
                    "months between the two dates (0 / 1 / 2+)",
                    ["0", "1", "2+"]
                        .iter()
                        .map(|k| d
                            .month_differences
                            .get(*k)
                            .copied()
                            .unwrap_or(0)
                            .to_string())
                        .collect::<Vec<_>>()
                        .join(" / ")
                ),
            ])
        );
    }
    Ok(h)
}
