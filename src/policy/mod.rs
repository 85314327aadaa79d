//! Policies: the typed, validated form of the TOML files in `policies/`.
//!
//! A policy is parsed and checked once, here; every later stage receives
//! these values, never raw TOML. Errors carry the file and line so that an
//! information-governance officer editing a policy can fix it without
//! reading code.
//!
//! [`tre`] is the TRE policy; [`ptable`], the cell key method's
//! perturbation table, is here too because it follows from a TRE rule
//! set's parameters alone and a policy whose table cannot exist is refused
//! at load. A policy holds no secret: the TRE's perturbation key is handed
//! to the boundary beside it ([`crate::tre::Boundary`]).

use std::path::{Path, PathBuf};

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub mod ptable;
pub mod tre;

use crate::error::{Classify, ExitStatus};
use crate::extract::{Kind, Source, Table};

/// The policy shipped in `policies/collection.toml`, compiled in so that
/// `gpdp demo` and `gpdp synth` work from any directory.
pub const DEFAULT_COLLECTION_POLICY: &str = include_str!("../../policies/collection.toml");

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl Classify for PolicyError {
    fn exit_status(&self) -> ExitStatus {
        ExitStatus::BadInput
    }
}

/// How a Type 1 opt-out is recorded in the GP record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type1Codes {
    pub dissent: Vec<String>,
    pub withdrawn: Vec<String>,
}

/// How a column's values are generalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// A date becomes the first day of its month.
    Month,
    /// A date becomes the first day of its year.
    Year,
    /// A postcode becomes its LSOA code and IMD decile.
    Lsoa,
}

/// What happens to one extract column on collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pseudonymise,
    Generalise(Rule),
    Keep,
    Drop,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
struct RawColumn {
    action: RawAction,
    rule: Option<Rule>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawAction {
    Pseudonymise,
    Generalise,
    Keep,
    Drop,
}

/// The Parquet codec for the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Snappy,
    Lz4,
    Zstd(i32),
}

impl Codec {
    /// `none`, `snappy`, `lz4`, `zstd` or `zstd(N)` (N from 1 to 22).
    pub fn parse(s: &str) -> Option<Codec> {
        match s {
            "none" => Some(Codec::None),
            "snappy" => Some(Codec::Snappy),
            "lz4" => Some(Codec::Lz4),
            "zstd" => Some(Codec::Zstd(1)),
            _ => {
                let level = s.strip_prefix("zstd(")?.strip_suffix(')')?.parse().ok()?;
                (1..=22).contains(&level).then_some(Codec::Zstd(level))
            }
        }
    }
}

/// A validated collection policy.
#[derive(Debug, Clone)]
pub struct CollectionPolicy {
    pub type1: Type1Codes,
    pub codec: Codec,
    /// Excluded code → its category (Type 1 codes under "type1_opt_out").
    pub excluded_codes: HashMap<String, String>,
    /// Per table, one action per column of `Table::columns()`, in that order.
    actions: [Vec<Action>; 3],
    /// Per provider source, one action per column of `Source::columns()`
    /// (empty: the policy has no `[linked.<source>]` section).
    linked: [Vec<Action>; 2],
    /// When a newer extract, list or provider file is held rather than
    /// taken (`[guards]`).
    pub guards: Guards,
    /// How long the bytes of a later opt-out may outlive its request
    /// (`[erasure]`).
    pub erasure: Erasure,
    /// SHA-256 of the policy text, recorded with every batch it governs.
    pub sha256: String,
}

/// Shrink guards: an input that looks cut short is held, never taken in
/// place of a whole one. The NDOO service sends the whole list each time
/// and a practice's list changes by a percent or two a month, so a list,
/// extract or provider file that loses more than `max_shrink` of what is in
/// force is far likelier a broken download than a change of heart; and a
/// batch most of whose rows are quarantined (its patients file cut, say)
/// would replace a whole batch with a fragment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guards {
    /// The largest share of the patients (rows, for provider files) in
    /// force that a newer input may lose.
    pub max_shrink: f64,
    /// The largest share of a batch's rows that may be quarantined.
    pub max_quarantine_share: f64,
}

impl Default for Guards {
    fn default() -> Guards {
        Guards {
            max_shrink: 0.05,
            max_quarantine_share: 0.10,
        }
    }
}

/// Erasure deadlines (`[erasure]`, optional: the built-in policy leaves it
/// out and takes the default, so its SHA-256 — recorded with every batch —
/// did not change when it was added). A later Type 1 opt-out is unreachable as soon as
/// `gpdp optout apply` commits it (deletion vectors); its rows leave the
/// bytes when `gpdp optout purge` rewrites their files. `gpdp audit`'s
/// `tombstoned_patients_absent` fails if a request older than
/// `purge_deadline_days` still has rows in the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erasure {
    /// Days from a request to the purge that must have erased it (default
    /// 30: the UK GDPR's one month to act on an erasure request).
    pub purge_deadline_days: u32,
}

impl Erasure {
    /// The `[erasure]` section, or the defaults without one.
    fn from_raw(raw: Option<&RawErasure>) -> Result<Erasure, String> {
        let mut erasure = Erasure::default();
        if let Some(days) = raw.and_then(|e| e.purge_deadline_days) {
            if days == 0 {
                return Err(
                    "[erasure] purge_deadline_days = 0: a purge needs at least a day".into(),
                );
            }
            erasure.purge_deadline_days = days;
        }
        Ok(erasure)
    }
}

impl Default for Erasure {
    fn default() -> Erasure {
        Erasure {
            purge_deadline_days: 30,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawErasure {
    purge_deadline_days: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuards {
    max_shrink: Option<f64>,
    max_quarantine_share: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCollection {
    version: u32,
    type1: RawType1,
    output: Option<RawOutput>,
    guards: Option<RawGuards>,
    erasure: Option<RawErasure>,
    #[serde(default)]
    exclusions: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    tables: BTreeMap<Spanned<String>, RawColumns>,
    /// Provider extracts (`gpdp link`): one section per source.
    #[serde(default)]
    linked: BTreeMap<Spanned<String>, RawColumns>,
}

type RawColumns = BTreeMap<Spanned<String>, Spanned<RawColumn>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawType1 {
    dissent_codes: Vec<String>,
    withdrawn_codes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    compression: Spanned<String>,
}

/// The category under which Type 1 code rows are excluded.
pub const TYPE1_CATEGORY: &str = "type1_opt_out";

impl CollectionPolicy {
    /// Loads `path`, or the compiled-in default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<CollectionPolicy, PolicyError> {
        let (text, path) =
            read_or_default(path, DEFAULT_COLLECTION_POLICY, "policies/collection.toml")?;
        CollectionPolicy::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<CollectionPolicy, PolicyError> {
        let raw: RawCollection = toml::from_str(text).map_err(|e| syntax_error(e, text, path))?;
        let line_of = |span: std::ops::Range<usize>| {
            text[..span.start.min(text.len())].matches('\n').count() + 1
        };
        let invalid = |message: String| PolicyError::Invalid {
            path: path.to_owned(),
            message,
        };
        let at = |span: std::ops::Range<usize>, message: String| PolicyError::Syntax {
            path: path.to_owned(),
            line: line_of(span),
            message,
        };
        if raw.version != 1 {
            return Err(invalid(format!(
                "unsupported policy version {} (this gpdp reads version 1)",
                raw.version
            )));
        }
        let t = raw.type1;
        if t.dissent_codes.is_empty() || t.withdrawn_codes.is_empty() {
            return Err(invalid(
                "[type1] needs at least one dissent code and one withdrawn code".into(),
            ));
        }
        let all_codes = t
            .dissent_codes
            .iter()
            .chain(&t.withdrawn_codes)
            .chain(raw.exclusions.values().flatten());
        for code in all_codes {
            if code.is_empty() || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(format!(
                    "code {code:?} is not a SNOMED CT / dm+d id (digits only)"
                )));
            }
        }
        if let Some(both) = t
            .dissent_codes
            .iter()
            .find(|c| t.withdrawn_codes.contains(c))
        {
            return Err(invalid(format!(
                "[type1] code {both} is listed both as dissent and as withdrawn"
            )));
        }

        let codec = match raw.output {
            None => Codec::Zstd(1),
            Some(o) => Codec::parse(o.compression.get_ref()).ok_or_else(|| {
                at(
                    o.compression.span(),
                    format!(
                        "[output] compression {:?} is not one of \"zstd(1..22)\", \"lz4\", \"snappy\", \"none\"",
                        o.compression.get_ref()
                    ),
                )
            })?,
        };

        let mut guards = Guards::default();
        if let Some(g) = &raw.guards {
            for (name, value, slot) in [
                ("max_shrink", g.max_shrink, &mut guards.max_shrink),
                (
                    "max_quarantine_share",
                    g.max_quarantine_share,
                    &mut guards.max_quarantine_share,
                ),
            ] {
                if let Some(v) = value {
                    if !(0.0..=1.0).contains(&v) {
                        return Err(invalid(format!(
                            "[guards] {name} = {v} is not a share between 0 and 1"
                        )));
                    }
                    *slot = v;
                }
            }
        }

        let erasure = Erasure::from_raw(raw.erasure.as_ref()).map_err(invalid)?;

        let mut excluded_codes = HashMap::new();
        for (category, codes) in &raw.exclusions {
            for code in codes {
                if let Some(other) = excluded_codes.insert(code.clone(), category.clone())
                    && &other != category
                {
                    return Err(invalid(format!(
                        "[exclusions] code {code} is listed under both {other} and {category}"
                    )));
                }
            }
        }
        for code in t.dissent_codes.iter().chain(&t.withdrawn_codes) {
            excluded_codes.insert(code.clone(), TYPE1_CATEGORY.to_owned());
        }

        let mut actions: [Vec<Action>; 3] = Default::default();
        for (name, columns) in &raw.tables {
            let table = Table::from_name(name.get_ref()).ok_or_else(|| {
                at(name.span(), format!("[tables.{}] is not an extract table (patients, clinical_events, medications)", name.get_ref()))
            })?;
            actions[table as usize] =
                resolve_columns("tables", table.name(), table.columns(), name, columns, &at)?;
        }
        let mut linked: [Vec<Action>; 2] = Default::default();
        for (name, columns) in &raw.linked {
            let source = Source::from_name(name.get_ref()).ok_or_else(|| {
                at(
                    name.span(),
                    format!(
                        "[linked.{}] is not a provider extract (apcs, ons_deaths)",
                        name.get_ref()
                    ),
                )
            })?;
            linked[source as usize] = resolve_columns(
                "linked",
                source.name(),
                source.columns(),
                name,
                columns,
                &at,
            )?;
        }
        if let Some(t) = Table::ALL.iter().find(|t| actions[**t as usize].is_empty()) {
            return Err(invalid(format!(
                "no [tables.{}] section: every extract table needs a column policy",
                t.name()
            )));
        }

        Ok(CollectionPolicy {
            type1: Type1Codes {
                dissent: t.dissent_codes,
                withdrawn: t.withdrawn_codes,
            },
            codec,
            excluded_codes,
            actions,
            linked,
            guards,
            erasure,
            sha256: crate::digest::sha256_hex(text.as_bytes()),
        })
    }

    /// The action for each column of `table`, in `Table::columns()` order.
    pub fn actions(&self, table: Table) -> &[Action] {
        &self.actions[table as usize]
    }

    /// The action for each column of a provider extract, in
    /// `Source::columns()` order; `None` if the policy has no
    /// `[linked.<source>]` section (then nothing of it may be linked).
    pub fn linked_actions(&self, source: Source) -> Option<&[Action]> {
        let a = &self.linked[source as usize];
        (!a.is_empty()).then_some(a.as_slice())
    }
}

/// Resolves one `[section.name]` of column actions against the format's
/// columns: every column named, each action allowed for what it holds.
fn resolve_columns(
    section: &str,
    table: &str,
    specs: &[crate::extract::Column],
    name: &Spanned<String>,
    columns: &RawColumns,
    at: &dyn Fn(std::ops::Range<usize>, String) -> PolicyError,
) -> Result<Vec<Action>, PolicyError> {
    let mut resolved = vec![None; specs.len()];
    for (column, raw_col) in columns {
        let i = specs
            .iter()
            .position(|c| c.name == column.get_ref())
            .ok_or_else(|| {
                at(
                    column.span(),
                    format!(
                        "[{section}.{table}] {} is not a column of the {table} extract (columns: {})",
                        column.get_ref(),
                        specs.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
                    ),
                )
            })?;
        let action = resolve(specs[i].kind, raw_col.get_ref()).map_err(|why| {
            at(
                raw_col.span(),
                format!("[{section}.{table}] {}: {why}", specs[i].name),
            )
        })?;
        resolved[i] = Some(action);
    }
    if let Some(missing) = specs.iter().zip(&resolved).find(|(_, a)| a.is_none()) {
        return Err(at(
            name.span(),
            format!(
                "[{section}.{table}] says nothing about column {}; every column needs an action",
                missing.0.name
            ),
        ));
    }
    Ok(resolved.into_iter().flatten().collect())
}

/// Checks an action against what the column holds. Direct identifiers can
/// only be dropped; the NHS number only pseudonymised; an exact date of
/// birth never kept. A policy that asks for less is refused, not obeyed.
fn resolve(kind: Kind, raw: &RawColumn) -> Result<Action, String> {
    let action = match (raw.action, raw.rule) {
        (RawAction::Generalise, Some(rule)) => Action::Generalise(rule),
        (RawAction::Generalise, None) => {
            return Err("generalise needs a rule (month, year or lsoa)".into());
        }
        (_, Some(_)) => return Err("only generalise takes a rule".into()),
        (RawAction::Pseudonymise, None) => Action::Pseudonymise,
        (RawAction::Keep, None) => Action::Keep,
        (RawAction::Drop, None) => Action::Drop,
    };
    let allowed = match (kind, action) {
        (Kind::NhsNumber, Action::Pseudonymise) => true,
        (Kind::NhsNumber, _) => {
            return Err("the NHS number must be pseudonymised (it links every table)".into());
        }
        (_, Action::Pseudonymise) => return Err("only the NHS number can be pseudonymised".into()),
        (Kind::Name | Kind::FreeText, Action::Drop) => true,
        (Kind::Name | Kind::FreeText, _) => {
            return Err("a direct identifier can only be dropped".into());
        }
        (Kind::RecordId, Action::Drop) => true,
        (Kind::RecordId, _) => {
            return Err(
                "a provider's record identifier leads back to its identified record; it can only be dropped"
                    .into(),
            );
        }
        (Kind::Postcode, Action::Drop | Action::Generalise(Rule::Lsoa)) => true,
        (Kind::Postcode, _) => {
            return Err("a postcode can only be dropped or generalised with rule lsoa".into());
        }
        (Kind::BirthDate, Action::Keep) => {
            return Err(
                "an exact date of birth must not leave; generalise it (month or year) or drop it"
                    .into(),
            );
        }
        (Kind::BirthDate | Kind::Date, Action::Generalise(Rule::Month | Rule::Year)) => true,
        (_, Action::Generalise(_)) => return Err("this rule does not apply to this column".into()),
        (_, Action::Keep | Action::Drop) => true,
    };
    debug_assert!(allowed);
    Ok(action)
}

/// The text of the policy at `path`, or the built-in one (named `name`).
pub(crate) fn read_or_default(
    path: Option<&Path>,
    default: &'static str,
    name: &str,
) -> Result<(std::borrow::Cow<'static, str>, PathBuf), PolicyError> {
    match path {
        Some(path) => std::fs::read_to_string(path)
            .map(|text| (text.into(), path.to_owned()))
            .map_err(|source| PolicyError::Read {
                path: path.to_owned(),
                source,
            }),
        None => Ok((default.into(), PathBuf::from(format!("{name} (built in)")))),
    }
}

pub(crate) fn syntax_error(e: toml::de::Error, text: &str, path: &Path) -> PolicyError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
        .unwrap_or(0);
    PolicyError::Syntax {
        path: path.to_owned(),
        line,
        message: e.message().to_owned(),
    }
}

/// One extract column and what collection does to it, in words (for the
/// report and the public register).
#[derive(Debug, Clone, Serialize)]
pub struct ColumnAction {
    pub table: String,
    pub column: String,
    pub action: String,
}

/// What the collection policy does to each extract column, in words.
pub fn column_actions(policy: &CollectionPolicy) -> Vec<ColumnAction> {
    let mut columns = Vec::new();
    for table in Table::ALL {
        for (column, action) in table.columns().iter().zip(policy.actions(table)) {
            columns.push(ColumnAction {
                table: table.name().to_owned(),
                column: column.name.to_owned(),
                action: match action {
                    Action::Pseudonymise => "pseudonymise".to_owned(),
                    Action::Generalise(rule) => format!("generalise ({rule:?})").to_lowercase(),
                    Action::Keep => "keep".to_owned(),
                    Action::Drop => "drop".to_owned(),
                },
            });
        }
    }
    columns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_policy_parses() {
        let p = CollectionPolicy::load(None).unwrap();
        assert_eq!(p.type1.dissent, ["827241000000103"]);
        assert_eq!(p.type1.withdrawn, ["827261000000102"]);
        assert_eq!(p.sha256.len(), 64);
    }

    #[test]
    fn the_shipped_policy_is_fail_closed() {
        let p = CollectionPolicy::load(None).unwrap();
        assert_eq!(p.codec, Codec::Zstd(1));
        let patients = p.actions(Table::Patients);
        assert_eq!(patients[0], Action::Pseudonymise);
        assert_eq!(patients[3], Action::Generalise(Rule::Month));
        assert_eq!(patients[5], Action::Generalise(Rule::Lsoa));
        assert_eq!(p.actions(Table::ClinicalEvents)[4], Action::Drop);
        assert_eq!(p.excluded_codes["827241000000103"], TYPE1_CATEGORY);
        assert_eq!(p.excluded_codes["86406008"], "hiv");
    }

    /// Changes one line of the shipped policy and returns the error.
    fn error_after(from: &str, to: &str) -> String {
        let text = DEFAULT_COLLECTION_POLICY.replacen(from, to, 1);
        assert_ne!(text, DEFAULT_COLLECTION_POLICY, "{from} not found");
        CollectionPolicy::parse(&text, Path::new("p.toml"))
            .unwrap_err()
            .to_string()
    }

    fn line_of(needle: &str) -> usize {
        DEFAULT_COLLECTION_POLICY[..DEFAULT_COLLECTION_POLICY.find(needle).unwrap()]
            .matches('\n')
            .count()
            + 1
    }

    #[test]
    fn unsafe_or_incomplete_policies_are_refused_with_their_line() {
        let given = line_of("given_name = ");
        let err = error_after(
            r#"given_name = { action = "drop" }"#,
            r#"given_name = { action = "keep" }"#,
        );
        assert_eq!(
            err,
            format!(
                "p.toml:{given}: [tables.patients] given_name: a direct identifier can only be dropped"
            )
        );
        let err = error_after(
            r#"date_of_birth = { action = "generalise", rule = "month" }"#,
            r#"date_of_birth = { action = "keep" }"#,
        );
        assert!(err.contains("exact date of birth must not leave"), "{err}");
        let err = error_after(
            r#"nhs_number = { action = "pseudonymise" }"#,
            r#"nhs_number = { action = "keep" }"#,
        );
        assert!(err.contains("must be pseudonymised"), "{err}");
        let err = error_after(
            r#"free_text = { action = "drop" }"#,
            r#"free_text = { action = "generalise", rule = "lsoa" }"#,
        );
        assert!(err.contains("direct identifier"), "{err}");
        let err = error_after(
            r#"sex = { action = "keep" }"#,
            r#"sex = { action = "keep", rule = "month" }"#,
        );
        assert!(err.contains("only generalise takes a rule"), "{err}");
        let err = error_after(
            r#"sex = { action = "keep" }"#,
            r#"gender = { action = "keep" }"#,
        );
        assert!(err.contains("gender is not a column"), "{err}");
        let err = error_after(r#"sex = { action = "keep" }"#, "");
        assert!(err.contains("says nothing about column sex"), "{err}");
        let err = error_after(r#"compression = "zstd(1)""#, r#"compression = "gzip""#);
        assert!(
            err.starts_with(&format!("p.toml:{}:", line_of("compression = \"zstd"))),
            "{err}"
        );
        let err = error_after("[tables.medications]", "[tables.prescriptions]");
        assert!(err.contains("not an extract table"), "{err}");
        let err = error_after(
            r#"sex = { action = "keep" }"#,
            r#"sex = { action = "share" }"#,
        );
        assert!(err.contains("unknown variant"), "{err}");
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let text = "version = 1\n[type1]\ndissent_codes = [\"1\"]\nwithdrawn_codes = [\"2\"]\nsurprise = 3\n";
        let err = CollectionPolicy::parse(text, Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("p.toml:5:"), "{err}");
        assert!(err.contains("surprise"), "{err}");
        let both = "version = 1\n[type1]\ndissent_codes = [\"1\"]\nwithdrawn_codes = [\"1\"]\n";
        let err = CollectionPolicy::parse(both, Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("both as dissent and as withdrawn"), "{err}");
    }
}
