//! Dates as Arrow `Date32` values (days since 1970-01-01): strict parsing of
//! extract dates, and a lookup table
//! that formats them as `YYYY-MM-DD` without allocating: the generator
//! writes tens of millions of dates, so formatting is a table read.

use chrono::{Datelike, NaiveDate};

/// Days since 1970-01-01, the representation of Arrow's `Date32`.
pub type Day = i32;

const EPOCH: NaiveDate = match NaiveDate::from_ymd_opt(1970, 1, 1) {
    Some(d) => d,
    None => unreachable!(),
};

pub fn day_of(date: NaiveDate) -> Day {
    (date - EPOCH).num_days() as Day
}

pub fn date_of(day: Day) -> NaiveDate {
    EPOCH + chrono::TimeDelta::days(i64::from(day))
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`): exact, branch-light, no allocation — it runs for every
/// date of every extract row.
pub fn days_from_civil(year: i32, month: u32, day: u32) -> Day {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = month as i32;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i32 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day (Howard Hinnant's `civil_from_days`,
/// the inverse of [`days_from_civil`]): integer arithmetic only, for the
/// TRE views, which derive years and ages for every row they read.
pub fn civil_from_days(day: Day) -> (i32, u32, u32) {
    let z = day + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i32::from(m <= 2), m, d)
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Parses a strict `YYYY-MM-DD` date into (year, month, day); anything else,
/// including impossible dates such as `2021-02-30`, is `None`.
pub fn parse_ymd(bytes: &[u8]) -> Option<(i32, u32, u32)> {
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let mut n = [0u32; 8];
    for (slot, &b) in n
        .iter_mut()
        .zip(bytes[..4].iter().chain(&bytes[5..7]).chain(&bytes[8..10]))
    {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        *slot = u32::from(d);
    }
    let year = (n[0] * 1000 + n[1] * 100 + n[2] * 10 + n[3]) as i32;
    let (month, day) = (n[4] * 10 + n[5], n[6] * 10 + n[7]);
    ((1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month))
        .then_some((year, month, day))
}

/// Parses a strict `YYYY-MM-DD` date (what GP extracts use).
pub fn parse_date(bytes: &[u8]) -> Option<Day> {
    parse_ymd(bytes).map(|(y, m, d)| days_from_civil(y, m, d))
}

/// The first day of the month that `day` falls in.
pub fn month_start(day: Day) -> Day {
    let d = date_of(day);
    day - (d.day() as Day - 1)
}

/// The first day of the year that `day` falls in.
pub fn year_start_of(day: Day) -> Day {
    let d = date_of(day);
    day - (d.ordinal() as Day - 1)
}

/// The first day of `year`.
pub fn year_start(year: i32) -> Option<Day> {
    NaiveDate::from_ymd_opt(year, 1, 1).map(day_of)
}

/// Whole years from `born` to `on` (a birthday on `on` counts).
pub fn age_on(born: Day, on: Day) -> i32 {
    let (b, o) = (date_of(born), date_of(on));
    let mut age = o.year() - b.year();
    if (o.month(), o.day()) < (b.month(), b.day()) {
        age -= 1;
    }
    age
}

/// Preformatted `YYYY-MM-DD` strings for every day in a range.
pub struct DateTable {
    first: Day,
    text: Vec<[u8; 10]>,
}

impl DateTable {
    pub fn new(first: Day, last: Day) -> DateTable {
        let text = (first..=last)
            .map(|d| {
                let s = date_of(d).format("%Y-%m-%d").to_string();
                let mut out = [b'0'; 10];
                out.copy_from_slice(&s.as_bytes()[..10]);
                out
            })
            .collect();
        DateTable { first, text }
    }

    /// The text of `day`; days outside the table are clamped to its ends
    /// (the generator never asks for one, and a wrong date beats a panic).
    pub fn get(&self, day: Day) -> &[u8; 10] {
        let i = (day - self.first).clamp(0, self.text.len() as Day - 1);
        &self.text[i as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_formats() {
        let d = NaiveDate::from_ymd_opt(2021, 6, 23).unwrap();
        let day = day_of(d);
        assert_eq!(date_of(day), d);
        let table = DateTable::new(day - 10, day + 10);
        assert_eq!(table.get(day), b"2021-06-23");
        assert_eq!(day_of(EPOCH), 0);
    }

    #[test]
    fn parses_strictly_and_truncates() {
        let day = parse_date(b"2021-06-23").unwrap();
        assert_eq!(date_of(day), NaiveDate::from_ymd_opt(2021, 6, 23).unwrap());
        for bad in [
            &b"2021-13-45"[..],
            b"31/12/2020",
            b"20200101",
            b"not recorded",
            b"2021-02-30",
            b"",
            b"2021-6-23 ",
        ] {
            assert_eq!(parse_date(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            date_of(month_start(day)),
            NaiveDate::from_ymd_opt(2021, 6, 1).unwrap()
        );
        assert_eq!(
            date_of(year_start_of(day)),
            NaiveDate::from_ymd_opt(2021, 1, 1).unwrap()
        );
    }

    #[test]
    fn civil_from_days_inverts_days_from_civil() {
        for day in (-800_000..800_000).step_by(37) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
            let date = date_of(day);
            assert_eq!((y, m, d), (date.year(), date.month(), date.day()));
        }
    }

    #[test]
    fn ages_count_whole_years() {
        let born = day_of(NaiveDate::from_ymd_opt(2000, 3, 1).unwrap());
        assert_eq!(
            age_on(born, day_of(NaiveDate::from_ymd_opt(2020, 2, 29).unwrap())),
            19
        );
        assert_eq!(
            age_on(born, day_of(NaiveDate::from_ymd_opt(2020, 3, 1).unwrap())),
            20
        );
    }
}
