//! Reading GP extracts: the tables a practice system exports, their columns,
//! and a streaming CSV reader that hands each row to collection with its
//! line number.
//!
//! The reader does not judge rows (that is collection's job, which
//! quarantines what it cannot de-identify); it only knows where each defined
//! column is in the file, and which columns the file has that the extract
//! format does not define (those are dropped and reported, never passed on).

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Classify, ExitStatus};

/// The tables of a GP extract, in the order collection reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Patients,
    ClinicalEvents,
    Medications,
}

/// What a column holds; decides which policy actions are allowed on it and
/// how collection validates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The NHS number: validated (Modulus 11), then pseudonymised.
    NhsNumber,
    /// A direct identifier (a name): may only be dropped.
    Name,
    /// Date of birth: a strong quasi-identifier; generalised or dropped, never kept exact.
    BirthDate,
    Date,
    Sex,
    /// A full postcode: dropped or generalised to LSOA.
    Postcode,
    /// A category such as ethnicity.
    Category,
    /// A SNOMED CT or dm+d code.
    Code,
    Number,
    /// Free text: may name anyone; may only be dropped.
    FreeText,
    /// A data provider's own record identifier (a hospital spell id): it
    /// leads back to the provider's identified record; may only be dropped.
    RecordId,
}

#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub kind: Kind,
    /// A row without a value here cannot be collected.
    pub required: bool,
}

const fn col(name: &'static str, kind: Kind, required: bool) -> Column {
    Column {
        name,
        kind,
        required,
    }
}

const PATIENTS: [Column; 10] = [
    col("nhs_number", Kind::NhsNumber, true),
    col("given_name", Kind::Name, false),
    col("family_name", Kind::Name, false),
    col("date_of_birth", Kind::BirthDate, true),
    col("sex", Kind::Sex, true),
    col("postcode", Kind::Postcode, false),
    col("ethnicity", Kind::Category, false),
    col("registration_start", Kind::Date, true),
    col("registration_end", Kind::Date, false),
    col("date_of_death", Kind::Date, false),
];
const CLINICAL_EVENTS: [Column; 5] = [
    col("nhs_number", Kind::NhsNumber, true),
    col("date", Kind::Date, true),
    col("snomedct_code", Kind::Code, true),
    col("numeric_value", Kind::Number, false),
    col("free_text", Kind::FreeText, false),
];
const MEDICATIONS: [Column; 5] = [
    col("nhs_number", Kind::NhsNumber, true),
    col("date", Kind::Date, true),
    col("dmd_code", Kind::Code, true),
    col("quantity", Kind::Number, false),
    col("free_text", Kind::FreeText, false),
];

/// The provider extracts of Data for R&D (docs/design.md §9), at
/// `EXTRACT/linked/<name>.csv`, each read by `gpdp link` at its provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Hospital spells (HES APC / SUS APCS), ehrQL's `apcs` columns.
    Apcs,
    /// ONS death registrations, ehrQL's `ons_deaths` columns.
    OnsDeaths,
}

const APCS: [Column; 10] = [
    col("nhs_number", Kind::NhsNumber, true),
    col("apcs_ident", Kind::RecordId, false),
    col("admission_date", Kind::Date, true),
    col("discharge_date", Kind::Date, false),
    col("admission_method", Kind::Category, false),
    col("primary_diagnosis", Kind::Code, true),
    col("all_diagnoses", Kind::Code, false),
    col("all_procedures", Kind::Code, false),
    col("days_in_critical_care", Kind::Number, false),
    col("discharge_destination", Kind::Category, false),
];
const ONS_DEATHS: [Column; 19] = [
    col("nhs_number", Kind::NhsNumber, true),
    col("date", Kind::Date, true),
    col("underlying_cause_of_death", Kind::Code, true),
    col("cause_of_death_01", Kind::Code, false),
    col("cause_of_death_02", Kind::Code, false),
    col("cause_of_death_03", Kind::Code, false),
    col("cause_of_death_04", Kind::Code, false),
    col("cause_of_death_05", Kind::Code, false),
    col("cause_of_death_06", Kind::Code, false),
    col("cause_of_death_07", Kind::Code, false),
    col("cause_of_death_08", Kind::Code, false),
    col("cause_of_death_09", Kind::Code, false),
    col("cause_of_death_10", Kind::Code, false),
    col("cause_of_death_11", Kind::Code, false),
    col("cause_of_death_12", Kind::Code, false),
    col("cause_of_death_13", Kind::Code, false),
    col("cause_of_death_14", Kind::Code, false),
    col("cause_of_death_15", Kind::Code, false),
    col("place", Kind::Category, false),
];

impl Source {
    pub const ALL: [Source; 2] = [Source::Apcs, Source::OnsDeaths];

    /// The table (and TRE view) name, and the file's stem.
    pub fn name(self) -> &'static str {
        match self {
            Source::Apcs => "apcs",
            Source::OnsDeaths => "ons_deaths",
        }
    }

    pub fn columns(self) -> &'static [Column] {
        match self {
            Source::Apcs => &APCS,
            Source::OnsDeaths => &ONS_DEATHS,
        }
    }

    pub fn from_name(name: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Patients, Table::ClinicalEvents, Table::Medications];

    pub fn name(self) -> &'static str {
        match self {
            Table::Patients => "patients",
            Table::ClinicalEvents => "clinical_events",
            Table::Medications => "medications",
        }
    }

    pub fn file_name(self) -> &'static str {
        match self {
            Table::Patients => "patients.csv",
            Table::ClinicalEvents => "clinical_events.csv",
            Table::Medications => "medications.csv",
        }
    }

    pub fn columns(self) -> &'static [Column] {
        match self {
            Table::Patients => &PATIENTS,
            Table::ClinicalEvents => &CLINICAL_EVENTS,
            Table::Medications => &MEDICATIONS,
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("no extract found at {}: expected practices/<ODS>/ folders (made by `gpdp synth` or a practice system)", .0.display())]
    NoPractices(PathBuf),
    #[error("practice {practice} named on the command line has no folder in {}", extract.display())]
    UnknownPractice { practice: String, extract: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the header has no column {column:?} (the {table} table needs: {expected})", path.display())]
    MissingColumn {
        path: PathBuf,
        table: &'static str,
        column: &'static str,
        expected: String,
    },
    #[error("{}: {message}", path.display())]
    Csv { path: PathBuf, message: String },
}

impl Classify for ExtractError {
    fn exit_status(&self) -> ExitStatus {
        ExitStatus::BadInput
    }
}

/// One practice's extract folder.
#[derive(Debug, Clone)]
pub struct PracticeExtract {
    pub code: String,
    pub dir: PathBuf,
}

impl PracticeExtract {
    pub fn path(&self, table: Table) -> PathBuf {
        self.dir.join(table.file_name())
    }
}

/// Lists the practices of an extract (`DIR/practices/<ODS>/`), sorted by code,
/// optionally only those named.
pub fn practices(extract: &Path, only: &[String]) -> Result<Vec<PracticeExtract>, ExtractError> {
    let root = extract.join("practices");
    let entries =
        std::fs::read_dir(&root).map_err(|_| ExtractError::NoPractices(extract.to_owned()))?;
    let mut found: Vec<PracticeExtract> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| PracticeExtract {
            code: e.file_name().to_string_lossy().into_owned(),
            dir: e.path(),
        })
        .collect();
    found.sort_by(|a, b| a.code.cmp(&b.code));
    if found.is_empty() {
        return Err(ExtractError::NoPractices(extract.to_owned()));
    }
    if !only.is_empty() {
        if let Some(missing) = only.iter().find(|o| !found.iter().any(|p| &p.code == *o)) {
            return Err(ExtractError::UnknownPractice {
                practice: missing.clone(),
                extract: extract.to_owned(),
            });
        }
        found.retain(|p| only.contains(&p.code));
    }
    Ok(found)
}

/// A streaming reader over one extract table.
pub struct TableReader {
    path: PathBuf,
    reader: csv::Reader<File>,
    /// For each column the format defines, its index in the file.
    index: Vec<usize>,
    /// Header columns the format does not define (dropped, reported).
    pub unknown_columns: Vec<String>,
    /// Number of fields a well-formed row has.
    pub arity: usize,
}

impl TableReader {
    pub fn open(path: &Path, table: Table) -> Result<TableReader, ExtractError> {
        let file = File::open(path).map_err(|source| ExtractError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .has_headers(true)
            .buffer_capacity(256 * 1024)
            .from_reader(file);
        let header: Vec<String> = reader
            .byte_headers()
            .map_err(|e| ExtractError::Csv {
                path: path.to_owned(),
                message: e.to_string(),
            })?
            .iter()
            .map(|h| String::from_utf8_lossy(h).trim().to_owned())
            .collect();
        let expected = || {
            table
                .columns()
                .iter()
                .map(|c| c.name)
                .collect::<Vec<_>>()
                .join(",")
        };
        let index = table
            .columns()
            .iter()
            .map(|c| {
                header
                    .iter()
                    .position(|h| h == c.name)
                    .ok_or_else(|| ExtractError::MissingColumn {
                        path: path.to_owned(),
                        table: table.name(),
                        column: c.name,
                        expected: expected(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let unknown_columns = header
            .iter()
            .filter(|h| !table.columns().iter().any(|c| c.name == h.as_str()))
            .cloned()
            .collect();
        Ok(TableReader {
            path: path.to_owned(),
            reader,
            index,
            unknown_columns,
            arity: header.len(),
        })
    }

    /// Reads the next row into `record`; `false` at the end of the file.
    pub fn read(&mut self, record: &mut csv::ByteRecord) -> Result<bool, ExtractError> {
        self.reader
            .read_byte_record(record)
            .map_err(|e| ExtractError::Csv {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// Where defined column `i` (in `Table::columns()` order) is in the file.
    pub fn column_index(&self, i: usize) -> usize {
        self.index[i]
    }

    /// The value of defined column `i` (in `Table::columns()` order).
    pub fn field<'r>(&self, record: &'r csv::ByteRecord, i: usize) -> &'r [u8] {
        record.get(self.index[i]).unwrap_or(b"")
    }
}

/// The 1-based line a record starts on (the header is line 1).
pub fn line_of(record: &csv::ByteRecord) -> u64 {
    record.position().map_or(0, |p| p.line())
}
