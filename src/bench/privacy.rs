//! What an attacker learns about one person, measured against the truth:
//! the padding attack (issue 14's "many paddings") through the TRE
//! boundary, under the cell key method and under differential privacy at
//! several budgets spent per target. Used by `gpdp bench` (a chart in
//! `bench.html`) and `tests/it/differencing.rs`.
//!
//! The attack: a target is the only patient of their sex, age band,
//! ethnicity and IMD decile; the attribute is an event in the year whose
//! prevalence is nearest 50%. A *padding* is the patients of the other sex
//! in one age band (so never the target). The attacker asks
//! `count(DISTINCT patient_id) WHERE <padding>` and `… WHERE <padding> OR
//! (<target's quasi-identifiers> AND patient_id IN (<has the attribute>))`:
//! - under `ckm`, over several paddings, and guesses "yes" when any answer
//!   moved (same contributors give the same answer, so "no" never moves);
//! - under `dp`, `repeats` times each (the padding's answers are shared by
//!   every target of the other sex), and guesses "yes" when the average
//!   with the target exceeds the average without by more than half a
//!   patient. Each repeat costs ρ. With ρ spent on the target (and as much
//!   on the padding) this test is right with probability Φ(√(ρ/4)); the
//!   best possible, knowing the padding's count exactly, Φ(√(ρ/2)).
//!
//! The reconstruction (Dinur–Nissim, [`reconstruct`]) reads a whole group
//! at once: many counts over random halves of a group of one sex, age
//! band and IMD decile, each member named by a date on which they alone
//! of the group had an event (what the attacker is assumed to know), then
//! [`decode`] fits every member's attribute to all the answers together.
//! No answer need move for it to work, so it falls through rounding and
//! cell keys alike once the number of counts passes a small multiple of
//! the group's size; only a budget on the counts bounds it.
//!
//! [`averaged_with`] runs the same attack on counts from anywhere else —
//! for tests, which give it exact counts (noise off) or counts with noise
//! they draw themselves, to show the attack wins when it should. The
//! binary only ever runs it through the boundary ([`averaged`]).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use serde::Serialize;

use crate::policy::tre::TrePolicy;
use crate::tre::{Boundary, Request, TreError};

/// A target: their quasi-identifiers (sex, age band, ethnicity, IMD
/// decile) and whether they have the attribute.
#[derive(Debug, Clone)]
pub struct Target {
    pub quasi: [String; 4],
    pub has: bool,
}

/// The attack's world on one store.
#[derive(Debug, Clone)]
pub struct World {
    /// The attribute: an event in this year.
    pub year: String,
    pub targets: Vec<Target>,
}

/// The age bands of the paddings.
pub const PADDINGS: [&str; 6] = ["16-29", "30-39", "40-49", "50-59", "60-69", "70-79"];

/// The targets of a store, from the shipped projects' views run directly:
/// unique among the patients the NDOO-exempt project sees and visible in
/// the NDOO-applies one, so unique in both.
pub fn world(store: &Path) -> anyhow::Result<World> {
    let policy = TrePolicy::load(None)?;
    let rt = tokio::runtime::Runtime::new()?;
    let manifest = crate::store::read_manifest(store)?;
    let open = |project: &str| -> anyhow::Result<datafusion::prelude::SessionContext> {
        Ok(rt
            .block_on(crate::tre::session::open(
                store,
                &manifest,
                &policy,
                &policy.projects[project],
            ))?
            .ctx)
    };
    let (research, exempt) = (open("demo-research")?, open("demo-planning-exempt")?);
    let rows = |ctx: &datafusion::prelude::SessionContext,
                sql: &str|
     -> anyhow::Result<Vec<Vec<String>>> {
        let batches = rt.block_on(async { ctx.sql(sql).await?.collect().await })?;
        let mut out = Vec::new();
        for b in &batches {
            let columns = b
                .columns()
                .iter()
                .map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8))
                .collect::<Result<Vec<_>, _>>()?;
            for r in 0..b.num_rows() {
                out.push(
                    columns
                        .iter()
                        .map(|c| c.as_string::<i32>().value(r).to_owned())
                        .collect(),
                );
            }
        }
        Ok(out)
    };
    let keys = |ctx, sql: &str| -> anyhow::Result<HashSet<String>> {
        Ok(rows(ctx, sql)?.into_iter().map(|r| r[0].clone()).collect())
    };
    let visible = keys(
        &research,
        "SELECT DISTINCT CAST(patient_key AS VARCHAR) FROM patients",
    )?;
    let total: f64 = rows(&exempt, "SELECT count(DISTINCT patient_id) FROM patients")?[0][0]
        .parse()
        .unwrap_or(1.0);
    let year = rows(
        &exempt,
        "SELECT c.event_year, count(DISTINCT c.patient_id) FROM clinical_events c \
         WHERE c.patient_id IN (SELECT patient_id FROM patients) GROUP BY c.event_year",
    )?
    .into_iter()
    .min_by(|a, b| {
        let d = |r: &Vec<String>| (r[1].parse::<f64>().unwrap_or(0.0) / total - 0.5).abs();
        d(a).total_cmp(&d(b))
    })
    .map(|r| r[0].clone())
    .ok_or_else(|| anyhow::anyhow!("the store has no events"))?;
    let has = keys(
        &exempt,
        &format!(
            "SELECT DISTINCT CAST(patient_key AS VARCHAR) FROM clinical_events WHERE event_year = {year}"
        ),
    )?;
    let mut cells: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for r in rows(
        &exempt,
        "SELECT DISTINCT sex, age_band, ethnicity, CAST(imd_decile AS VARCHAR), \
         CAST(patient_key AS VARCHAR) FROM patients WHERE sex IN ('F', 'M')",
    )? {
        cells.entry(r[..4].to_vec()).or_default().push(r[4].clone());
    }
    let targets = cells
        .into_iter()
        .filter(|(_, ids)| ids.len() == 1 && visible.contains(&ids[0]))
        .map(|(q, ids)| Target {
            quasi: [q[0].clone(), q[1].clone(), q[2].clone(), q[3].clone()],
            has: has.contains(&ids[0]),
        })
        .collect();
    Ok(World { year, targets })
}

/// One attack's outcome against the truth.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub rule_set: String,
    pub questions_per_target: usize,
    /// ρ spent on each target (differential privacy only).
    pub rho_per_target: Option<f64>,
    pub targets: usize,
    pub right: usize,
    pub accuracy: f64,
    /// Guessing the majority answer.
    pub chance: f64,
    /// Above this, the attacker is far above chance (chance + 3 standard
    /// errors of a coin-flipping guesser).
    pub bound: f64,
    /// Under `dp`: this attack's expected accuracy at this ρ, Φ(√(ρ/4))
    /// (the padding's average is as noisy as the target's).
    pub theory: Option<f64>,
    /// Whether `budget_exhausted` stopped the attack before its last target.
    pub stopped_by_budget: bool,
    /// Under [`averaged`]: what the attacker saw of each target asked.
    #[serde(skip)]
    pub seen: Vec<Seen>,
}

/// What the attacker of [`averaged`] saw of one target: the padding (whose
/// average the targets of one sex share), whether the target has the
/// attribute (the truth), and the average with the target less the
/// padding's — 1 or 0 plus noise.
#[derive(Debug, Clone)]
pub struct Seen {
    pub padding: String,
    pub has: bool,
    pub difference: f64,
}

impl Measured {
    fn new(rule_set: &str, questions: usize, targets: &[Target], right: usize) -> Measured {
        let n = targets.len().max(1);
        let yes = targets.iter().filter(|t| t.has).count();
        let chance = yes.max(n - yes) as f64 / n as f64;
        Measured {
            rule_set: rule_set.to_owned(),
            questions_per_target: questions,
            rho_per_target: None,
            targets: targets.len(),
            right,
            accuracy: right as f64 / n as f64,
            chance,
            bound: chance + 3.0 * (0.25 / n as f64).sqrt(),
            theory: None,
            stopped_by_budget: false,
            seen: Vec::new(),
        }
    }
}

/// A researcher asking counts through the boundary, as the demo researcher
/// approved for the project.
pub struct Attacker<'a> {
    pub store: &'a Path,
    pub tre: &'a Boundary,
    pub project: &'a str,
}

impl Attacker<'_> {
    /// The released count of patients matching `clause` (0 if redacted),
    /// or the rule that refused it.
    pub fn count(&self, clause: &str) -> anyhow::Result<Result<i64, &'static str>> {
        Ok(self.released(clause)?.map(|v| v.unwrap_or(0)))
    }

    /// The released count of patients matching `clause` (`None` if
    /// redacted), or the rule that refused it.
    pub fn released(&self, clause: &str) -> anyhow::Result<Result<Option<i64>, &'static str>> {
        // The first researcher the policy approves for the project, with
        // the shipped policy's demo token for them.
        let user = self
            .tre
            .policy
            .researchers
            .iter()
            .find(|r| r.projects.iter().any(|p| p == self.project))
            .map_or("alice", |r| r.user.as_str());
        let request = Request {
            store: self.store.to_owned(),
            user: user.into(),
            token: Some(format!("demo-{user}-token")),
            project: self.project.into(),
            sql: format!("SELECT count(DISTINCT patient_id) FROM patients WHERE {clause}"),
        };
        match crate::tre::query_blocking(self.tre, &request) {
            Ok(r) => {
                let c = r.result.batch.column(0).as_primitive::<Int64Type>();
                Ok(Ok((!c.is_empty() && c.is_valid(0)).then(|| c.value(0))))
            }
            Err(TreError::Refused(r)) => Ok(Err(r.rule)),
            Err(e) => Err(e.into()),
        }
    }
}

/// The padding: the other sex in one age band.
pub fn padding(target: &Target, band: &str) -> String {
    let other = if target.quasi[0] == "F" { "M" } else { "F" };
    format!("(sex = '{other}' AND age_band = '{band}')")
}

/// The padding with the target if they have the attribute.
pub fn with_target(target: &Target, band: &str, year: &str) -> String {
    let q = &target.quasi;
    format!(
        "{} OR (sex = '{}' AND age_band = '{}' AND ethnicity = '{}' AND imd_decile = {} \
         AND patient_id IN (SELECT patient_id FROM clinical_events WHERE event_year = {year}))",
        padding(target, band),
        q[0],
        q[1],
        q[2],
        q[3]
    )
}

/// The attack under a deterministic rule set: guess "yes" when any of the
/// paddings' answers moved.
pub fn any_answer_moved(
    a: &Attacker,
    world: &World,
    targets: usize,
    paddings: &[&str],
) -> anyhow::Result<Measured> {
    let targets = &world.targets[..targets.min(world.targets.len())];
    let mut baseline: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut right = 0;
    for t in targets {
        let mut moved = false;
        for band in paddings {
            let key = (padding(t, band), (*band).to_owned());
            let before = match baseline.get(&key) {
                Some(v) => *v,
                None => {
                    let v = a.count(&key.0)?.map_err(anyhow::Error::msg)?;
                    baseline.insert(key, v);
                    v
                }
            };
            moved |= a
                .count(&with_target(t, band, &world.year))?
                .map_err(anyhow::Error::msg)?
                != before;
        }
        right += usize::from(moved == t.has);
    }
    let rule_set = a.tre.policy.projects[a.project].disclosure.name;
    Ok(Measured::new(rule_set, paddings.len(), targets, right))
}

/// The attack under differential privacy: `repeats` questions per target
/// (and per padding, shared by the targets of a sex), averaged; "yes" when
/// the target's average exceeds the padding's by more than half a patient.
/// Stops at `budget_exhausted`, measuring the targets asked so far.
pub fn averaged(
    a: &Attacker,
    world: &World,
    targets: usize,
    repeats: usize,
) -> anyhow::Result<Measured> {
    averaged_with(a, |clause| a.count(clause), world, targets, repeats)
}

/// [`averaged`] with its counts from `count` (a clause's released count,
/// or the rule that refused it) rather than from `a` through the
/// boundary; `a` still names the project whose rule set and ρ the
/// outcome is reported under.
pub fn averaged_with(
    a: &Attacker,
    mut count: impl FnMut(&str) -> anyhow::Result<Result<i64, &'static str>>,
    world: &World,
    targets: usize,
    repeats: usize,
) -> anyhow::Result<Measured> {
    let band = PADDINGS[0];
    let mut mean = |clause: &str| -> anyhow::Result<Result<f64, &'static str>> {
        let mut total = 0.0;
        for _ in 0..repeats.max(1) {
            match count(clause)? {
                Ok(v) => total += v as f64,
                Err(rule) => return Ok(Err(rule)),
            }
        }
        Ok(Ok(total / repeats.max(1) as f64))
    };
    let all = &world.targets[..targets.min(world.targets.len())];
    let mut baseline: BTreeMap<String, f64> = BTreeMap::new();
    let (mut right, mut asked, mut stopped) = (0, 0, false);
    let mut seen = Vec::new();
    for t in all {
        let p = padding(t, band);
        if !baseline.contains_key(&p) {
            match mean(&p)? {
                Ok(v) => baseline.insert(p.clone(), v),
                Err(_) => {
                    stopped = true;
                    break;
                }
            };
        }
        match mean(&with_target(t, band, &world.year))? {
            Ok(v) => {
                let difference = v - baseline[&p];
                right += usize::from((difference > 0.5) == t.has);
                asked += 1;
                seen.push(Seen {
                    padding: p,
                    has: t.has,
                    difference,
                });
            }
            Err(_) => {
                stopped = true;
                break;
            }
        }
    }
    let project = &a.tre.policy.projects[a.project];
    let mut m = Measured::new(project.disclosure.name, repeats, &all[..asked], right);
    m.stopped_by_budget = stopped;
    m.seen = seen;
    if let Some(dp) = project.disclosure.dp {
        let rho = dp.rho_per_statistic * repeats as f64;
        m.rho_per_target = Some(rho);
        m.theory = Some(normal_cdf((rho / 4.0).sqrt()));
    }
    Ok(m)
}

/// Φ, the standard normal distribution function (Abramowitz–Stegun
/// 7.1.26, error below 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// The privacy section of `gpdp bench`: on `store` (collected, with its
/// NDOO list), the attack under the cell key method (six paddings, no
/// budget to stop it) and under differential privacy at 1, 4, 16 and 64
/// questions per target (ρ 0.02 to 1.28 each), with a budget no run here
/// exhausts, over `targets` targets.
pub fn by_budget(store: &Path, targets: usize) -> anyhow::Result<Vec<Measured>> {
    let world = world(store)?;
    let tre = super::tre::bench_boundary()?;
    let ckm = Attacker {
        store,
        tre: &tre,
        project: "demo-planning-exempt",
    };
    let dp = Attacker {
        store,
        tre: &tre,
        project: "demo-research",
    };
    let mut out = vec![any_answer_moved(&ckm, &world, targets, &PADDINGS)?];
    for repeats in [1, 4, 16, 64] {
        out.push(averaged(&dp, &world, targets, repeats)?);
    }
    Ok(out)
}

// Reconstruction (Dinur–Nissim): many counts over random subsets of a
// small group give away every member's attribute.

/// The diabetes codes (SNOMED CT: diabetes mellitus, type 1 and type 2
/// diabetes mellitus): the attribute the reconstruction recovers.
pub const DIABETES: [&str; 3] = ["73211009", "46635009", "44054006"];

/// A group the reconstruction attacks: the patients of one sex, age band
/// and IMD decile, and what the attacker knows of each member — one date
/// on which they, and no one else of the group, had an event recorded.
#[derive(Debug, Clone)]
pub struct Population {
    pub sex: String,
    pub age_band: String,
    pub imd_decile: String,
    /// One date per member, `YYYY-MM-DD`, unique to them within the group.
    pub dates: Vec<String>,
    /// The truth, for measuring only (the attacker never reads it): whether
    /// each member has a diabetes code.
    pub has: Vec<bool>,
}

impl Population {
    /// The group's quasi-identifiers, as a predicate on `patients`.
    pub fn group(&self) -> String {
        format!(
            "sex = '{}' AND age_band = '{}' AND imd_decile = {}",
            self.sex, self.age_band, self.imd_decile
        )
    }

    /// The padding that lifts every count above the thresholds: the other
    /// sex in the same age band (never a member of the group).
    pub fn padding(&self) -> String {
        let other = if self.sex == "F" { "M" } else { "F" };
        format!("(sex = '{other}' AND age_band = '{}')", self.age_band)
    }

    /// The query for the members `subset` (indices into [`Self::dates`]):
    /// the padding, or a member of the subset (named by their date) with a
    /// diabetes code. Its true count is the padding's plus the subset's
    /// members with the attribute.
    pub fn clause(&self, subset: &[usize]) -> String {
        let dates: Vec<String> = subset
            .iter()
            .map(|&i| format!("'{}'", self.dates[i]))
            .collect();
        let codes: Vec<String> = DIABETES.iter().map(|c| format!("'{c}'")).collect();
        format!(
            "{} OR ({} AND patient_id IN (SELECT patient_id FROM clinical_events \
             WHERE snomedct_code IN ({})) AND patient_id IN (SELECT patient_id FROM \
             clinical_events WHERE date IN ({})))",
            self.padding(),
            self.group(),
            codes.join(", "),
            dates.join(", ")
        )
    }

    /// Guessing the majority answer for every member.
    pub fn base_rate(&self) -> f64 {
        let n = self.has.len().max(1);
        let yes = self.has.iter().filter(|h| **h).count();
        yes.max(n - yes) as f64 / n as f64
    }
}

/// Rows of a query run directly on a project's views (for finding the
/// attack's group and its truth; nothing here passes the boundary), every
/// column cast to text.
fn direct_rows(
    rt: &tokio::runtime::Runtime,
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
) -> anyhow::Result<Vec<Vec<String>>> {
    let batches = rt.block_on(async { ctx.sql(sql).await?.collect().await })?;
    let mut out = Vec::new();
    for b in &batches {
        let columns = b
            .columns()
            .iter()
            .map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8))
            .collect::<Result<Vec<_>, _>>()?;
        for r in 0..b.num_rows() {
            out.push(
                columns
                    .iter()
                    .map(|c| c.as_string::<i32>().value(r).to_owned())
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// The reconstruction's group on one store: of the groups (sex, age band,
/// IMD decile) with `sizes` members whom a date names (a date on which no
/// other patient of the group, as the NDOO-exempt project sees it, had an
/// event) and who are visible in the NDOO-applies projects too, the one
/// whose share with a diabetes code is nearest one half (the hardest to
/// guess). Each member's date is their earliest such date.
pub fn population(
    store: &Path,
    sizes: std::ops::RangeInclusive<usize>,
) -> anyhow::Result<Population> {
    let policy = TrePolicy::load(None)?;
    let rt = tokio::runtime::Runtime::new()?;
    let manifest = crate::store::read_manifest(store)?;
    let open = |project: &str| -> anyhow::Result<datafusion::prelude::SessionContext> {
        Ok(rt
            .block_on(crate::tre::session::open(
                store,
                &manifest,
                &policy,
                &policy.projects[project],
            ))?
            .ctx)
    };
    let (applies, exempt) = (open("demo-opensafely")?, open("demo-planning-exempt")?);
    let visible: HashSet<String> = direct_rows(
        &rt,
        &applies,
        "SELECT DISTINCT CAST(patient_key AS VARCHAR) FROM patients",
    )?
    .into_iter()
    .map(|r| r[0].clone())
    .collect();
    let codes: Vec<String> = DIABETES.iter().map(|c| format!("'{c}'")).collect();
    let diabetic: HashSet<String> = direct_rows(
        &rt,
        &exempt,
        &format!(
            "SELECT DISTINCT CAST(patient_key AS VARCHAR) FROM clinical_events \
             WHERE snomedct_code IN ({})",
            codes.join(", ")
        ),
    )?
    .into_iter()
    .map(|r| r[0].clone())
    .collect();
    let mut dates: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in direct_rows(
        &rt,
        &exempt,
        "SELECT DISTINCT CAST(patient_key AS VARCHAR), CAST(date AS VARCHAR) FROM clinical_events \
         WHERE date IS NOT NULL",
    )? {
        dates.entry(r[0].clone()).or_default().push(r[1].clone());
    }
    let mut groups: BTreeMap<[String; 3], HashSet<String>> = BTreeMap::new();
    for r in direct_rows(
        &rt,
        &exempt,
        "SELECT DISTINCT sex, age_band, CAST(imd_decile AS VARCHAR), CAST(patient_key AS VARCHAR) \
         FROM patients WHERE sex IN ('F', 'M') AND age_band IS NOT NULL AND imd_decile IS NOT NULL",
    )? {
        groups
            .entry([r[0].clone(), r[1].clone(), r[2].clone()])
            .or_default()
            .insert(r[3].clone());
    }
    let mut best: Option<(f64, Population)> = None;
    for (key, members) in groups {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for m in &members {
            for d in dates.get(m).into_iter().flatten() {
                *seen.entry(d).or_default() += 1;
            }
        }
        let mut named: Vec<(String, bool)> = members
            .iter()
            .filter(|m| visible.contains(*m))
            .filter_map(|m| {
                let mut own: Vec<&String> = dates
                    .get(m)?
                    .iter()
                    .filter(|d| seen[d.as_str()] == 1)
                    .collect();
                own.sort();
                Some(((*own.first()?).clone(), diabetic.contains(m)))
            })
            .collect();
        if !sizes.contains(&named.len()) {
            continue;
        }
        named.sort();
        let share = named.iter().filter(|(_, h)| *h).count() as f64 / named.len() as f64;
        let distance = (share - 0.5).abs();
        if best.as_ref().is_none_or(|(d, _)| distance < *d) {
            let [sex, age_band, imd_decile] = key;
            best = Some((
                distance,
                Population {
                    sex,
                    age_band,
                    imd_decile,
                    dates: named.iter().map(|(d, _)| d.clone()).collect(),
                    has: named.iter().map(|(_, h)| *h).collect(),
                },
            ));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| anyhow::anyhow!("no group of {sizes:?} members a date names"))
}

/// The reconstruction's outcome against the truth, by number of queries.
#[derive(Debug, Clone, Serialize)]
pub struct Reconstruction {
    pub rule_set: String,
    pub members: usize,
    /// Guessing the majority answer for every member.
    pub base_rate: f64,
    pub points: Vec<CurvePoint>,
    /// Queries whose answer was redacted (asked, and left out of the fit).
    pub redacted: usize,
    /// The rule that refused a query before the last point (say a query
    /// budget), if one did.
    pub stopped_by: Option<String>,
    /// Attacks averaged (each with its own random subsets): a point's
    /// accuracy is their mean, its `right` their total.
    pub runs: usize,
}

/// The reconstruction after `queries` answers.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub queries: usize,
    pub right: usize,
    pub accuracy: f64,
}

impl Reconstruction {
    /// The fewest queries at which the accuracy exceeds `level`, and stays
    /// above it at every later point.
    pub fn passes(&self, level: f64) -> Option<usize> {
        let last_below = self.points.iter().rposition(|p| p.accuracy <= level);
        let first = last_below.map_or(0, |i| i + 1);
        self.points.get(first).map(|p| p.queries)
    }
}

/// The reconstruction attack through the boundary: `checkpoints.last()`
/// counts, each over a random half of the group (seeded by `seed`),
/// decoded after each checkpoint's number of queries by [`decode`].
pub fn reconstruct(
    a: &Attacker,
    population: &Population,
    checkpoints: &[usize],
    seed: u64,
) -> anyhow::Result<Reconstruction> {
    let rule_set = a.tre.policy.projects[a.project].disclosure.name;
    reconstruct_with(
        rule_set,
        |clause| a.released(clause),
        population,
        checkpoints,
        seed,
    )
}

/// [`reconstruct`] with its counts from `count` (a clause's released
/// count, `None` if redacted, or the rule that refused it).
pub fn reconstruct_with(
    rule_set: &str,
    mut count: impl FnMut(&str) -> anyhow::Result<Result<Option<i64>, &'static str>>,
    population: &Population,
    checkpoints: &[usize],
    seed: u64,
) -> anyhow::Result<Reconstruction> {
    use rand_core::{RngCore, SeedableRng};
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let n = population.dates.len();
    let (mut subsets, mut answers) = (Vec::new(), Vec::new());
    let (mut points, mut redacted, mut stopped_by) = (Vec::new(), 0, None);
    let last = checkpoints.iter().copied().max().unwrap_or(0);
    for asked in 1..=last {
        let subset: Vec<usize> = (0..n).filter(|_| rng.next_u64() & 1 == 1).collect();
        match count(&population.clause(&subset))? {
            Ok(Some(v)) => {
                subsets.push(subset);
                answers.push(v as f64);
            }
            Ok(None) => redacted += 1,
            Err(rule) => {
                stopped_by = Some(rule.to_owned());
                break;
            }
        }
        if checkpoints.contains(&asked) {
            let x = decode(&subsets, &answers, n);
            let right = x
                .iter()
                .zip(&population.has)
                .filter(|(x, h)| (**x > 0.5) == **h)
                .count();
            points.push(CurvePoint {
                queries: asked,
                right,
                accuracy: right as f64 / n.max(1) as f64,
            });
        }
    }
    Ok(Reconstruction {
        rule_set: rule_set.to_owned(),
        members: n,
        base_rate: population.base_rate(),
        points,
        redacted,
        stopped_by,
        runs: 1,
    })
}

/// Several runs of one reconstruction (same group, rule set and
/// checkpoints, other random subsets) as one curve of mean accuracies.
pub fn mean_of(runs: Vec<Reconstruction>) -> Option<Reconstruction> {
    let mut runs = runs.into_iter();
    let mut total = runs.next()?;
    let mut n = 1usize;
    for r in runs {
        n += 1;
        total.redacted += r.redacted;
        total.stopped_by = total.stopped_by.or(r.stopped_by);
        // A run stopped early has fewer points: the mean is over the
        // points every run reached.
        total.points.truncate(r.points.len());
        for (t, p) in total.points.iter_mut().zip(&r.points) {
            debug_assert_eq!(t.queries, p.queries);
            t.right += p.right;
            t.accuracy += p.accuracy;
        }
    }
    for p in &mut total.points {
        p.accuracy /= n as f64;
    }
    total.runs = n;
    Some(total)
}

/// The attacker's decoder: fits each member's attribute x_i ∈ [0, 1] and
/// the padding's count c to the answers b_q ≈ c + Σ_{i ∈ S_q} x_i by
/// least squares on the box, with a term λ·Σ x_i (λ = 2) that prefers the
/// minority answer — the attacker's prior that the attribute is rare (or,
/// if a first fit without it says most have it, λ·Σ (1 − x_i)); the
/// caller rounds at ½. Least squares rather than least absolute
/// deviations (the review's fit), and λ = 2, because on answers simulated
/// with noise like each rule set's (bounded, variance 2 to 3) over a
/// group of this size and share they decoded best from 10 to 200
/// queries; an attacker can choose their decoder the same way, without
/// the truth (`tests/it/differencing.rs` keeps the comparison).
///
/// The fit: coordinate descent on the normal equations, in the members'
/// centred columns (x_i multiplies 1[i ∈ S_q] − ½, so the padding's count
/// does not couple with every x_i), with a tiny ridge towards ½ so that
/// it is defined with fewer answers than members.
pub fn decode(subsets: &[Vec<usize>], answers: &[f64], n: usize) -> Vec<f64> {
    decode_with(subsets, answers, n, 2.0)
}

/// [`decode`] with the prior's weight λ (0: plain least squares).
pub fn decode_with(subsets: &[Vec<usize>], answers: &[f64], n: usize, prior: f64) -> Vec<f64> {
    let first = fit(subsets, answers, n, 0.0);
    let share = first.iter().sum::<f64>() / n.max(1) as f64;
    if prior == 0.0 {
        return first;
    }
    fit(
        subsets,
        answers,
        n,
        if share > 0.5 { -prior } else { prior },
    )
}

/// Minimises ½ Σ_q (b_q − c − Σ_i (1[i ∈ S_q] − ½) x_i)² + prior·Σ_i x_i
/// + ridge·Σ_i (x_i − ½)²/2 over x ∈ [0, 1]ⁿ and c.
fn fit(subsets: &[Vec<usize>], answers: &[f64], n: usize, prior: f64) -> Vec<f64> {
    const SWEEPS: usize = 5000;
    const RIDGE: f64 = 1e-3;
    let k = n + 1;
    let mut z = vec![0.5; k];
    if answers.is_empty() {
        return z.split_off(1);
    }
    let m = answers.len() as f64;
    let total: f64 = answers.iter().sum();
    z[0] = total / m;
    // Per member and pair of members, sums over the answers whose subset
    // holds them.
    let mut s1 = vec![0.0; n];
    let mut sb = vec![0.0; n];
    let mut s2 = vec![0.0; n * n];
    for (s, &b) in subsets.iter().zip(answers) {
        for &i in s {
            s1[i] += 1.0;
            sb[i] += b;
            for &j in s {
                s2[i * n + j] += 1.0;
            }
        }
    }
    // The normal equations in the centred columns a_i = 1[i ∈ S] − ½.
    let mut g = vec![0.0; k * k];
    let mut h = vec![0.0; k];
    g[0] = m;
    h[0] = total;
    for i in 0..n {
        let gi = s1[i] - 0.5 * m;
        g[i + 1] = gi;
        g[(i + 1) * k] = gi;
        h[i + 1] = sb[i] - 0.5 * total + RIDGE * 0.5 - prior;
        for j in 0..n {
            g[(i + 1) * k + j + 1] = s2[i * n + j] - 0.5 * (s1[i] + s1[j]) + 0.25 * m;
        }
        g[(i + 1) * k + i + 1] += RIDGE;
    }
    for _ in 0..SWEEPS {
        let mut moved: f64 = 0.0;
        for i in 0..k {
            let row = &g[i * k..(i + 1) * k];
            let dot: f64 = row.iter().zip(&z).map(|(a, b)| a * b).sum::<f64>() - row[i] * z[i];
            let mut v = (h[i] - dot) / row[i];
            if i > 0 {
                v = v.clamp(0.0, 1.0);
            }
            moved = moved.max((v - z[i]).abs());
            z[i] = v;
        }
        if moved < 1e-9 {
            break;
        }
    }
    z.split_off(1)
}

/// The reconstruction under the cell key method and under OpenSAFELY's
/// rules on `store`, at `checkpoints` queries, over a group of `sizes`
/// members, each the mean of `runs` attacks (for `gpdp bench`).
pub fn by_queries(
    store: &Path,
    sizes: std::ops::RangeInclusive<usize>,
    checkpoints: &[usize],
    runs: usize,
) -> anyhow::Result<Vec<Reconstruction>> {
    let population = population(store, sizes)?;
    let tre = super::tre::bench_boundary()?;
    ["demo-planning-exempt", "demo-opensafely"]
        .into_iter()
        .map(|project| {
            let a = Attacker {
                store,
                tre: &tre,
                project,
            };
            let each = (1..=runs.max(1) as u64)
                .map(|seed| reconstruct(&a, &population, checkpoints, seed))
                .collect::<anyhow::Result<Vec<_>>>()?;
            mean_of(each).ok_or_else(|| anyhow::anyhow!("no reconstruction ran"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normal_cdf_is_right_where_it_is_read() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((normal_cdf(-1.959_964) - 0.025).abs() < 1e-6);
    }
}
