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
