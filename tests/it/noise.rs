//! Differential privacy's noise, measured through the release path: the
//! same dp question asked many times through `query_blocking`, every
//! released value compared with the truth (the same statistic computed
//! directly over the project's views, with the contribution bounds applied
//! by SQL written here), and the spread of (released − truth) checked
//! against σ² on BOTH sides — too little noise fails as surely as too much.
//!
//! σ is computed here from the shipped policy file's own numbers
//! (`rho_per_statistic`, `max_rows`, `max_groups`, `value_bounds`, the
//! event years' domain), read as TOML text, and the query's shape: σ =
//! √groups · bound / √(2ρ), groups = 1 when every key is a patient
//! attribute, else `max_groups` (at most the cells there are); a sum or a
//! mean spends ρ/2 on its sum and ρ/2 on its count. The answer's own
//! statement of σ is only checked to agree with it.
//!
//! The check: with `n` draws of z = (released − truth)/σ, the mean of z²
//! must lie in [1/2, 2] — the geometric midpoints between the right
//! variance and a quarter or four times it (σ/2 or 2σ). For Gaussian
//! noise n·mean(z²) is χ²ₙ, whose Chernoff bounds give
//! P(mean z² ≤ a) ≤ (a·e^(1−a))^(n/2) for a < 1 and the same form above 1:
//! at n = 200, a false alarm has probability under 4.3e-9 per check, and
//! σ/2 or 2σ passes with probability under 4.3e-9 as well (the interval is
//! symmetric on a log scale). The discrete Gaussian's variance is σ²
//! within 1e-20 relative for σ ≥ 5, and its tails are no heavier. Only
//! cells whose true count lies 7σ (of the count that decides redaction)
//! above the threshold are used, so redaction never censors a draw.
//!
//! Every test carries its positive control: the same check applied to
//! draws made here, truth + `discrete_gaussian(σ/2)` and `(2σ)`, must
//! reject, and truth + `discrete_gaussian(σ)` must accept — the check has
//! the power it claims on the very cells and σ it is used on.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use crate::common::*;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};
use gpdp::policy::tre::TrePolicy;
use gpdp::tre::control::dp::discrete_gaussian;
use gpdp::tre::{Boundary, Request, query_blocking};

/// Draws per checked statistic (see the module doc for the sizing).
const DRAWS: usize = 200;
/// The acceptance interval of mean(z²).
const LOW: f64 = 0.5;
const HIGH: f64 = 2.0;
/// How far above the threshold (in σ of its count) a cell's truth must lie.
const CLEAR: f64 = 7.0;

/// One extract, collected once, with its NDOO list ingested.
fn fixture() -> &'static Collected {
    static F: OnceLock<Collected> = OnceLock::new();
    F.get_or_init(|| collected_with_ndoo(3, 2000, 21, 9))
}

/// The shipped policy with a budget no test here runs out of.
fn test_policy() -> TrePolicy {
    let mut policy = TrePolicy::load(None).unwrap();
    for r in &mut policy.researchers {
        r.rho_budget = 1e9;
    }
    policy
}

/// The shipped policy's dp numbers, read from the policy file as TOML.
struct Shipped {
    rho: f64,
    max_groups: f64,
    max_rows: f64,
    threshold: f64,
    /// `numeric_value`'s clamping bounds.
    lo: f64,
    hi: f64,
    /// The event years' public domain.
    first_year: i64,
    last_year: i64,
}

fn shipped() -> Shipped {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/tre.toml"))
            .unwrap();
    let t: toml::Table = text.parse().unwrap();
    let dp = &t["disclosure"]["dp"];
    let num = |v: &toml::Value| v.as_float().or(v.as_integer().map(|i| i as f64)).unwrap();
    let bounds = dp["value_bounds"]["numeric_value"].as_array().unwrap();
    let years = &t["domains"]["event_year"];
    Shipped {
        rho: num(&dp["rho_per_statistic"]),
        max_groups: num(&dp["max_groups"]),
        max_rows: num(&dp["max_rows"]),
        threshold: num(&dp["redact_at_or_below"]),
        lo: num(&bounds[0]),
        hi: num(&bounds[1]),
        first_year: years["from"].as_integer().unwrap(),
        last_year: years["to"].as_integer().unwrap(),
    }
}

/// σ = √groups · bound / √(2ρ).
fn sigma(groups: f64, bound: f64, rho: f64) -> f64 {
    groups.sqrt() * bound / (2.0 * rho).sqrt()
}

/// The answer states the σ computed here (to a millionth), and never
/// less: the noise is rounded up, so that the float never promises more
/// than ρ (σ just below Δ/√(2ρ) would spend more than the charge).
fn states(stated: f64, sigma: f64) {
    assert!(
        (stated / sigma - 1.0).abs() < 1e-6,
        "stated σ {stated}, computed {sigma}"
    );
    assert!(
        stated >= sigma,
        "stated σ {stated} is below Δ/√(2ρ) = {sigma}"
    );
}

/// `sql` asked through the boundary under `policy` alone (`dp` needs no
/// perturbation key; the ledger beside the store).
fn ask(policy: &TrePolicy, sql: &str) -> gpdp::tre::Released {
    query_blocking(
        &Boundary::new(policy.clone()),
        &Request {
            store: fixture().store.clone(),
            user: "dana".into(),
            token: Some("demo-dana-token".into()),
            project: "demo-research".into(),
            sql: sql.into(),
        },
    )
    .unwrap()
}

/// `sql` run directly over the research project's views (no boundary).
fn direct(policy: &TrePolicy, sql: &str) -> RecordBatch {
    let store = &fixture().store;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let manifest = gpdp::store::read_manifest(store).unwrap();
    let batches = runtime
        .block_on(async {
            let ctx = gpdp::tre::session::open(
                store,
                &manifest,
                policy,
                &policy.projects["demo-research"],
            )
            .await
            .unwrap()
            .ctx;
            ctx.sql(sql).await?.collect().await
        })
        .unwrap();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// A column as text (keys) or as numbers (statistics; null when redacted).
fn texts(b: &RecordBatch, name: &str) -> Vec<String> {
    let c = arrow::compute::cast(b.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
    let c = c.as_string::<i32>();
    (0..c.len()).map(|i| c.value(i).to_owned()).collect()
}

fn numbers(b: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    let c = arrow::compute::cast(b.column_by_name(name).unwrap(), &DataType::Float64).unwrap();
    c.as_primitive::<Float64Type>().iter().collect()
}

/// The truth by key: per key, the named columns.
fn truth_by_key(b: &RecordBatch, key: &str, columns: &[&str]) -> BTreeMap<String, Vec<f64>> {
    let keys = texts(b, key);
    let cols: Vec<Vec<Option<f64>>> = columns.iter().map(|c| numbers(b, c)).collect();
    keys.into_iter()
        .enumerate()
        .map(|(i, k)| (k, cols.iter().map(|c| c[i].unwrap_or(0.0)).collect()))
        .collect()
}

/// The spread of released values around the truth, in units of the
/// variance they should have.
#[derive(Debug)]
struct Spread {
    what: String,
    draws: usize,
    sum_z2: f64,
}

impl Spread {
    fn new(what: impl Into<String>) -> Spread {
        Spread {
            what: what.into(),
            draws: 0,
            sum_z2: 0.0,
        }
    }

    /// One released value: its squared error over the variance it should have.
    fn add(&mut self, released: f64, truth: f64, variance: f64) {
        self.draws += 1;
        self.sum_z2 += (released - truth).powi(2) / variance;
    }

    /// mean(z²): 1 when the noise is as promised.
    fn ratio(&self) -> f64 {
        self.sum_z2 / self.draws as f64
    }

    /// Whether the spread is the promised one, within [LOW, HIGH].
    fn verdict(&self) -> Result<f64, String> {
        assert!(self.draws >= DRAWS, "{}: {} draws", self.what, self.draws);
        let r = self.ratio();
        if (LOW..=HIGH).contains(&r) {
            Ok(r)
        } else {
            Err(format!(
                "{}: released values spread {r:.3} × the variance σ promises over {} draws \
                 (accepted: {LOW}–{HIGH}; σ/2 gives 0.25, 2σ gives 4)",
                self.what, self.draws
            ))
        }
    }
}

/// The sizing holds: a false alarm, or a miss at σ/2 or 2σ, has
/// probability under 1e-8 per check (Chernoff bounds of χ²ₙ / n).
#[test]
fn the_spread_check_is_sized_for_no_false_alarm_and_no_miss() {
    let n = DRAWS as f64;
    let bound = |a: f64| (a * (1.0 - a).exp()).powf(n / 2.0);
    // Right σ, outside [LOW, HIGH]; σ/2 (variance ×¼) above LOW means
    // χ²/n ≥ 4·LOW; 2σ (variance ×4) below HIGH means χ²/n ≤ HIGH/4.
    for (case, p) in [
        ("false alarm below", bound(LOW)),
        ("false alarm above", bound(HIGH)),
        ("σ/2 accepted", bound(4.0 * LOW)),
        ("2σ accepted", bound(HIGH / 4.0)),
    ] {
        assert!(p < 1e-8, "{case}: {p:e}");
    }
}

/// Positive control: truth + `discrete_gaussian(σ·f)` drawn here for each
/// cell in turn, checked against σ — rejected at f = ½ and 2, accepted at 1.
fn control(what: &str, cells: &[(f64, f64)]) {
    for (f, accept) in [(0.5, false), (1.0, true), (2.0, false)] {
        let mut s = Spread::new(format!("{what}, control at σ×{f}"));
        for i in 0..DRAWS {
            let (truth, sigma) = cells[i % cells.len()];
            let released = truth + discrete_gaussian(sigma * f).unwrap() as f64;
            s.add(released, truth, sigma * sigma);
        }
        assert_eq!(
            s.verdict().is_ok(),
            accept,
            "{what}: the check {} draws with σ×{f} ({:.3})",
            if accept { "rejected" } else { "accepted" },
            s.ratio()
        );
    }
}

/// Asks `sql` until every spread has DRAWS draws; `each` adds one
/// answer's draws. Returns the number of questions asked.
fn draw(
    policy: &TrePolicy,
    sql: &str,
    spreads: &mut [Spread],
    mut each: impl FnMut(&gpdp::tre::Released, &mut [Spread]),
) -> usize {
    let mut asked = 0;
    while spreads.iter().any(|s| s.draws < DRAWS) {
        let r = ask(policy, sql);
        each(&r, spreads);
        asked += 1;
        assert!(asked < 1000, "{sql}: no draws");
    }
    asked
}

/// Patient-level keys (the patients view: each patient in one cell):
/// a count of patients carries σ = 1/√(2ρ) (5 in the shipped policy) and
/// a count of rows σ = max_rows/√(2ρ) (25), checked from the spread of
/// the released counts around the truth — the patients per age band, and
/// their rows with at most max_rows per patient. Positive control: the
/// same check rejects draws made here with σ/2 and 2σ, and accepts σ.
#[test]
fn patient_level_counts_carry_the_noise_their_rho_buys() {
    let p = shipped();
    let policy = test_policy();
    let (sigma_patients, sigma_rows) = (sigma(1.0, 1.0, p.rho), sigma(1.0, p.max_rows, p.rho));
    assert!((sigma_patients - 5.0).abs() < 1e-9 && (sigma_rows - 25.0).abs() < 1e-9);
    // A patient registered twice has two rows here, in the same band: a
    // patient in two bands would be cut to one, which this truth ignores.
    let split = direct(
        &policy,
        "SELECT count(*) AS n FROM (SELECT patient_key FROM patients GROUP BY patient_key \
         HAVING count(DISTINCT age_band) > 1)",
    );
    assert_eq!(numbers(&split, "n")[0], Some(0.0));
    let truth = truth_by_key(
        &direct(
            &policy,
            &format!(
                "SELECT age_band, count(*) AS patients, sum(least(n, {})) AS rows FROM \
                 (SELECT age_band, patient_key, count(*) AS n FROM patients \
                  GROUP BY age_band, patient_key) GROUP BY age_band",
                p.max_rows
            ),
        ),
        "age_band",
        &["patients", "rows"],
    );
    let clear = |t: f64, s: f64| t >= p.threshold + CLEAR * s;
    let mut spreads = [
        Spread::new("count(DISTINCT patient_id) by age band"),
        Spread::new("count(*) by age band"),
    ];
    let sql = "SELECT age_band, count(DISTINCT patient_id) AS patients, count(*) AS rows \
               FROM patients GROUP BY age_band";
    let started = std::time::Instant::now();
    let asked = draw(&policy, sql, &mut spreads, |r, spreads| {
        let stated = r.privacy.as_ref().unwrap();
        states(stated.columns[1].unwrap().sigma, sigma_patients);
        states(stated.columns[2].unwrap().sigma, sigma_rows);
        let b = &r.result.batch;
        for (i, band) in texts(b, "age_band").iter().enumerate() {
            let t = &truth[band];
            for (s, (name, sd)) in [("patients", sigma_patients), ("rows", sigma_rows)]
                .into_iter()
                .enumerate()
            {
                if clear(t[s], sd) {
                    let got = numbers(b, name)[i].expect("a clear cell is released");
                    spreads[s].add(got, t[s], sd * sd);
                }
            }
        }
    });
    eprintln!(
        "{asked} questions in {:.1?}: spreads {:.3}, {:.3}",
        started.elapsed(),
        spreads[0].ratio(),
        spreads[1].ratio()
    );
    let verdicts: Vec<_> = spreads.iter().map(Spread::verdict).collect();
    assert!(verdicts.iter().all(Result::is_ok), "{verdicts:?}");
    for (s, sd) in [(0, sigma_patients), (1, sigma_rows)] {
        let cells: Vec<(f64, f64)> = truth
            .values()
            .filter(|t| clear(t[s], sd))
            .map(|t| (t[s], sd))
            .collect();
        control(&spreads[s].what, &cells);
    }
}

/// An event-level key (event year, from the clinical events view): a
/// patient may count in `max_groups` years, so σ carries √max_groups — a
/// count of patients by event year σ = √8/√(2ρ) ≈ 14.1, a count of events
/// (rows) by year √8·max_rows/√(2ρ) ≈ 70.7 — the σ of the benchmarks'
/// "events by year", `count(*)` — as docs/boundary.md states both (its
/// accuracy table). The draws ask for years from 2019
/// on: the domain ends in 2026, so no patient has more than 8 years there
/// and the truth needs no choice of which cells to keep, while σ is the
/// whole domain's (27 cells, so 8 per patient). Positive control: the
/// same check rejects draws made here with σ/2 and 2σ, and accepts σ.
#[test]
fn event_level_counts_carry_the_square_root_of_max_groups() {
    let p = shipped();
    let policy = test_policy();
    let cells = (p.last_year - p.first_year + 1) as f64;
    let groups = p.max_groups.min(cells);
    let (sigma_patients, sigma_rows) =
        (sigma(groups, 1.0, p.rho), sigma(groups, p.max_rows, p.rho));
    assert_eq!(
        format!("{sigma_patients:.0}"),
        "14",
        "docs/boundary.md's σ 14.14 for patients by event year"
    );
    assert!((sigma_rows - 70.71).abs() < 0.01, "{sigma_rows}");
    // The whole domain's question states the same σ as the draws' one.
    let whole = ask(
        &policy,
        "SELECT event_year, count(DISTINCT patient_id) AS n, count(*) AS events \
         FROM clinical_events GROUP BY event_year",
    );
    let stated = whole.privacy.as_ref().unwrap();
    assert_eq!(stated.groups as f64, groups);
    states(stated.columns[1].unwrap().sigma, sigma_patients);
    states(stated.columns[2].unwrap().sigma, sigma_rows);

    let from = p.last_year - groups as i64 + 1;
    assert_eq!(from, 2019);
    let truth = truth_by_key(
        &direct(
            &policy,
            &format!(
                "SELECT event_year, count(*) AS patients, sum(least(n, {})) AS rows FROM \
                 (SELECT event_year, patient_key, count(*) AS n FROM clinical_events \
                  WHERE event_year >= {from} GROUP BY event_year, patient_key) GROUP BY event_year",
                p.max_rows
            ),
        ),
        "event_year",
        &["patients", "rows"],
    );
    let clear = |t: f64, s: f64| t >= p.threshold + CLEAR * s;
    assert!(truth.values().filter(|t| clear(t[1], sigma_rows)).count() >= 6);
    let mut spreads = [
        Spread::new("count(DISTINCT patient_id) by event year"),
        Spread::new("count(*) by event year"),
    ];
    let sql = format!(
        "SELECT event_year, count(DISTINCT patient_id) AS patients, count(*) AS rows \
         FROM clinical_events WHERE event_year >= {from} GROUP BY event_year"
    );
    let started = std::time::Instant::now();
    let asked = draw(&policy, &sql, &mut spreads, |r, spreads| {
        let stated = r.privacy.as_ref().unwrap();
        states(stated.columns[1].unwrap().sigma, sigma_patients);
        states(stated.columns[2].unwrap().sigma, sigma_rows);
        let b = &r.result.batch;
        assert_eq!(b.num_rows() as f64, cells, "every year of the domain");
        for (i, year) in texts(b, "event_year").iter().enumerate() {
            let Some(t) = truth.get(year) else { continue };
            for (s, (name, sd)) in [("patients", sigma_patients), ("rows", sigma_rows)]
                .into_iter()
                .enumerate()
            {
                if clear(t[s], sd) {
                    let got = numbers(b, name)[i].expect("a clear cell is released");
                    spreads[s].add(got, t[s], sd * sd);
                }
            }
        }
    });
    eprintln!(
        "{asked} questions in {:.1?}: spreads {:.3}, {:.3}",
        started.elapsed(),
        spreads[0].ratio(),
        spreads[1].ratio()
    );
    let verdicts: Vec<_> = spreads.iter().map(Spread::verdict).collect();
    assert!(verdicts.iter().all(Result::is_ok), "{verdicts:?}");
    for (s, sd) in [(0, sigma_patients), (1, sigma_rows)] {
        let cells: Vec<(f64, f64)> = truth
            .values()
            .filter(|t| clear(t[s], sd))
            .map(|t| (t[s], sd))
            .collect();
        control(&spreads[s].what, &cells);
    }
}

/// The mean squared error of a released mean, (S + e_S)/(C + e_C) against
/// S/C, for noise e_S ~ σ_S and e_C ~ σ_C (both discrete Gaussian,
/// independent): given e_C it is (σ_S² + (S·e_C/C)²)/(C + e_C)², summed
/// here over e_C's own distribution (±12σ_C) — exact, where the delta
/// method would be an approximation.
fn mean_mse(s: f64, c: f64, sigma_s: f64, sigma_c: f64) -> f64 {
    let reach = (12.0 * sigma_c).ceil() as i64;
    let (mut total, mut weight) = (0.0, 0.0);
    for k in -reach..=reach {
        let k = k as f64;
        let w = (-k * k / (2.0 * sigma_c * sigma_c)).exp();
        total += w * (sigma_s.powi(2) + (s * k / c).powi(2)) / (c + k).powi(2);
        weight += w;
    }
    total / weight
}

/// A sum and a mean of a value column with public bounds (numeric_value,
/// [0, 200]), by event year (8 cells per patient): the sum carries
/// σ_S = √8·(max_rows·200 + 1)/√(2·ρ/2) ≈ 20,020 — each patient adds at
/// most max_rows values clamped to the bounds, +1 for rounding, on half
/// the statistic's ρ. A mean sums its values less the bounds' midpoint
/// (reach 100: σ_S ≈ 10,020) over a noisy count of values (σ_C =
/// √8·max_rows/√(2·ρ/2) ≈ 100); the released mean is checked against the
/// exact mean squared error of that ratio ([`mean_mse`]), so its sum part
/// and its count part are both in what is checked. The truth is computed
/// here: per patient and year, the mean of their clamped values times
/// their values, at most max_rows of them (rows without a value do not
/// count: SQL's `greatest` would make their null a 0). Positive control: the same
/// checks reject sums and means drawn here with σ/2 and 2σ (both parts),
/// and accept them at σ.
#[test]
fn sums_and_means_carry_the_noise_of_their_bounds() {
    let p = shipped();
    let policy = test_policy();
    let groups = p.max_groups.min((p.last_year - p.first_year + 1) as f64);
    let reach_sum = p.lo.abs().max(p.hi.abs());
    let centre = (p.lo + p.hi) / 2.0;
    let reach_mean = (p.hi - p.lo) / 2.0;
    let sigma_sum = sigma(groups, p.max_rows * reach_sum + 1.0, p.rho / 2.0);
    let sigma_mean_sum = sigma(groups, p.max_rows * reach_mean + 1.0, p.rho / 2.0);
    let sigma_count = sigma(groups, p.max_rows, p.rho / 2.0);
    assert!((sigma_sum - 20_020.0).abs() < 1.0, "{sigma_sum}");
    assert!((sigma_mean_sum - 10_020.0).abs() < 1.0, "{sigma_mean_sum}");
    assert!((sigma_count - 100.0).abs() < 1e-6, "{sigma_count}");

    let from = p.last_year - groups as i64 + 1;
    let truth = truth_by_key(
        &direct(
            &policy,
            &format!(
                "SELECT event_year, sum(m * least(v, {rows})) AS total, \
                 sum((m - {centre}) * least(v, {rows})) AS centred, sum(least(v, {rows})) AS c \
                 FROM (SELECT event_year, patient_key, count(numeric_value) AS v, \
                 avg(least(greatest(numeric_value, {lo}), {hi})) AS m FROM clinical_events \
                 WHERE event_year >= {from} AND numeric_value IS NOT NULL \
                 GROUP BY event_year, patient_key) GROUP BY event_year",
                rows = p.max_rows,
                lo = p.lo,
                hi = p.hi
            ),
        ),
        "event_year",
        &["total", "centred", "c"],
    );
    let clear = |t: &Vec<f64>| t[2] >= p.threshold + CLEAR * sigma_count;
    assert!(truth.values().filter(|t| clear(t)).count() >= 6);
    let mut spreads = [
        Spread::new("sum(numeric_value) by event year"),
        Spread::new("avg(numeric_value) by event year"),
    ];
    let sql = format!(
        "SELECT event_year, sum(numeric_value) AS total, avg(numeric_value) AS mean \
         FROM clinical_events WHERE event_year >= {from} GROUP BY event_year"
    );
    let started = std::time::Instant::now();
    let asked = draw(&policy, &sql, &mut spreads, |r, spreads| {
        let stated = r.privacy.as_ref().unwrap();
        let (s, m) = (stated.columns[1].unwrap(), stated.columns[2].unwrap());
        states(s.sigma, sigma_sum);
        states(m.sum_sigma.unwrap(), sigma_mean_sum);
        states(m.count_sigma, sigma_count);
        let b = &r.result.batch;
        let (totals, means) = (numbers(b, "total"), numbers(b, "mean"));
        for (i, year) in texts(b, "event_year").iter().enumerate() {
            let Some(t) = truth.get(year).filter(|t| clear(t)) else {
                continue;
            };
            let total = totals[i].expect("a clear cell is released");
            spreads[0].add(total, t[0], sigma_sum * sigma_sum);
            let mean = means[i].expect("a clear cell is released");
            let mse = mean_mse(t[1], t[2], sigma_mean_sum, sigma_count);
            spreads[1].add(mean, centre + t[1] / t[2], mse);
        }
    });
    eprintln!(
        "{asked} questions in {:.1?}: spreads {:.3}, {:.3}",
        started.elapsed(),
        spreads[0].ratio(),
        spreads[1].ratio()
    );
    let verdicts: Vec<_> = spreads.iter().map(Spread::verdict).collect();
    assert!(verdicts.iter().all(Result::is_ok), "{verdicts:?}");

    let cells: Vec<&Vec<f64>> = truth.values().filter(|t| clear(t)).collect();
    control(
        &spreads[0].what,
        &cells.iter().map(|t| (t[0], sigma_sum)).collect::<Vec<_>>(),
    );
    // The mean's control: both parts drawn here with σ×f, as dp draws them.
    for (f, accept) in [(0.5, false), (1.0, true), (2.0, false)] {
        let mut s = Spread::new(format!("{}, control at σ×{f}", spreads[1].what));
        for i in 0..DRAWS {
            let t = cells[i % cells.len()];
            let sum = t[1].round() + discrete_gaussian(sigma_mean_sum * f).unwrap() as f64;
            let count = t[2] + discrete_gaussian(sigma_count * f).unwrap() as f64;
            let mse = mean_mse(t[1], t[2], sigma_mean_sum, sigma_count);
            s.add(centre + sum / count, centre + t[1] / t[2], mse);
        }
        assert_eq!(s.verdict().is_ok(), accept, "{s:?}: {}", s.ratio());
    }
}

/// Every cell of the keys' domains is released under dp, so the row limit
/// is decided from the domains before anything runs: a product of exactly
/// `max_rows` cells is answered, one cell more than the limit allows is
/// refused (`too_many_rows`).
#[test]
fn the_row_limit_is_decided_from_the_domains_at_its_edge() {
    let mut policy = test_policy();
    let cells = policy.domains["sex"].len() * policy.domains["age_band"].len();
    let sql = "SELECT sex, age_band, count(DISTINCT patient_id) AS n FROM patients GROUP BY sex, age_band";
    policy.max_rows = cells;
    assert_eq!(ask(&policy, sql).result.batch.num_rows(), cells);
    policy.max_rows = cells - 1;
    let (user, token) = researcher_of("demo-research");
    match query_blocking(
        &Boundary::new(policy),
        &Request {
            store: fixture().store.clone(),
            user: user.into(),
            token: Some(token.into()),
            project: "demo-research".into(),
            sql: sql.into(),
        },
    ) {
        Err(gpdp::tre::TreError::Refused(r)) => assert_eq!(r.rule, "too_many_rows"),
        other => panic!("{cells} cells over a limit of {}: {other:?}", cells - 1),
    }
}

/// A sum's noise reaches the farther of its bounds from zero, a mean's
/// half their width around their midpoint — with a negative lower bound
/// too (the shipped bounds all start at 0, where several wrong formulas
/// give the same σ). Stated σ only: nothing is drawn.
#[test]
fn a_negative_lower_bound_sets_the_reach_of_sums_and_means() {
    let p = shipped();
    let mut policy = test_policy();
    let (lo, hi) = (-30.0, 10.0);
    for project in policy.projects.values_mut() {
        if let Some(dp) = project.disclosure.dp.as_mut() {
            dp.bounds[0] = Some((lo, hi));
        }
    }
    let r = ask(
        &policy,
        "SELECT sex, sum(numeric_value) AS s, avg(numeric_value) AS m FROM clinical_events c \
         JOIN patients p ON c.patient_id = p.patient_id GROUP BY sex",
    );
    let stated = r.privacy.as_ref().unwrap();
    // Keys of the patient: one cell per patient.
    states(
        stated.columns[1].unwrap().sigma,
        sigma(1.0, p.max_rows * 30.0 + 1.0, p.rho / 2.0),
    );
    states(
        stated.columns[2].unwrap().sum_sigma.unwrap(),
        sigma(1.0, p.max_rows * (hi - lo) / 2.0 + 1.0, p.rho / 2.0),
    );
}
