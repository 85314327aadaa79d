//! What an attacker learns about one person, measured against the truth:
//! the padding attack (issue 14's "many paddings") through the TRE
//! boundary, under the cell key method and under differential privacy at
//! several budgets spent per target. Used by `gpdp bench` (a chart in
//! `bench.html`) and `tests/differencing.rs`.
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
use crate::tre::{Request, TreError};

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

/// A researcher asking counts through the boundary, as alice.
pub struct Attacker<'a> {
    pub store: &'a Path,
    pub policy: &'a TrePolicy,
    pub project: &'a str,
}

impl Attacker<'_> {
    /// The released count of patients matching `clause` (0 if redacted),
    /// or the rule that refused it.
    pub fn count(&self, clause: &str) -> anyhow::Result<Result<i64, &'static str>> {
        let request = Request {
            store: self.store.to_owned(),
            user: "alice".into(),
            token: Some("demo-alice-token".into()),
            project: self.project.into(),
            sql: format!("SELECT count(DISTINCT patient_id) FROM patients WHERE {clause}"),
        };
        match crate::tre::query_blocking(self.policy, &request) {
            Ok(r) => {
                let c = r.result.batch.column(0).as_primitive::<Int64Type>();
                Ok(Ok(if c.is_valid(0) { c.value(0) } else { 0 }))
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
    let rule_set = a.policy.projects[a.project].disclosure.name;
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
    let project = &a.policy.projects[a.project];
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
    let policy = super::tre::bench_policy()?;
    let ckm = Attacker {
        store,
        policy: &policy,
        project: "demo-planning-exempt",
    };
    let dp = Attacker {
        store,
        policy: &policy,
        project: "demo-research",
    };
    let mut out = vec![any_answer_moved(&ckm, &world, targets, &PADDINGS)?];
    for repeats in [1, 4, 16, 64] {
        out.push(averaged(&dp, &world, targets, repeats)?);
    }
    Ok(out)
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
