//! Generalisation of quasi-identifiers: dates to month or year, postcodes to
//! small areas.
//!
//! A full postcode covers about 15 households; an LSOA about 1,500 people. The
//! lookup from postcode to LSOA and IMD decile comes from the extract's
//! `reference/postcode_lsoa.csv` (in England, the ONS Postcode Directory).
//! A postcode the lookup does not know leaves as a missing area, never as
//! itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::calendar::{Day, days_from_civil};
use crate::error::{Classify, ExitStatus};
use crate::policy::Rule;

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot read the postcode lookup {}: {source} (the policy generalises postcodes to LSOA, which needs reference/postcode_lsoa.csv)", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Bad {
        path: PathBuf,
        line: u64,
        message: String,
    },
}

impl Classify for LookupError {
    fn exit_status(&self) -> ExitStatus {
        ExitStatus::BadInput
    }
}

/// Applies a date rule to a parsed date (the hot path: no calendar lookups).
pub fn generalise_ymd((year, month, day): (i32, u32, u32), rule: Option<Rule>) -> Day {
    match rule {
        None => days_from_civil(year, month, day),
        Some(Rule::Year) => days_from_civil(year, 1, 1),
        Some(Rule::Month | Rule::Lsoa) => days_from_civil(year, month, 1),
    }
}

/// Postcode → (LSOA code, IMD decile).
#[derive(Debug)]
pub struct PostcodeLookup {
    map: HashMap<Vec<u8>, (u32, u8)>,
    lsoas: Vec<String>,
}

/// Upper-case with single spaces removed, so `qb1 2xy` and `QB12XY` match `QB1 2XY`.
fn normalise(postcode: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend(
        postcode
            .iter()
            .filter(|b| !b.is_ascii_whitespace())
            .map(u8::to_ascii_uppercase),
    );
}

impl PostcodeLookup {
    pub fn load(path: &Path) -> Result<PostcodeLookup, LookupError> {
        let read = |source| LookupError::Read {
            path: path.to_owned(),
            source,
        };
        let mut reader = csv::Reader::from_path(path).map_err(read)?;
        let mut map = HashMap::new();
        let mut lsoas = Vec::new();
        let mut lsoa_index: HashMap<String, u32> = HashMap::new();
        let mut record = csv::ByteRecord::new();
        let mut key = Vec::new();
        while reader.read_byte_record(&mut record).map_err(read)? {
            let line = record.position().map_or(0, |p| p.line());
            let bad = |message: &str| LookupError::Bad {
                path: path.to_owned(),
                line,
                message: message.to_owned(),
            };
            let (Some(pc), Some(lsoa), Some(imd)) = (record.get(0), record.get(1), record.get(2))
            else {
                return Err(bad("expected postcode,lsoa_code,imd_decile"));
            };
            let imd: u8 = std::str::from_utf8(imd)
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|d| (1..=10).contains(d))
                .ok_or_else(|| bad("imd_decile must be 1 to 10"))?;
            let lsoa = String::from_utf8_lossy(lsoa).into_owned();
            let next = lsoas.len() as u32;
            let idx = *lsoa_index.entry(lsoa.clone()).or_insert_with(|| {
                lsoas.push(lsoa);
                next
            });
            normalise(pc, &mut key);
            map.insert(key.clone(), (idx, imd));
        }
        Ok(PostcodeLookup { map, lsoas })
    }

    /// The LSOA code and IMD decile of a postcode, if known.
    pub fn get(&self, postcode: &[u8], scratch: &mut Vec<u8>) -> Option<(&str, u8)> {
        normalise(postcode, scratch);
        self.map
            .get(scratch.as_slice())
            .map(|(l, imd)| (self.lsoas[*l as usize].as_str(), *imd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::date_of;
    use chrono::{Datelike, NaiveDate};

    /// Days since 1970-01-01 of a date, through chrono's calendar: the
    /// oracle, independent of `calendar::days_from_civil`.
    fn day(year: i32, month: u32, d: u32) -> Day {
        let date = NaiveDate::from_ymd_opt(year, month, d).unwrap();
        (date - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as Day
    }

    /// `generalise_ymd`, the function collection applies to every date
    /// column: without a rule a date is kept to the day; `month` takes it
    /// to the first of its month, `year` to the first of January (and
    /// `lsoa`, should a policy ever name it for a date, to the month: a date
    /// never leaves with its day by accident). Checked on every day from
    /// 1900 to 2030, leap days and month and year ends included.
    #[test]
    fn generalise_ymd_applies_each_rule_to_every_day() {
        let mut date = NaiveDate::from_ymd_opt(1900, 1, 1).unwrap();
        let end = NaiveDate::from_ymd_opt(2030, 12, 31).unwrap();
        let mut days = 0;
        while date <= end {
            let (y, m, d) = (date.year(), date.month(), date.day());
            let at = |rule| generalise_ymd((y, m, d), rule);
            assert_eq!(at(None), day(y, m, d), "{date} kept");
            assert_eq!(at(Some(Rule::Month)), day(y, m, 1), "{date} to its month");
            assert_eq!(at(Some(Rule::Lsoa)), day(y, m, 1), "{date} under lsoa");
            assert_eq!(at(Some(Rule::Year)), day(y, 1, 1), "{date} to its year");
            date = date.succ_opt().unwrap();
            days += 1;
        }
        assert_eq!(days, 47_847);
        // As a reader would check it.
        let dob = (1987, 8, 19);
        let text = |rule| date_of(generalise_ymd(dob, rule)).to_string();
        assert_eq!(text(None), "1987-08-19");
        assert_eq!(text(Some(Rule::Month)), "1987-08-01");
        assert_eq!(text(Some(Rule::Year)), "1987-01-01");
        assert_eq!(
            date_of(generalise_ymd((2024, 2, 29), Some(Rule::Month))).to_string(),
            "2024-02-01"
        );
    }

    #[test]
    fn postcodes_match_loosely_and_unknown_ones_map_to_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pc.csv");
        std::fs::write(
            &path,
            "postcode,lsoa_code,imd_decile\nQB1 2XY,E01900001,3\nQB1 2XZ,E01900001,3\n",
        )
        .unwrap();
        let lookup = PostcodeLookup::load(&path).unwrap();
        let mut s = Vec::new();
        assert_eq!(lookup.get(b"qb12xy", &mut s), Some(("E01900001", 3)));
        assert_eq!(lookup.get(b"QB1 9AA", &mut s), None);
        std::fs::write(
            &path,
            "postcode,lsoa_code,imd_decile\nQB1 2XY,E01900001,11\n",
        )
        .unwrap();
        assert!(
            PostcodeLookup::load(&path)
                .unwrap_err()
                .to_string()
                .contains(":2: imd_decile")
        );
    }
}
