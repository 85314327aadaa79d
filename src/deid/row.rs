//! One input row through a [`Plan`]: its NHS number validated, then every
//! value that would be stored checked and, where the policy says so,
//! generalised — before anything of the row is appended, so a bad row never
//! half-enters a batch. A row either goes on with its values or is
//! quarantined with one reason (the first problem found, in column order),
//! which the caller lists on the sender's side, never in the store.
//!
//! This is the hot path of collection: it reads fields as bytes, borrows
//! text from the record it was read into (checked once, as UTF-8), and
//! allocates nothing per row. The caller hands fields over through a
//! closure, so each caller's loop is compiled for its own reader.

use crate::calendar::{Day, parse_ymd};
use crate::deid::generalise::{PostcodeLookup, generalise_ymd};
use crate::nhs_number::{NhsNumber, NhsNumberError};
use crate::policy::CollectionPolicy;

use super::plan::{Fill, NumberCheck, Origin, Plan, TextCheck};

/// Why a row is quarantined (the names are stable: receipts and the
/// quarantine lists carry them).
pub type Reason = &'static str;

/// A checked value waiting to be appended. Text borrows the record it was
/// checked in; an area borrows the postcode lookup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'r> {
    Date(Option<Day>),
    Text(Option<&'r str>),
    Number(Option<f64>),
    Area(Option<(&'r str, u8)>),
}

/// Checks the rows of one input against its plan.
pub struct Checker<'p> {
    plan: &'p Plan,
    lookup: Option<&'p PostcodeLookup>,
    scratch: Vec<u8>,
    last_nhs: Option<NhsNumber>,
    /// Postcodes the lookup did not know (their area is left empty).
    pub unmatched_postcodes: u64,
}

impl<'p> Checker<'p> {
    /// `lookup` maps postcodes to areas (`None`: every area is empty).
    pub fn new(plan: &'p Plan, lookup: Option<&'p PostcodeLookup>) -> Checker<'p> {
        Checker {
            plan,
            lookup,
            scratch: Vec::new(),
            last_nhs: None,
            unmatched_postcodes: 0,
        }
    }

    /// Checks one row. `complete` says whether it has as many fields as
    /// the header; `field(i)` is the value of the format's column `i`.
    /// Returns the row's NHS number with `values` holding one value per
    /// fill, or the reason it is quarantined.
    #[inline]
    pub fn check<'r>(
        &mut self,
        complete: bool,
        field: impl Fn(usize) -> &'r [u8],
        values: &mut Vec<Value<'r>>,
    ) -> Result<NhsNumber, Reason>
    where
        'p: 'r,
    {
        if !complete {
            return Err("wrong_column_count");
        }
        let nhs = self.nhs_number(field(self.plan.nhs_col))?;
        values.clear();
        for fill in &self.plan.fills {
            values.push(match *fill {
                Fill::Date {
                    col,
                    rule,
                    required,
                    missing,
                } => date(field(col), rule, required, missing)?,
                Fill::Text {
                    col,
                    required,
                    check,
                } => text(field(col), required, check)?,
                Fill::Number {
                    col,
                    required,
                    check,
                } => number(field(col), required, check)?,
                Fill::Area { col } => {
                    let raw = field(col);
                    let area = self.lookup.and_then(|l| l.get(raw, &mut self.scratch));
                    if area.is_none() && !raw.is_empty() {
                        self.unmatched_postcodes += 1;
                    }
                    Value::Area(area)
                }
            });
        }
        Ok(nhs)
    }

    /// Rows come grouped by patient: a number equal to the last valid one
    /// is that valid number (a valid number is exactly its ten digits), so
    /// it is not checked again.
    #[inline]
    fn nhs_number(&mut self, raw: &[u8]) -> Result<NhsNumber, Reason> {
        if let Some(n) = self.last_nhs
            && n.as_bytes() == raw
        {
            return Ok(n);
        }
        match NhsNumber::parse(raw) {
            Ok(n) => Ok(*self.last_nhs.insert(n)),
            Err(e) => Err(match (self.plan.origin, e) {
                (Origin::Practice, e) => e.reason(),
                (Origin::Provider, NhsNumberError::Missing) => "missing_nhs_number",
                (Origin::Provider, _) => "invalid_nhs_number",
            }),
        }
    }
}

#[inline]
fn date<'r>(
    raw: &[u8],
    rule: Option<crate::policy::Rule>,
    required: bool,
    missing: Reason,
) -> Result<Value<'r>, Reason> {
    match (raw.is_empty(), parse_ymd(raw)) {
        (true, _) if required => Err(missing),
        (true, _) => Ok(Value::Date(None)),
        (false, Some(ymd)) => Ok(Value::Date(Some(generalise_ymd(ymd, rule)))),
        (false, None) => Err("malformed_date"),
    }
}

#[inline]
fn text(raw: &[u8], required: bool, check: TextCheck) -> Result<Value<'_>, Reason> {
    let Ok(s) = std::str::from_utf8(raw) else {
        return Err("invalid_value");
    };
    if s.is_empty() {
        return if required {
            Err("missing_value")
        } else {
            Ok(Value::Text(None))
        };
    }
    let ok = match check {
        TextCheck::Any => true,
        TextCheck::Sex => matches!(s, "M" | "F" | "I" | "U"),
        TextCheck::Digits => s.bytes().all(|b| b.is_ascii_digit()),
        TextCheck::ClinicalCodes => s.split(';').all(is_clinical_code),
        TextCheck::Short => s.len() <= 64,
    };
    if ok {
        Ok(Value::Text(Some(s)))
    } else {
        Err(match check {
            TextCheck::Digits => "invalid_code",
            TextCheck::ClinicalCodes => "malformed_code",
            TextCheck::Short => "malformed_value",
            TextCheck::Any | TextCheck::Sex => "invalid_value",
        })
    }
}

#[inline]
fn number<'r>(raw: &[u8], required: bool, check: NumberCheck) -> Result<Value<'r>, Reason> {
    if raw.is_empty() {
        return if required {
            Err("missing_value")
        } else {
            Ok(Value::Number(None))
        };
    }
    let s = std::str::from_utf8(raw).ok();
    let x = match check {
        NumberCheck::Finite => s
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|x| x.is_finite())
            .ok_or("invalid_number")?,
        // Counts are whole: parsed as integers, so `2.5` or `1e3` is not one.
        NumberCheck::Count => s
            .and_then(|s| s.parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or("malformed_number")? as f64,
    };
    Ok(Value::Number(Some(x)))
}

/// ICD-10 (`E119`, `I10X`) or OPCS-4 (`W371`) without dots: a capital
/// letter, two digits, and at most two more digits or `X`.
pub fn is_clinical_code(code: &str) -> bool {
    let b = code.as_bytes();
    (3..=5).contains(&b.len())
        && b[0].is_ascii_uppercase()
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit()
        && b[3..].iter().all(|c| c.is_ascii_digit() || *c == b'X')
}

/// The exclusion lists as a fast lookup on the code's digits: a sorted list
/// searched by binary search (a few dozen codes; faster than hashing). A
/// practice's row whose code is on a list is not collected, and counted
/// under its list's category.
pub struct Exclusions {
    codes: Vec<(u64, usize)>,
    categories: Vec<String>,
}

impl Exclusions {
    pub fn new(policy: &CollectionPolicy) -> Exclusions {
        let mut categories: Vec<String> = policy.excluded_codes.values().cloned().collect();
        categories.sort();
        categories.dedup();
        let mut codes: Vec<(u64, usize)> = policy
            .excluded_codes
            .iter()
            .filter_map(|(code, cat)| {
                Some((
                    code.parse::<u64>().ok()?,
                    categories.iter().position(|c| c == cat)?,
                ))
            })
            .collect();
        codes.sort_unstable();
        Exclusions { codes, categories }
    }

    /// The exclusion category of a code (digits only, as validated).
    pub fn category(&self, code: &[u8]) -> Option<&str> {
        if code.is_empty() || code.len() > 19 {
            return None;
        }
        let n = code.iter().try_fold(0u64, |acc, b| {
            b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
        })?;
        let i = self.codes.binary_search_by_key(&n, |(c, _)| *c).ok()?;
        Some(self.categories[self.codes[i].1].as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::{Source, Table};

    const NHS: &str = "9434765919";

    /// Checks one row of `columns`, given as `column=value` pairs (the
    /// rest empty).
    fn check<'p>(
        plan: &'p Plan,
        columns: &[crate::extract::Column],
        pairs: &[(&str, &str)],
    ) -> Result<Vec<Value<'p>>, Reason> {
        let row: Vec<&'static str> = columns
            .iter()
            .map(|c| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == c.name)
                    .map_or("", |(_, v)| v.to_string().leak())
            })
            .collect();
        let mut checker = Checker::new(plan, None);
        let mut values = Vec::new();
        checker
            .check(true, |i| row[i].as_bytes(), &mut values)
            .map(|_| values)
    }

    fn default_actions(t: Table) -> Vec<crate::policy::Action> {
        CollectionPolicy::load(None).unwrap().actions(t).to_vec()
    }

    fn linked_actions(s: Source) -> Vec<crate::policy::Action> {
        let policy = CollectionPolicy::load(None).unwrap();
        policy.linked_actions(s).unwrap().to_vec()
    }

    #[test]
    fn practice_rows_are_checked_as_gp_exports_are() {
        let t = Table::ClinicalEvents;
        let events = Plan::table(t, &default_actions(t));
        let row = |code: &str, value: &str| {
            check(
                &events,
                t.columns(),
                &[
                    ("nhs_number", NHS),
                    ("date", "2024-02-29"),
                    ("snomedct_code", code),
                    ("numeric_value", value),
                ],
            )
        };
        assert_eq!(
            row("73211009", "2.5"),
            Ok(vec![
                Value::Date(crate::calendar::parse_date(b"2024-02-29")),
                Value::Text(Some("73211009")),
                Value::Number(Some(2.5)),
            ])
        );
        assert_eq!(row("7321a", "1"), Err("invalid_code"));
        assert_eq!(row("73211009", "inf"), Err("invalid_number"));
        assert_eq!(row("", "1"), Err("missing_value"));
        let t = Table::Patients;
        let patients = Plan::table(t, &default_actions(t));
        let base = [
            ("nhs_number", NHS),
            ("date_of_birth", "1970-06-15"),
            ("registration_start", "2000-01-01"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            check(&patients, t.columns(), &[&base[..], extra].concat())
        };
        assert_eq!(with(&[("sex", "X")]), Err("invalid_value"));
        assert_eq!(
            with(&[("sex", "F"), ("date_of_death", "2021-02-30")]),
            Err("malformed_date")
        );
        assert!(with(&[("sex", "F")]).is_ok());
        assert_eq!(
            check(&patients, t.columns(), &[("nhs_number", "123")]),
            Err("malformed_nhs_number")
        );
        assert_eq!(
            check(&patients, t.columns(), &[]),
            Err("missing_nhs_number")
        );
    }

    #[test]
    fn provider_rows_are_checked_as_provider_files_are() {
        let s = Source::Apcs;
        let apcs = Plan::source(s, &linked_actions(s));
        let row = |admitted: &str, diagnosis: &str, days: &str, destination: &str| {
            check(
                &apcs,
                s.columns(),
                &[
                    ("nhs_number", NHS),
                    ("admission_date", admitted),
                    ("primary_diagnosis", diagnosis),
                    ("days_in_critical_care", days),
                    ("discharge_destination", destination),
                ],
            )
        };
        let ok = row("2024-03-05", "I10X", "3", "19").expect("a valid row");
        assert!(ok.contains(&Value::Number(Some(3.0))));
        assert_eq!(row("2024-03-05", "I10.X", "3", "19"), Err("malformed_code"));
        assert_eq!(
            row("2024-03-05", "I10X", "2.5", "19"),
            Err("malformed_number")
        );
        assert_eq!(
            row("2024-03-05", "I10X", "-1", "19"),
            Err("malformed_number")
        );
        assert_eq!(row("", "I10X", "3", "19"), Err("missing_date"));
        assert_eq!(row("2024-03-05", "", "3", "19"), Err("missing_value"));
        let long = "x".repeat(65);
        assert_eq!(
            row("2024-03-05", "I10X", "3", &long),
            Err("malformed_value")
        );
        assert_eq!(
            check(&apcs, s.columns(), &[("nhs_number", "123")]),
            Err("invalid_nhs_number")
        );
        assert_eq!(check(&apcs, s.columns(), &[]), Err("missing_nhs_number"));
    }

    #[test]
    fn clinical_codes_are_icd10_or_opcs4_without_dots() {
        for ok in [
            "E119", "I10X", "W371", "J46X", "C61X", "X599", "F03X", "O800",
        ] {
            assert!(is_clinical_code(ok), "{ok}");
        }
        for bad in ["E11.9", "e119", "E1", "", "9434765919", "E119 ", "ABCD"] {
            assert!(!is_clinical_code(bad), "{bad}");
        }
    }
}
