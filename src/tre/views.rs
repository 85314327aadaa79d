//! The two derived columns of the TRE views, `event_year` and `age_band`,
//! as scalar functions (`gpdp_year`, `gpdp_age_band`) computed with integer
//! calendar arithmetic ([`crate::calendar::civil_from_days`]).
//!
//! They run for every row a view reads — tens of millions of events per
//! query — where `date_part` (a calendar conversion per value) and an
//! eight-way `CASE` were most of the view's own cost. They live in the
//! views' plans, built in the TRE's internal context; a researcher's
//! session cannot call them by name (its registry holds no such function).

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Int64Array, StringArray};
use arrow::datatypes::{DataType, Date32Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::calendar::{Day, civil_from_days};

/// The age bands of the `patients` view, as `(first age of the next band, label)`.
pub const AGE_BANDS: [(i32, &str); 8] = [
    (16, "0-15"),
    (30, "16-29"),
    (40, "30-39"),
    (50, "40-49"),
    (60, "50-59"),
    (70, "60-69"),
    (80, "70-79"),
    (i32::MAX, "80+"),
];

/// `gpdp_year(date)`: the calendar year of a `Date32`, as Int64.
pub fn year() -> ScalarUDF {
    ScalarUDF::new_from_impl(Year {
        signature: Signature::exact(vec![DataType::Date32], Volatility::Immutable),
    })
}

/// `gpdp_age_band(birth_month)`: the age band on `age_on`, counting whole
/// years between months (a birth month is the first of its month).
pub fn age_band(age_on: Day) -> ScalarUDF {
    ScalarUDF::new_from_impl(AgeBand {
        on_months: months(age_on),
        signature: Signature::exact(vec![DataType::Date32], Volatility::Immutable),
    })
}

/// Year and month (`year * 12 + month`) of every day from 1800 to 2199,
/// looked up rather than computed: a table read per row instead of five
/// integer divisions (about 10 ns a row, which was most of a view's cost).
/// Days outside it are computed.
struct Months {
    first: Day,
    months: Vec<i32>,
}

fn table() -> &'static Months {
    static TABLE: std::sync::OnceLock<Months> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let first = crate::calendar::days_from_civil(1800, 1, 1);
        let last = crate::calendar::days_from_civil(2199, 12, 31);
        let months = (first..=last).map(civil_months).collect();
        Months { first, months }
    })
}

/// `year * 12 + month` of a day, computed.
fn civil_months(day: Day) -> i32 {
    let (y, m, _) = civil_from_days(day);
    y * 12 + m as i32
}

/// `year * 12 + month` of a day, looked up where the table has it.
fn months(day: Day) -> i32 {
    let t = table();
    usize::try_from(day.wrapping_sub(t.first))
        .ok()
        .and_then(|i| t.months.get(i))
        .map_or_else(|| civil_months(day), |&m| m)
}

/// The calendar year of a day (`months` counts January as 1).
fn year_of(day: Day) -> i64 {
    i64::from((months(day) - 1).div_euclid(12))
}

/// Applies `f` to the one Date32 argument, array or scalar.
fn map_dates(args: ScalarFunctionArgs, f: impl Fn(&ArrayRef) -> ArrayRef) -> Result<ColumnarValue> {
    match &args.args[..] {
        [ColumnarValue::Array(a)] => Ok(ColumnarValue::Array(f(a))),
        [ColumnarValue::Scalar(s)] => {
            let out = f(&s.to_array_of_size(1)?);
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
        }
        _ => exec_err!("expects one date"),
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Year {
    signature: Signature,
}

impl ScalarUDFImpl for Year {
    fn name(&self) -> &str {
        "gpdp_year"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        map_dates(args, |a| {
            let dates = a.as_primitive::<Date32Type>();
            let years: Int64Array = dates.unary(year_of);
            Arc::new(years)
        })
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct AgeBand {
    on_months: i32,
    signature: Signature,
}

impl AgeBand {
    fn band(&self, birth_month: Day) -> &'static str {
        // Whole years, truncated toward zero (as the SQL the views used had it).
        let age = (self.on_months - months(birth_month)) / 12;
        AGE_BANDS
            .iter()
            .find(|(next, _)| age < *next)
            .map_or("80+", |(_, label)| label)
    }
}

impl ScalarUDFImpl for AgeBand {
    fn name(&self) -> &str {
        "gpdp_age_band"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        map_dates(args, |a| {
            let dates = a.as_primitive::<Date32Type>();
            let bands: StringArray = dates.iter().map(|d| d.map(|d| self.band(d))).collect();
            Arc::new(bands)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::days_from_civil;

    #[test]
    fn years_from_the_table_and_beyond_it() {
        for day in (-200_000..200_000).step_by(13) {
            assert_eq!(year_of(day), i64::from(civil_from_days(day).0), "{day}");
        }
        assert_eq!(year_of(days_from_civil(2024, 12, 31)), 2024);
        assert_eq!(year_of(days_from_civil(2025, 1, 1)), 2025);
        assert_eq!(year_of(days_from_civil(1500, 6, 1)), 1500);
        assert_eq!(year_of(days_from_civil(-3, 1, 1)), -3);
    }

    #[test]
    fn age_bands_count_whole_years_between_months() {
        let band = AgeBand {
            on_months: 2026 * 12 + 3,
            signature: Signature::exact(vec![DataType::Date32], Volatility::Immutable),
        };
        let born = |y, m| days_from_civil(y, m, 1);
        assert_eq!(band.band(born(2010, 3)), "16-29"); // 16 this month
        assert_eq!(band.band(born(2010, 4)), "0-15");
        assert_eq!(band.band(born(1946, 3)), "80+");
        assert_eq!(band.band(born(1946, 4)), "70-79");
        assert_eq!(band.band(born(1990, 1)), "30-39");
        assert_eq!(band.band(born(2027, 1)), "0-15"); // not yet born: as before, the youngest band
    }
}
