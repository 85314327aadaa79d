//! The TRE policy (`policies/tre.toml`): projects (safe projects),
//! researchers and their hashed tokens (safe people), disclosure rules
//! (safe outputs) and per-query limits (safe settings).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ptable::{PTable, Params};
use super::{PolicyError, read_or_default, syntax_error};
use crate::digest::sha256_hex;

pub const DEFAULT_TRE_POLICY: &str = include_str!("../../policies/tre.toml");

/// Columns of the TRE views that may ever be group keys.
pub const GROUPABLE: [&str; 16] = [
    "age_band",
    "sex",
    "ethnicity",
    "imd_decile",
    "registered",
    "deceased",
    "snomedct_code",
    "dmd_code",
    "event_year",
    // Linked provider data (`apcs`, `ons_deaths`).
    "admission_year",
    "admission_method",
    "primary_diagnosis_chapter",
    "discharge_destination",
    "death_year",
    "underlying_cause_chapter",
    "place",
];
/// Columns of the TRE views whose values may be summed or averaged.
pub const VALUE_COLUMNS: [&str; 3] = ["numeric_value", "quantity", "days_in_critical_care"];
/// Columns a predicate may test that are neither groupable nor values:
/// event and admission dates (the date of death is to the month) and full
/// diagnosis codes.
const FILTER_ONLY: [&str; 4] = [
    "date",
    "admission_date",
    "primary_diagnosis",
    "underlying_cause_of_death",
];
/// Columns of the TRE views that a predicate may ever test (WHERE, FILTER,
/// cohort subqueries): the groupable ones, event dates, codes and the values.
pub fn filterable() -> Vec<&'static str> {
    GROUPABLE
        .iter()
        .chain(&FILTER_ONLY)
        .chain(&VALUE_COLUMNS)
        .copied()
        .collect()
}
/// Columns no allow-list may ever name: identities, the practice, small
/// areas, exact birth months and registration or death dates. They exist in
/// the views only so that the views match the store; the grammar makes them
/// unusable (`patient_id` only in joins and cohorts).
pub const NEVER: [&str; 8] = [
    "patient_id",
    "patient_key",
    "practice_id",
    "lsoa_code",
    "birth_month",
    "registration_start",
    "registration_end",
    "date_of_death",
];
/// The columns each view has, for checking allow-lists against the tables.
pub fn view_columns(table: &str) -> &'static [&'static str] {
    match table {
        "patients" => &[
            "patient_id",
            "patient_key",
            "practice_id",
            "age_band",
            "sex",
            "ethnicity",
            "lsoa_code",
            "imd_decile",
            "registered",
            "deceased",
            "birth_month",
            "registration_start",
            "registration_end",
            "date_of_death",
        ],
        "clinical_events" => &[
            "patient_id",
            "patient_key",
            "date",
            "event_year",
            "snomedct_code",
            "numeric_value",
        ],
        "medications" => &[
            "patient_id",
            "patient_key",
            "date",
            "event_year",
            "dmd_code",
            "quantity",
        ],
        "apcs" => &[
            "patient_id",
            "patient_key",
            "admission_date",
            "admission_year",
            "admission_method",
            "primary_diagnosis",
            "primary_diagnosis_chapter",
            "days_in_critical_care",
            "discharge_destination",
        ],
        "ons_deaths" => &[
            "patient_id",
            "patient_key",
            "date",
            "death_year",
            "underlying_cause_of_death",
            "underlying_cause_chapter",
            "place",
        ],
        _ => &[],
    }
}
pub const TABLES: [&str; 5] = [
    "patients",
    "clinical_events",
    "medications",
    "apcs",
    "ons_deaths",
];

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Disclosure {
    pub name: &'static str,
    /// Cells with this many distinct patients or fewer are suppressed.
    pub redact_at_or_below: u64,
    /// Counts are rounded to the nearest multiple of this.
    pub round_to: u64,
    /// N-K dominance for sums and averages: a cell is suppressed when its
    /// `n` largest contributions make up more than `k` of its total.
    pub dominance: Option<Dominance>,
    /// The p% rule for sums and averages: a cell is suppressed when the total
    /// minus its two largest contributions is less than `p` times the
    /// largest (the second largest contributor could estimate the largest
    /// to within p%).
    pub p_percent: Option<f64>,
    /// The cell key method: counts are perturbed from this table's
    /// parameters, by each statistic's cell key, before the threshold.
    pub ckm: Option<Params>,
    /// Differential privacy: contribution bounds, value bounds and the
    /// privacy cost of each statistic ([`crate::tre::control::dp`]).
    pub dp: Option<DpParams>,
    /// The most statistics (released cells) one researcher may be given
    /// under this rule set over one population, all its projects and
    /// stores together (`cell_budget`; [`crate::tre::control::dp::charge_cells`]):
    /// what bounds reconstruction from many noisy or rounded counts where
    /// no privacy budget does.
    pub cell_budget: Option<u64>,
}

/// The `dp` rule set's parameters (zero-concentrated DP, the patient as
/// the privacy unit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpParams {
    /// ρ charged for each released statistic (a sum or mean spends half on
    /// its sum and half on its count).
    pub rho_per_statistic: f64,
    /// The most cells of one release a patient may count in.
    pub max_groups: u32,
    /// The most rows of one patient a cell counts (counts of rows and values, sums).
    pub max_rows: u32,
    /// δ for stating ρ as (ε, δ).
    pub delta: f64,
    /// Clamping bounds per value column, in [`VALUE_COLUMNS`] order; sums
    /// and means of a column without bounds are not released.
    pub bounds: [Option<(f64, f64)>; VALUE_COLUMNS.len()],
}

impl DpParams {
    /// The clamping bounds of a value column.
    pub fn bounds_of(&self, column: &str) -> Option<(f64, f64)> {
        VALUE_COLUMNS
            .iter()
            .position(|c| *c == column)
            .and_then(|i| self.bounds[i])
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dominance {
    pub n: usize,
    pub k: f64,
}

impl Disclosure {
    /// Whether sums and averages need their contributions checked.
    pub fn checks_contributions(&self) -> bool {
        self.dominance.is_some() || self.p_percent.is_some()
    }

    /// What this rule set bounds about a sequence of questions.
    pub fn protection(&self) -> Protection {
        if self.dp.is_some() {
            Protection::RhoBounded
        } else if self.ckm.is_some() {
            Protection::CellKey
        } else {
            Protection::Deterministic
        }
    }
}

/// What a rule set bounds about everything a researcher can ask, weakest
/// first, so that the weakest of several is their minimum. The order:
///
/// - `dp` (ρ-bounded) is strongest: every statistic is charged to the
///   researcher's ρ budget, and zCDP bounds what any sequence of answers
///   within it reveals about one patient, however they are combined.
/// - `ckm` (cell key method) is next: bounded noise, the same for the same
///   records, so two answers cannot be subtracted to an exact count; but
///   nothing bounds how many answers are asked, and enough of them
///   reconstruct a small group's attributes (padding, least squares).
/// - `acro` and `opensafely` (thresholds, rounding, dominance: every rule
///   set without noise) are weakest, and equal: answers are exact up to the
///   rounding, so padding calibrated to it reads a target's attribute from
///   a few answers; only a human checking outputs stands in the way. ACRO's
///   dominance and p% rules protect a large contributor to a sum, not a
///   patient from differencing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protection {
    Deterministic,
    CellKey,
    RhoBounded,
}

/// A researcher's effective guarantee: the weakest rule set among the
/// projects they reach over the same people ([`TrePolicy::effective_guarantee`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Guarantee {
    /// Approved for no project: reaches no data.
    NoProject,
    /// Every project they reach is under `dp`; their loss is bounded by
    /// their budget.
    RhoBounded { rho_budget: f64 },
    /// The weakest is the cell key method.
    CellKey,
    /// The weakest has deterministic rules (opensafely, acro).
    Deterministic,
}

impl Guarantee {
    /// A stable name for machine-readable output.
    pub fn code(&self) -> &'static str {
        match self {
            Guarantee::NoProject => "no_project",
            Guarantee::RhoBounded { .. } => "rho_bounded",
            Guarantee::CellKey => "cell_key",
            Guarantee::Deterministic => "deterministic",
        }
    }
}

impl std::fmt::Display for Guarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Guarantee::NoProject => write!(f, "no approved project: reaches no data"),
            Guarantee::RhoBounded { rho_budget } => {
                write!(f, "ρ-bounded (zCDP, ρ budget {rho_budget})")
            }
            Guarantee::CellKey => write!(f, "cell key method: not DP, bounded noise"),
            Guarantee::Deterministic => write!(f, "deterministic rules: output checking needed"),
        }
    }
}

/// Whether two projects are over the same people. In this policy every
/// project's tables are views of one store: the GP views (patients,
/// clinical events, medications) and the linked views (hospital spells,
/// deaths, joined to the same patients by the same pseudonym) all describe
/// the store's patients, so any two projects that reach a table at all
/// reach the same population. The National Data Opt-out removes some
/// patients from the projects it applies to, but leaves most of them in
/// both an NDOO and an exempt project, so it does not make two
/// populations. A policy serving several stores would compare the stores'
/// collection key ids here.
pub fn same_population(a: &Project, b: &Project) -> bool {
    !a.tables.is_empty() && !b.tables.is_empty()
}

#[derive(Debug, Clone)]
pub struct Project {
    pub id: String,
    pub title: String,
    pub purpose: String,
    /// Whether the National Data Opt-out removes patients from this project's views.
    pub ndoo_applies: bool,
    pub exemption: Option<String>,
    /// The lawful basis the public register shows (`legal_basis`); an
    /// exempt project without one shows its exemption.
    pub legal_basis: Option<String>,
    pub tables: Vec<String>,
    /// View columns a released result may be grouped by.
    pub group_keys: Vec<String>,
    /// View columns predicates may test (WHERE, FILTER, cohort subqueries).
    pub filter_columns: Vec<String>,
    /// View columns that may be summed, averaged or counted.
    pub value_columns: Vec<String>,
    pub disclosure: Disclosure,
}

#[derive(Debug, Clone)]
pub struct Researcher {
    pub user: String,
    pub token_sha256: [u8; 32],
    pub projects: Vec<String>,
    /// Why this researcher may use a project the National Data Opt-out
    /// applies to *and* one exempt from it (comparing the two answers
    /// person by person tells who opted out); required for that pairing.
    pub cross_ndoo_reason: Option<String>,
    /// Why this researcher may use a `dp` project *and* a project under
    /// another rule set over the same people (the other project's answers
    /// are not charged to the budget, so they undo it); required for that
    /// pairing. Their effective guarantee is then the weaker rule set's.
    pub mixed_rules_reason: Option<String>,
    /// Privacy budget ρ (zCDP) for `dp` projects, per store, shared by all
    /// of this researcher's projects; 0 when the policy gives none.
    pub rho_budget: f64,
}

/// The TRE policy as the file says it, and nothing else: no secret and
/// nothing of one run. What the operator hands the TRE when starting it
/// (the perturbation key, where the ledgers live) comes beside the policy,
/// in [`crate::tre::Boundary`].
#[derive(Debug, Clone)]
pub struct TrePolicy {
    pub age_on: chrono::NaiveDate,
    pub memory_mb: usize,
    pub timeout_seconds: u64,
    pub max_rows: usize,
    pub projects: BTreeMap<String, Project>,
    pub researchers: Vec<Researcher>,
    /// The public domain of each group key (`[domains]`), as text: under
    /// `dp` every cell of the domains' product is released, zeros
    /// included, and a key without a domain is refused.
    pub domains: BTreeMap<String, Vec<String>>,
    pub sha256: String,
    /// SHA-256 of the policy's rules alone: its TOML read and written back
    /// in a canonical form (keys sorted), so comments and layout do not
    /// count. What a measurement made under the policy depends on.
    pub rules_sha256: String,
}

impl TrePolicy {
    pub fn researcher(&self, user: &str) -> Option<&Researcher> {
        self.researchers.iter().find(|r| r.user == user)
    }

    /// The rule set of each project a researcher is approved for, in
    /// their order (an unknown project as "").
    pub fn rule_sets_of(&self, researcher: &Researcher) -> Vec<String> {
        researcher
            .projects
            .iter()
            .map(|p| {
                self.projects
                    .get(p)
                    .map_or("", |p| p.disclosure.name)
                    .to_owned()
            })
            .collect()
    }

    /// A researcher's effective guarantee: the weakest rule set (in the
    /// order of [`Protection`]) among the projects they are approved for.
    /// All of them are over the same people ([`same_population`]), so a
    /// question answered under the weakest can undo what the others
    /// protect: a `dp` budget bounds nothing when the same patients can
    /// be differenced under deterministic rules next door.
    pub fn effective_guarantee(&self, researcher: &Researcher) -> Guarantee {
        let weakest = researcher
            .projects
            .iter()
            .filter_map(|p| self.projects.get(p))
            .filter(|p| !p.tables.is_empty())
            .map(|p| p.disclosure.protection())
            .min();
        match weakest {
            None => Guarantee::NoProject,
            Some(Protection::RhoBounded) => Guarantee::RhoBounded {
                rho_budget: researcher.rho_budget,
            },
            Some(Protection::CellKey) => Guarantee::CellKey,
            Some(Protection::Deterministic) => Guarantee::Deterministic,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    version: u32,
    settings: RawSettings,
    disclosure: BTreeMap<String, RawDisclosure>,
    projects: BTreeMap<String, RawProject>,
    #[serde(default)]
    researchers: Vec<RawResearcher>,
    #[serde(default)]
    domains: BTreeMap<String, RawDomain>,
}

/// A group key's public domain: its values, or a range of integers.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawDomain {
    Values(Vec<toml::Value>),
    Range { from: i64, to: i64 },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    age_on: String,
    memory_mb: usize,
    timeout_seconds: u64,
    max_rows: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisclosure {
    redact_at_or_below: u64,
    round_to: u64,
    dominance_n: Option<usize>,
    dominance_k: Option<f64>,
    p_percent: Option<f64>,
    /// "threshold" (default) or "ckm".
    method: Option<String>,
    max_perturbation: Option<u32>,
    variance: Option<f64>,
    small_values: Option<u32>,
    magnitude: Option<f64>,
    rho_per_statistic: Option<f64>,
    max_groups: Option<u32>,
    max_rows: Option<u32>,
    delta: Option<f64>,
    value_bounds: Option<BTreeMap<String, [f64; 2]>>,
    cell_budget: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    title: String,
    purpose: String,
    ndoo: String,
    exemption: Option<String>,
    legal_basis: Option<String>,
    tables: Vec<String>,
    group_keys: Vec<String>,
    filter_columns: Option<Vec<String>>,
    value_columns: Option<Vec<String>>,
    disclosure: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResearcher {
    user: String,
    token_sha256: String,
    projects: Vec<String>,
    cross_ndoo_reason: Option<String>,
    mixed_rules_reason: Option<String>,
    rho_budget: Option<f64>,
}

fn leak(s: &str) -> &'static str {
    // Rule-set names live for the whole process; there are a handful.
    Box::leak(s.to_owned().into_boxed_str())
}

impl TrePolicy {
    /// Loads `path`, or the compiled-in default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<TrePolicy, PolicyError> {
        let (text, path) = read_or_default(path, DEFAULT_TRE_POLICY, "policies/tre.toml")?;
        TrePolicy::parse(&text, &path)
    }

    /// Reads a policy's text (`path` names it in errors): its settings,
    /// then its rule sets, the projects under them, the researchers
    /// approved for those, and the keys' public domains, each checked in
    /// that order; the first error found is returned.
    pub fn parse(text: &str, path: &Path) -> Result<TrePolicy, PolicyError> {
        let raw: Raw = toml::from_str(text).map_err(|e| syntax_error(e, text, path))?;
        let invalid = |message: String| PolicyError::Invalid {
            path: path.to_owned(),
            message,
        };
        if raw.version != 1 {
            return Err(invalid(format!(
                "unsupported policy version {}",
                raw.version
            )));
        }
        let age_on = raw.settings.age_on.parse().map_err(|_| {
            invalid(format!(
                "[settings] age_on {:?} is not a YYYY-MM-DD date",
                raw.settings.age_on
            ))
        })?;
        if raw.settings.memory_mb == 0
            || raw.settings.timeout_seconds == 0
            || raw.settings.max_rows == 0
        {
            return Err(invalid(
                "[settings] memory_mb, timeout_seconds and max_rows must be positive".into(),
            ));
        }
        let mut rule_sets = BTreeMap::new();
        for (name, d) in &raw.disclosure {
            rule_sets.insert(name.clone(), rule_set(name, d).map_err(invalid)?);
        }
        let mut projects = BTreeMap::new();
        for (id, p) in raw.projects {
            let project = project(id.clone(), p, &rule_sets).map_err(invalid)?;
            projects.insert(id, project);
        }
        let mut researchers = Vec::new();
        for r in raw.researchers {
            let researcher = researcher(r, &projects, &researchers).map_err(invalid)?;
            researchers.push(researcher);
        }
        let mut domains = BTreeMap::new();
        for (key, d) in raw.domains {
            if !GROUPABLE.contains(&key.as_str()) {
                return Err(invalid(format!(
                    "[domains] {key:?} is not a group key (group keys: {})",
                    GROUPABLE.join(", ")
                )));
            }
            let values = domain_values(d).map_err(|m| invalid(format!("[domains] {key}: {m}")))?;
            domains.insert(key, values);
        }
        Ok(TrePolicy {
            age_on,
            memory_mb: raw.settings.memory_mb,
            timeout_seconds: raw.settings.timeout_seconds,
            max_rows: raw.settings.max_rows,
            projects,
            researchers,
            domains,
            sha256: sha256_hex(text.as_bytes()),
            rules_sha256: rules_sha256(text, path)?,
        })
    }
}

/// One `[disclosure.NAME]` rule set, checked; the error is the message
/// (with its `[disclosure.NAME]` prefix).
fn rule_set(name: &str, d: &RawDisclosure) -> Result<Disclosure, String> {
    if d.round_to == 0 {
        return Err(format!("[disclosure.{name}] round_to must be at least 1"));
    }
    let dominance = match (d.dominance_n, d.dominance_k) {
        (None, None) => None,
        (Some(n), Some(k)) if n >= 1 && k > 0.0 && k <= 1.0 => Some(Dominance { n, k }),
        _ => {
            return Err(format!(
                "[disclosure.{name}] dominance_n (at least 1) and dominance_k (in (0, 1]) go together"
            ));
        }
    };
    if d.p_percent.is_some_and(|p| !(p > 0.0 && p < 1.0)) {
        return Err(format!(
            "[disclosure.{name}] p_percent must be a fraction in (0, 1), e.g. 0.1"
        ));
    }
    let method = d.method.as_deref().unwrap_or("threshold");
    if !matches!(method, "threshold" | "ckm" | "dp") {
        return Err(format!(
            "[disclosure.{name}] method must be \"threshold\", \"ckm\" or \"dp\", not {method:?}"
        ));
    }
    let ckm_keys = d.max_perturbation.is_some()
        || d.variance.is_some()
        || d.small_values.is_some()
        || d.magnitude.is_some();
    let dp_keys = d.rho_per_statistic.is_some()
        || d.max_groups.is_some()
        || d.max_rows.is_some()
        || d.delta.is_some()
        || d.value_bounds.is_some();
    if ckm_keys && method != "ckm" {
        return Err(format!(
            "[disclosure.{name}] max_perturbation, variance, small_values and magnitude need method = \"ckm\""
        ));
    }
    if dp_keys && method != "dp" {
        return Err(format!(
            "[disclosure.{name}] rho_per_statistic, max_groups, max_rows, delta and value_bounds need method = \"dp\""
        ));
    }
    if method != "threshold" && (d.round_to != 1 || dominance.is_some() || d.p_percent.is_some()) {
        return Err(format!(
            "[disclosure.{name}] method = \"{method}\" adds noise instead of rounding and checks no dominance: set round_to = 1 and no dominance or p% rule"
        ));
    }
    if d.cell_budget == Some(0) || (d.cell_budget.is_some() && method == "dp") {
        return Err(format!(
            "[disclosure.{name}] cell_budget must be at least 1, and is for rule sets without a privacy budget (dp has rho_budget)"
        ));
    }
    let (mut ckm, mut dp) = (None, None);
    match method {
        "ckm" => {
            let params = Params {
                max_perturbation: d.max_perturbation.unwrap_or(5),
                variance: d.variance.unwrap_or(3.0),
                small_values: d.small_values.unwrap_or(4),
                magnitude: d.magnitude.unwrap_or(0.5),
            };
            // The table itself, not only its parameters: the solver can
            // fail where `Params::check` passes.
            PTable::new(params).map_err(|e| format!("[disclosure.{name}] {e}"))?;
            ckm = Some(params);
        }
        "dp" => dp = Some(dp_params(d).map_err(|m| format!("[disclosure.{name}] {m}"))?),
        // "threshold": nothing more to build.
        _ => {}
    }
    Ok(Disclosure {
        name: leak(name),
        redact_at_or_below: d.redact_at_or_below,
        round_to: d.round_to,
        dominance,
        p_percent: d.p_percent,
        ckm,
        dp,
        cell_budget: d.cell_budget,
    })
}

/// One `[projects.ID]`, checked, under its rule set from `rule_sets`; the
/// error is the message (with its `[projects.ID]` prefix).
fn project(
    id: String,
    p: RawProject,
    rule_sets: &BTreeMap<String, Disclosure>,
) -> Result<Project, String> {
    let at = |m: String| format!("[projects.{id}] {m}");
    let ndoo_applies = match p.ndoo.as_str() {
        "applies" => true,
        "exempt" if p.exemption.as_deref().is_some_and(|e| !e.trim().is_empty()) => false,
        "exempt" => {
            return Err(at(
                "ndoo = \"exempt\" needs an `exemption` naming its legal basis".into(),
            ));
        }
        other => {
            return Err(at(format!(
                "ndoo must be \"applies\" or \"exempt\", not {other:?}"
            )));
        }
    };
    if ndoo_applies && p.exemption.is_some() {
        return Err(at("has an exemption but ndoo = \"applies\"; say ndoo = \"exempt\" or remove the exemption".into()));
    }
    if !ndoo_applies
        && matches!(p.purpose.as_str(), "research" | "planning")
        && p.exemption.is_none()
    {
        return Err(at("the National Data Opt-out applies to research and planning unless an exemption is recorded".into()));
    }
    if let Some(t) = p.tables.iter().find(|t| !TABLES.contains(&t.as_str())) {
        return Err(at(format!(
            "table {t:?} is not a TRE view ({})",
            TABLES.join(", ")
        )));
    }
    let in_tables = |c: &str| p.tables.iter().any(|t| view_columns(t).contains(&c));
    // Defaults (docs/design.md §5.2): filters on the group keys, codes, event
    // years and dates and the values; values: those of the tables.
    let value_columns = p.value_columns.clone().unwrap_or_else(|| {
        VALUE_COLUMNS
            .iter()
            .filter(|c| in_tables(c))
            .map(|c| (*c).to_owned())
            .collect()
    });
    let filter_columns = p.filter_columns.clone().unwrap_or_else(|| {
        let mut f: Vec<String> = p.group_keys.clone();
        for c in ["snomedct_code", "dmd_code", "event_year"]
            .iter()
            .chain(&FILTER_ONLY)
            .chain(&VALUE_COLUMNS)
        {
            if in_tables(c) && !f.iter().any(|x| x == c) {
                f.push((*c).to_owned());
            }
        }
        f
    });
    let filterable = filterable();
    for (list, name, universe) in [
        (&p.group_keys, "group key", &GROUPABLE[..]),
        (&filter_columns, "filter column", &filterable[..]),
        (&value_columns, "value column", &VALUE_COLUMNS[..]),
    ] {
        for c in list {
            if NEVER.contains(&c.as_str()) {
                return Err(at(format!(
                    "{name} {c:?} may never be released or tested: it identifies a patient, a practice, a small area or an exact date"
                )));
            }
            if !universe.contains(&c.as_str()) {
                return Err(at(format!(
                    "{name} {c:?} is not allowed (allowed: {})",
                    universe.join(", ")
                )));
            }
            if !in_tables(c) {
                return Err(at(format!(
                    "{name} {c:?} is not a column of the project's tables ({})",
                    p.tables.join(", ")
                )));
            }
        }
    }
    let disclosure = *rule_sets.get(&p.disclosure).ok_or_else(|| {
        at(format!(
            "disclosure {:?} is not a [disclosure.*] rule set",
            p.disclosure
        ))
    })?;
    Ok(Project {
        id,
        title: p.title,
        purpose: p.purpose,
        ndoo_applies,
        exemption: p.exemption,
        legal_basis: p.legal_basis,
        tables: p.tables,
        group_keys: p.group_keys,
        filter_columns,
        value_columns,
        disclosure,
    })
}

/// One `[[researchers]]` entry, checked against the projects and the
/// researchers listed before it; the error is the message.
fn researcher(
    r: RawResearcher,
    projects: &BTreeMap<String, Project>,
    before: &[Researcher],
) -> Result<Researcher, String> {
    let hash = decode_hex32(&r.token_sha256)
        .ok_or_else(|| format!("researcher {}: token_sha256 must be 64 hex digits", r.user))?;
    if let Some(p) = r.projects.iter().find(|p| !projects.contains_key(*p)) {
        return Err(format!("researcher {}: unknown project {p}", r.user));
    }
    if before.iter().any(|x| x.user == r.user) {
        return Err(format!("researcher {} is listed twice", r.user));
    }
    let kind = |applies: bool| {
        r.projects
            .iter()
            .find(|p| projects[*p].ndoo_applies == applies)
    };
    let reason = r
        .cross_ndoo_reason
        .as_ref()
        .filter(|why| !why.trim().is_empty());
    if let (Some(applies), Some(exempt), None) = (kind(true), kind(false), reason) {
        return Err(format!(
            "researcher {}: approved for {applies} (National Data Opt-out applies) and {exempt} (exempt from it): the same question in both tells who opted out; record why this is needed as cross_ndoo_reason = \"…\", or approve one kind only",
            r.user
        ));
    }
    // A `dp` project beside one under another rule set over the
    // same people: the other's answers are not charged to the
    // budget, and differencing them reads what `dp` protects.
    let mixed_reason = r
        .mixed_rules_reason
        .as_ref()
        .filter(|why| !why.trim().is_empty());
    let dp_project = r
        .projects
        .iter()
        .map(|p| &projects[p])
        .find(|p| p.disclosure.protection() == Protection::RhoBounded);
    if let (Some(dp), None) = (dp_project, mixed_reason) {
        let others: Vec<String> = r
            .projects
            .iter()
            .map(|p| &projects[p])
            .filter(|p| {
                p.disclosure.protection() != Protection::RhoBounded && same_population(dp, p)
            })
            .map(|p| format!("{} (rule set {})", p.id, p.disclosure.name))
            .collect();
        if !others.is_empty() {
            return Err(format!(
                "researcher {}: approved for {} (rule set {}: differential privacy, charged to a ρ budget) and for {} over the same patients: answers under those rules are not charged to the budget, so differencing them reads what the budget protects, and the researcher's guarantee is only the weakest rule set's; record why this is needed as mixed_rules_reason = \"…\", or approve `dp` projects only",
                r.user,
                dp.id,
                dp.disclosure.name,
                others.join(", ")
            ));
        }
    }
    let rho_budget = r.rho_budget.unwrap_or(0.0);
    if !(rho_budget.is_finite() && rho_budget >= 0.0) {
        return Err(format!(
            "researcher {}: rho_budget must be a number ≥ 0",
            r.user
        ));
    }
    Ok(Researcher {
        user: r.user,
        token_sha256: hash,
        projects: r.projects,
        cross_ndoo_reason: r.cross_ndoo_reason,
        mixed_rules_reason: r.mixed_rules_reason,
        rho_budget,
    })
}

/// SHA-256 of `text`'s TOML, read and written back canonically.
fn rules_sha256(text: &str, path: &Path) -> Result<String, PolicyError> {
    let rules: toml::Table = toml::from_str(text).map_err(|e| syntax_error(e, text, path))?;
    let canonical = toml::to_string(&rules).map_err(|e| PolicyError::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok(sha256_hex(canonical.as_bytes()))
}

/// The largest public domain of one key (a codelist of a few thousand
/// codes fits; a domain is released cell by cell).
const MAX_DOMAIN: usize = 10_000;

fn domain_values(d: RawDomain) -> Result<Vec<String>, String> {
    let values: Vec<String> = match d {
        RawDomain::Range { from, to } => {
            if to < from || (to - from) as u64 >= MAX_DOMAIN as u64 {
                return Err(format!(
                    "the range {from}..={to} must be non-empty and hold at most {MAX_DOMAIN} values"
                ));
            }
            (from..=to).map(|v| v.to_string()).collect()
        }
        RawDomain::Values(v) => v
            .into_iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                other => Err(format!(
                    "values must be strings, integers or booleans, not {other}"
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    let distinct: std::collections::BTreeSet<&String> = values.iter().collect();
    if values.is_empty() || values.len() > MAX_DOMAIN || distinct.len() != values.len() {
        return Err(format!(
            "a domain lists 1 to {MAX_DOMAIN} distinct values ({} given, {} distinct)",
            values.len(),
            distinct.len()
        ));
    }
    Ok(values)
}

/// The `dp` rule set's parameters, checked.
fn dp_params(d: &RawDisclosure) -> Result<DpParams, String> {
    let rho = d.rho_per_statistic.ok_or(
        "method = \"dp\" needs rho_per_statistic (the zCDP cost of one statistic, e.g. 0.01)",
    )?;
    if !(rho > 0.0 && rho <= 10.0) {
        return Err(format!("rho_per_statistic must be in (0, 10], not {rho}"));
    }
    let max_groups = d.max_groups.unwrap_or(8);
    let max_rows = d.max_rows.unwrap_or(5);
    if max_groups == 0 || max_rows == 0 || max_groups > 1_000 || max_rows > 1_000 {
        return Err("max_groups and max_rows must be in 1..=1000".into());
    }
    let delta = d.delta.unwrap_or(1e-6);
    if !(delta > 0.0 && delta < 1e-3) {
        return Err(format!("delta must be in (0, 0.001), not {delta}"));
    }
    let mut bounds = [None; VALUE_COLUMNS.len()];
    for (column, [lo, hi]) in d.value_bounds.clone().unwrap_or_default() {
        let i = VALUE_COLUMNS
            .iter()
            .position(|c| *c == column)
            .ok_or_else(|| {
                format!(
                    "value_bounds: {column:?} is not a value column ({})",
                    VALUE_COLUMNS.join(", ")
                )
            })?;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(format!(
                "value_bounds.{column}: [{lo}, {hi}] is not an interval"
            ));
        }
        bounds[i] = Some((lo, hi));
    }
    Ok(DpParams {
        rho_per_statistic: rho,
        max_groups,
        max_rows,
        delta,
        bounds,
    })
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_digest_ignores_comments_and_layout_but_not_rules() {
        let shipped = TrePolicy::load(None).unwrap();
        let path = Path::new("test.toml");
        let commented = DEFAULT_TRE_POLICY.replace("\n[settings]", "\n# a comment\n\n[settings]");
        assert_ne!(
            commented, DEFAULT_TRE_POLICY,
            "the shipped policy has [settings]"
        );
        assert_eq!(
            rules_sha256(&commented, path).unwrap(),
            shipped.rules_sha256
        );
        let changed = DEFAULT_TRE_POLICY.replace("cell_budget = 15", "cell_budget = 16");
        assert_ne!(rules_sha256(&changed, path).unwrap(), shipped.rules_sha256);
    }

    #[test]
    fn the_shipped_policy_parses() {
        let p = TrePolicy::load(None).unwrap();
        assert!(p.projects["demo-research"].ndoo_applies);
        assert!(!p.projects["demo-planning-exempt"].ndoo_applies);
        assert_eq!(p.projects["demo-research"].disclosure.redact_at_or_below, 7);
        assert_eq!(p.researchers[0].user, "alice");
    }

    /// The shipped policy loads with no recorded reason of either kind:
    /// one demo researcher per rule set, each with the guarantee of the
    /// one rule set they reach; the ρ budget is the `dp` researcher's.
    #[test]
    fn the_shipped_researchers_each_reach_one_rule_set_and_need_no_reason() {
        let p = TrePolicy::load(None).unwrap();
        let mut seen = Vec::new();
        for r in &p.researchers {
            assert_eq!(r.mixed_rules_reason, None, "{}", r.user);
            assert_eq!(r.cross_ndoo_reason, None, "{}", r.user);
            let rule_sets: Vec<&str> = r
                .projects
                .iter()
                .map(|id| p.projects[id].disclosure.name)
                .collect();
            seen.push((r.user.as_str(), rule_sets, p.effective_guarantee(r)));
        }
        assert_eq!(
            seen,
            [
                ("alice", vec!["opensafely"], Guarantee::Deterministic),
                (
                    "dana",
                    vec!["dp"],
                    Guarantee::RhoBounded { rho_budget: 2.0 }
                ),
                ("carol", vec!["ckm"], Guarantee::CellKey),
                ("priya", vec!["acro"], Guarantee::Deterministic),
                ("bob", vec![], Guarantee::NoProject),
            ]
        );
    }

    /// The shipped policy with one more researcher, "zed", whose entry
    /// (after `user` and `token_sha256`) is `entry`.
    fn with_zed(entry: &str) -> Result<TrePolicy, String> {
        let text = format!(
            "{DEFAULT_TRE_POLICY}\n[[researchers]]\nuser = \"zed\"\ntoken_sha256 = \"{}\"\n{entry}\n",
            "0".repeat(64)
        );
        TrePolicy::parse(&text, Path::new("t.toml")).map_err(|e| e.to_string())
    }

    fn zed(p: &TrePolicy) -> Guarantee {
        p.effective_guarantee(p.researcher("zed").unwrap())
    }

    /// A `dp` project beside one under another rule set over the same
    /// patients is refused at load, naming the researcher, the projects
    /// and the rule sets, unless the entry records why; with a reason it
    /// loads, and the researcher's guarantee is the weaker rule set's.
    /// Positive control: deterministic rule sets together (no `dp`), and
    /// `dp` alone, need no reason.
    #[test]
    fn dp_beside_another_rule_set_over_the_same_people_needs_a_recorded_reason() {
        let err = with_zed("projects = [\"demo-research\", \"demo-opensafely\"]\nrho_budget = 1.0")
            .unwrap_err();
        for says in [
            "researcher zed",
            "demo-research (rule set dp",
            "demo-opensafely (rule set opensafely)",
            "mixed_rules_reason",
        ] {
            assert!(err.contains(says), "{says}: {err}");
        }
        // ACRO (with the opt-out applying, like demo-research): refused too.
        let err =
            with_zed("projects = [\"demo-prescribing-acro\", \"demo-research\"]").unwrap_err();
        assert!(
            err.contains("demo-prescribing-acro (rule set acro)"),
            "{err}"
        );
        // The cell key method (exempt from the opt-out: that pairing's
        // reason given, so that the mixed rules are what is refused).
        let err = with_zed(
            "projects = [\"demo-research\", \"demo-planning-exempt\"]\ncross_ndoo_reason = \"test\"",
        )
        .unwrap_err();
        assert!(
            err.contains("demo-planning-exempt (rule set ckm)")
                && err.contains("mixed_rules_reason"),
            "{err}"
        );
        // A blank reason is no reason.
        assert!(
            with_zed(
                "projects = [\"demo-research\", \"demo-opensafely\"]\nmixed_rules_reason = \" \""
            )
            .is_err()
        );
        // With a reason it loads, and says what the researcher really has.
        let p = with_zed(
            "projects = [\"demo-research\", \"demo-opensafely\"]\nrho_budget = 1.0\nmixed_rules_reason = \"a methods comparison, outputs checked by hand\"",
        )
        .unwrap();
        assert_eq!(zed(&p), Guarantee::Deterministic);
        assert_eq!(
            zed(&p).to_string(),
            "deterministic rules: output checking needed"
        );
        // Positive controls: no `dp` project, or `dp` only.
        let p = with_zed("projects = [\"demo-opensafely\", \"demo-prescribing-acro\"]").unwrap();
        assert_eq!(zed(&p), Guarantee::Deterministic);
        let p = with_zed("projects = [\"demo-research\"]\nrho_budget = 0.5").unwrap();
        assert_eq!(zed(&p), Guarantee::RhoBounded { rho_budget: 0.5 });
        assert_eq!(zed(&p).to_string(), "ρ-bounded (zCDP, ρ budget 0.5)");
    }

    /// The effective guarantee is the weakest rule set reached, in the
    /// order dp > ckm > acro = opensafely, whatever order the projects
    /// are listed in.
    #[test]
    fn the_effective_guarantee_is_the_weakest_rule_set_reached() {
        let both = "cross_ndoo_reason = \"test\"\nmixed_rules_reason = \"test\"";
        for (projects, want) in [
            ("\"demo-planning-exempt\"", Guarantee::CellKey),
            (
                "\"demo-research\", \"demo-planning-exempt\"",
                Guarantee::CellKey,
            ),
            (
                "\"demo-planning-exempt\", \"demo-research\"",
                Guarantee::CellKey,
            ),
            (
                "\"demo-planning-exempt\", \"demo-opensafely\"",
                Guarantee::Deterministic,
            ),
            (
                "\"demo-prescribing-acro\", \"demo-planning-exempt\", \"demo-research\"",
                Guarantee::Deterministic,
            ),
        ] {
            let p = with_zed(&format!("projects = [{projects}]\n{both}")).unwrap();
            assert_eq!(zed(&p), want, "{projects}");
        }
        assert_eq!(
            Guarantee::CellKey.to_string(),
            "cell key method: not DP, bounded noise"
        );
    }

    /// The shipped rule sets are the rules they are named after, pinned
    /// against the rules' own public statements, and each demo project uses
    /// the one its name promises: a value edited in `policies/tre.toml`
    /// fails here by name, whatever the boundary's tests happen to probe.
    #[test]
    fn the_shipped_rule_sets_are_the_published_rules() {
        let p = TrePolicy::load(None).unwrap();
        let rules = |project: &str| p.projects[project].disclosure;

        // OpenSAFELY's output checking rules: a statistic that describes 7
        // or fewer patients is redacted, and counts are then rounded to the
        // nearest 5. Nothing else is checked.
        let opensafely = rules("demo-opensafely");
        assert_eq!(opensafely.name, "opensafely");
        assert_eq!(opensafely.redact_at_or_below, 7, "OpenSAFELY: 7 or fewer");
        assert_eq!(opensafely.round_to, 5, "OpenSAFELY: nearest 5");
        assert_eq!(opensafely.dominance, None);
        assert_eq!(opensafely.p_percent, None);
        assert!(opensafely.ckm.is_none() && opensafely.dp.is_none());

        // ACRO/SACRO's defaults, after the statistical disclosure control
        // handbook: a cell needs at least 10 contributors (so 9 or fewer are
        // redacted); N-K dominance with n = 2, k = 0.9 (the two largest
        // contributions may not exceed 90% of the total); the p% rule with
        // p = 10%; counts rounded to 5.
        let acro = rules("demo-prescribing-acro");
        assert_eq!(acro.name, "acro");
        assert_eq!(acro.redact_at_or_below, 9, "ACRO: threshold 10");
        assert_eq!(acro.round_to, 5);
        assert_eq!(acro.dominance, Some(Dominance { n: 2, k: 0.9 }));
        assert_eq!(acro.p_percent, Some(0.1));
        assert!(acro.ckm.is_none() && acro.dp.is_none());

        // The two noisy rule sets add noise instead of rounding, then apply
        // OpenSAFELY's threshold (7 or fewer) to the noisy count. The cell
        // key method's table: the largest perturbation D = 5, variance
        // V = 3, no count released in 1..=4 (ONS-style), sums moved by
        // ±0.5 × (½ to 1½) of the largest contribution.
        let ckm = rules("demo-planning-exempt");
        assert_eq!(ckm.name, "ckm");
        assert_eq!((ckm.redact_at_or_below, ckm.round_to), (7, 1));
        assert_eq!(
            ckm.ckm,
            Some(crate::policy::ptable::Params {
                max_perturbation: 5,
                variance: 3.0,
                small_values: 4,
                magnitude: 0.5,
            })
        );
        assert!(ckm.dominance.is_none() && ckm.p_percent.is_none() && ckm.dp.is_none());
        // Differential privacy (zCDP, the patient as the unit): ρ = 0.02 per
        // statistic (σ = 5 on a count of patients), each patient in at most
        // 8 cells with at most 5 rows each, values clamped to public bounds,
        // stated as (ε, δ) with δ = 10⁻⁶.
        let dp = rules("demo-research");
        assert_eq!(dp.name, "dp");
        assert_eq!((dp.redact_at_or_below, dp.round_to), (7, 1));
        let d = dp.dp.expect("demo-research is under dp");
        assert_eq!(d.rho_per_statistic, 0.02);
        assert_eq!((d.max_groups, d.max_rows), (8, 5));
        assert_eq!(d.delta, 1e-6);
        assert_eq!(d.bounds_of("numeric_value"), Some((0.0, 200.0)));
        assert_eq!(d.bounds_of("quantity"), Some((0.0, 200.0)));
        assert_eq!(d.bounds_of("days_in_critical_care"), Some((0.0, 30.0)));
        assert!(dp.dominance.is_none() && dp.p_percent.is_none() && dp.ckm.is_none());
    }

    #[test]
    fn unsafe_projects_are_refused() {
        let exempt_without_basis = DEFAULT_TRE_POLICY.replace(
            "exemption = \"demo: approval under section 251 of the NHS Act 2006 (illustrative)\"\n",
            "",
        );
        let err = TrePolicy::parse(&exempt_without_basis, Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs an `exemption`"), "{err}");
        let pseudonym_key = DEFAULT_TRE_POLICY.replacen(
            "group_keys = [\"age_band\"",
            "group_keys = [\"patient_id\", \"age_band\"",
            1,
        );
        let err = TrePolicy::parse(&pseudonym_key, Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"patient_id\" may never be released"),
            "{err}"
        );
        let lsoa_filter = DEFAULT_TRE_POLICY.replacen(
            "disclosure = \"opensafely\"",
            "filter_columns = [\"sex\", \"lsoa_code\"]\ndisclosure = \"opensafely\"",
            1,
        );
        let err = TrePolicy::parse(&lsoa_filter, Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"lsoa_code\" may never be released"), "{err}");
    }

    /// A project the National Data Opt-out applies to beside one exempt
    /// from it is refused without a recorded reason (a blank one is none);
    /// with one, or with one kind only, the policy loads.
    #[test]
    fn ndoo_and_exempt_projects_together_need_a_recorded_reason() {
        let both = "projects = [\"demo-opensafely\", \"demo-planning-exempt\"]";
        let err = with_zed(both).unwrap_err();
        assert!(
            err.contains("researcher zed")
                && err.contains("demo-opensafely")
                && err.contains("demo-planning-exempt")
                && err.contains("cross_ndoo_reason"),
            "{err}"
        );
        assert!(with_zed(&format!("{both}\ncross_ndoo_reason = \"  \"")).is_err());
        with_zed(&format!(
            "{both}\ncross_ndoo_reason = \"a side-by-side comparison\""
        ))
        .unwrap();
        // One kind only needs no reason.
        with_zed("projects = [\"demo-opensafely\", \"demo-prescribing-acro\"]").unwrap();
    }

    #[test]
    fn ckm_parameters_are_validated() {
        let p = TrePolicy::load(None).unwrap();
        assert!(p.projects["demo-planning-exempt"].disclosure.ckm.is_some());
        for (from, to, says) in [
            (
                "small_values = 4",
                "small_values = 5",
                "must exceed small_values",
            ),
            ("variance = 3.0", "variance = 30.0", "variance must be"),
            (
                "method = \"ckm\"\nmax",
                "method = \"noise\"\nmax",
                "method must be",
            ),
        ] {
            let bad = DEFAULT_TRE_POLICY.replacen(from, to, 1);
            let err = TrePolicy::parse(&bad, Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{from}: {err}");
        }
    }

    #[test]
    fn filter_and_value_columns_default_to_the_tables() {
        let p = TrePolicy::load(None).unwrap();
        let research = &p.projects["demo-research"];
        for c in [
            "sex",
            "snomedct_code",
            "date",
            "numeric_value",
            "quantity",
            "admission_date",
            "primary_diagnosis",
        ] {
            assert!(research.filter_columns.iter().any(|f| f == c), "{c}");
        }
        assert_eq!(
            research.value_columns,
            ["numeric_value", "quantity", "days_in_critical_care"]
        );
        // A project without the linked tables gets none of their columns.
        let acro = &p.projects["demo-prescribing-acro"];
        assert_eq!(acro.value_columns, ["numeric_value", "quantity"]);
        assert!(!acro.filter_columns.iter().any(|f| f == "admission_date"));
        assert!(!research.filter_columns.iter().any(|f| f == "birth_month"));
    }
}
