//! The plan: what a policy's column actions make of one input — a table of
//! a GP extract or a provider file — as stored columns, and how each stored
//! column is filled from the input's columns.
//!
//! `collect` and `link` both build their Parquet from a [`Plan`], so one
//! kind of column is stored one way whoever collects it: dates as `Date32`
//! (generalised to the month or year when the policy says so), numbers as
//! `Float64`, text as `Utf8`, a postcode as its LSOA code and IMD decile.
//! Every stored table starts with `patient_id` (the pseudonym) and
//! `patient_key` (its first 8 bytes as an integer); the GP patients table
//! also names its practice (`practice_id`, a pseudonym), since the practice
//! is a property of the registration. A dropped column is not stored at all
//! and the NHS number only as the pseudonym.
//!
//! What differs between a practice's export and a provider's file is how
//! strictly values are checked ([`Origin`]), and the plan records that per
//! column, so the row checks ([`super::row`]) never ask where a row came
//! from.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::extract::{Column, Kind, Source, Table};
use crate::policy::{Action, Rule};

/// Who exports the rows: decides the checks on codes, numbers and text
/// and the quarantine reasons, as each kind of sender was first specified
/// (docs/design.md §3 and §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A GP practice system's export: SNOMED CT or dm+d codes (digits),
    /// sex as `M`, `F`, `I` or `U`, numbers any finite decimal; fields
    /// taken as written.
    Practice,
    /// A data provider's file: ICD-10 or OPCS-4 codes without dots, several
    /// `;`-separated; numbers are counts (whole and not negative); other
    /// text at most 64 bytes; the reader trims blanks around each field
    /// first.
    Provider,
}

/// How a text value is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextCheck {
    /// Any UTF-8.
    Any,
    /// `M`, `F`, `I` or `U` (`invalid_value`).
    Sex,
    /// A SNOMED CT or dm+d id: digits only (`invalid_code`).
    Digits,
    /// ICD-10 or OPCS-4 codes, `;`-separated (`malformed_code`).
    ClinicalCodes,
    /// At most 64 bytes (`malformed_value`).
    Short,
}

/// How a number is checked (it is stored as `Float64` either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberCheck {
    /// Any finite decimal (`invalid_number`).
    Finite,
    /// A whole number, not negative (`malformed_number`).
    Count,
}

/// One stored column (two for [`Fill::Area`]) and the input column it is
/// filled from, by its index in the format's columns.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    Date {
        col: usize,
        rule: Option<Rule>,
        required: bool,
        /// The quarantine reason when a required date is empty.
        missing: &'static str,
    },
    Text {
        col: usize,
        required: bool,
        check: TextCheck,
    },
    Number {
        col: usize,
        required: bool,
        check: NumberCheck,
    },
    /// Postcode to (lsoa_code, imd_decile): two stored columns.
    Area { col: usize },
}

/// One input's plan: the stored schema, one [`Fill`] per stored column
/// after the identifiers, and what the policy dropped.
#[derive(Debug, Clone)]
pub struct Plan {
    pub schema: SchemaRef,
    pub fills: Vec<Fill>,
    pub origin: Origin,
    /// The input column holding the NHS number.
    pub nhs_col: usize,
    /// The input column holding the code (the last, if several): what a
    /// practice's collection checks against the exclusion lists.
    pub code_col: Option<usize>,
    /// Whether the stored rows carry `practice_id` (the GP patients table).
    pub practice: bool,
    /// Input columns the policy drops, by name.
    pub dropped: Vec<String>,
}

impl Plan {
    /// The plan of a GP extract table; `actions` in `Table::columns()` order.
    pub fn table(table: Table, actions: &[Action]) -> Plan {
        Plan::new(
            table.columns(),
            actions,
            Origin::Practice,
            table == Table::Patients,
        )
    }

    /// The plan of a provider file; `actions` in `Source::columns()` order.
    pub fn source(source: Source, actions: &[Action]) -> Plan {
        Plan::new(source.columns(), actions, Origin::Provider, false)
    }

    fn new(columns: &[Column], actions: &[Action], origin: Origin, practice: bool) -> Plan {
        let mut fields = vec![
            Field::new("patient_id", DataType::FixedSizeBinary(32), false),
            // The first 8 bytes of the pseudonym as a number: lets the TRE
            // count distinct patients per released cell with a fast integer
            // accumulator. Two patients sharing a key (odds ~1e-8 at 1M
            // patients) would be counted once: the error can only make
            // suppression stricter.
            Field::new("patient_key", DataType::Int64, false),
        ];
        if practice {
            fields.push(Field::new(
                "practice_id",
                DataType::FixedSizeBinary(32),
                false,
            ));
        }
        let mut fills = Vec::new();
        let mut dropped = Vec::new();
        let mut code_col = None;
        let mut nhs_col = 0;
        for (i, (c, action)) in columns.iter().zip(actions).enumerate() {
            if c.kind == Kind::Code {
                code_col = Some(i);
            }
            if c.kind == Kind::NhsNumber {
                nhs_col = i;
            }
            let rule = match *action {
                Action::Drop => {
                    dropped.push(c.name.to_owned());
                    continue;
                }
                Action::Generalise(rule) => Some(rule),
                Action::Keep | Action::Pseudonymise => None,
            };
            match c.kind {
                Kind::NhsNumber => {}
                Kind::Date | Kind::BirthDate => {
                    // A generalised date of birth is named for what is left of it.
                    let name = match (c.kind, rule) {
                        (Kind::BirthDate, Some(Rule::Year)) => "birth_year",
                        (Kind::BirthDate, Some(_)) => "birth_month",
                        _ => c.name,
                    };
                    fields.push(Field::new(name, DataType::Date32, !c.required));
                    fills.push(Fill::Date {
                        col: i,
                        rule,
                        required: c.required,
                        missing: match (origin, c.kind) {
                            (Origin::Provider, Kind::Date) => "missing_date",
                            _ => "missing_value",
                        },
                    });
                }
                Kind::Postcode => {
                    fields.push(Field::new("lsoa_code", DataType::Utf8, true));
                    fields.push(Field::new("imd_decile", DataType::UInt8, true));
                    fills.push(Fill::Area { col: i });
                }
                Kind::Number => {
                    fields.push(Field::new(c.name, DataType::Float64, !c.required));
                    fills.push(Fill::Number {
                        col: i,
                        required: c.required,
                        check: match origin {
                            Origin::Practice => NumberCheck::Finite,
                            Origin::Provider => NumberCheck::Count,
                        },
                    });
                }
                Kind::Sex
                | Kind::Category
                | Kind::Code
                | Kind::Name
                | Kind::FreeText
                | Kind::RecordId => {
                    fields.push(Field::new(c.name, DataType::Utf8, !c.required));
                    fills.push(Fill::Text {
                        col: i,
                        required: c.required,
                        check: match (origin, c.kind) {
                            (Origin::Practice, Kind::Sex) => TextCheck::Sex,
                            (Origin::Practice, Kind::Code) => TextCheck::Digits,
                            (Origin::Practice, _) => TextCheck::Any,
                            (Origin::Provider, Kind::Code) => TextCheck::ClinicalCodes,
                            (Origin::Provider, _) => TextCheck::Short,
                        },
                    });
                }
            }
        }
        Plan {
            schema: Arc::new(Schema::new(fields)),
            fills,
            origin,
            nhs_col,
            code_col,
            practice,
            dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::CollectionPolicy;

    fn names_and_types(plan: &Plan) -> Vec<(String, DataType)> {
        plan.schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect()
    }

    /// The stored schemas under the built-in policy: what the TRE's views
    /// and every reader of the store rely on.
    #[test]
    fn the_builtin_policy_stores_these_columns() {
        use DataType::{Date32, FixedSizeBinary, Float64, Int64, UInt8, Utf8};
        let policy = CollectionPolicy::load(None).unwrap();
        let table = |t| names_and_types(&Plan::table(t, policy.actions(t)));
        let source = |s| names_and_types(&Plan::source(s, policy.linked_actions(s).unwrap()));
        let expect = |cols: &[(&str, DataType)]| -> Vec<(String, DataType)> {
            [("patient_id", FixedSizeBinary(32)), ("patient_key", Int64)]
                .iter()
                .chain(cols)
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect()
        };
        assert_eq!(
            table(Table::Patients),
            expect(&[
                ("practice_id", FixedSizeBinary(32)),
                ("birth_month", Date32),
                ("sex", Utf8),
                ("lsoa_code", Utf8),
                ("imd_decile", UInt8),
                ("ethnicity", Utf8),
                ("registration_start", Date32),
                ("registration_end", Date32),
                ("date_of_death", Date32),
            ])
        );
        assert_eq!(
            table(Table::ClinicalEvents),
            expect(&[
                ("date", Date32),
                ("snomedct_code", Utf8),
                ("numeric_value", Float64)
            ])
        );
        assert_eq!(
            table(Table::Medications),
            expect(&[("date", Date32), ("dmd_code", Utf8), ("quantity", Float64)])
        );
        // One numeric type for one kind of value, whoever sends it.
        assert_eq!(
            source(Source::Apcs),
            expect(&[
                ("admission_date", Date32),
                ("discharge_date", Date32),
                ("admission_method", Utf8),
                ("primary_diagnosis", Utf8),
                ("all_diagnoses", Utf8),
                ("all_procedures", Utf8),
                ("days_in_critical_care", Float64),
                ("discharge_destination", Utf8),
            ])
        );
        assert_eq!(source(Source::OnsDeaths)[2], ("date".to_owned(), Date32));
        assert_eq!(source(Source::OnsDeaths).len(), 2 + 18);
    }
}
