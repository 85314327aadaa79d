//! Opt-out lists as they arrive: NHS numbers one per line (the National
//! Data Opt-out list for `gpdp optout ingest`, Type 1 requests for `gpdp
//! optout apply`), read and checked before anything changes, and the error
//! both commands report.

use std::path::{Path, PathBuf};

use crate::deid::key::KeyError;
use crate::error::{Classify, ExitStatus};
use crate::nhs_number::NhsNumber;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum OptoutError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read {}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    #[error("{}: {count} invalid lines, nothing was changed (first: {first}); fix the list or pass --skip-invalid", path.display())]
    InvalidNumbers {
        path: PathBuf,
        count: usize,
        first: String,
    },
    #[error("{}: the header must be `{expected}`", path.display())]
    Header { path: PathBuf, expected: String },
    #[error(
        "refused by rule {}: {}: {}; nothing was changed (the list in force stays). The NDOO service sends the whole list each time: check the download, or pass --accept-shrink if the list is right",
        .held.rule, path.display(), .held.detail
    )]
    Held {
        path: PathBuf,
        held: crate::store::guard::Held,
    },
}

impl Classify for OptoutError {
    fn exit_status(&self) -> ExitStatus {
        match self {
            OptoutError::Key(e) => e.exit_status(),
            OptoutError::Store(e) => e.exit_status(),
            OptoutError::Held { .. } => ExitStatus::Refused,
            _ => ExitStatus::BadInput,
        }
    }
}

/// Reads an NDOO list (`nhs_number` per line): the valid numbers and the
/// invalid ones as `(line, reason)`.
pub fn read_list(path: &Path) -> Result<(Vec<NhsNumber>, Invalid), OptoutError> {
    let (valid, invalid) = read_numbers(path, None)?;
    Ok((valid.into_iter().map(|(_, n, _)| n).collect(), invalid))
}

/// The invalid lines of a list: (line, reason).
pub type Invalid = Vec<(u64, &'static str)>;

/// A list of NHS numbers, one per line under the header `nhs_number`, with
/// an optional second column `extra`: the valid rows as (line, number,
/// extra value) and the invalid ones as (line, reason).
#[allow(clippy::type_complexity)]
pub fn read_numbers(
    path: &Path,
    extra: Option<&str>,
) -> Result<
    (
        Vec<(u64, NhsNumber, Option<String>)>,
        Vec<(u64, &'static str)>,
    ),
    OptoutError,
> {
    let read = |e: csv::Error| OptoutError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(read)?;
    let header = reader.byte_headers().map_err(read)?.clone();
    let columns = match (header.get(0), header.get(1), extra) {
        (Some(b"nhs_number"), None, _) if header.len() == 1 => 1,
        (Some(b"nhs_number"), Some(e), Some(x)) if header.len() == 2 && e == x.as_bytes() => 2,
        _ => {
            return Err(OptoutError::Header {
                path: path.to_owned(),
                expected: match extra {
                    Some(x) => format!("nhs_number or nhs_number,{x}"),
                    None => "nhs_number".into(),
                },
            });
        }
    };
    let (mut valid, mut invalid) = (Vec::new(), Vec::new());
    let mut record = csv::ByteRecord::new();
    while reader.read_byte_record(&mut record).map_err(read)? {
        let line = record.position().map_or(0, |p| p.line());
        if record.len() != columns {
            invalid.push((line, "wrong_column_count"));
            continue;
        }
        let value = record
            .get(1)
            .map(|v| String::from_utf8_lossy(v).trim().to_owned());
        match NhsNumber::parse(record.get(0).unwrap_or_default()) {
            Ok(n) => valid.push((line, n, value)),
            Err(e) => invalid.push((line, e.reason())),
        }
    }
    Ok((valid, invalid))
}

/// Refuses a list with invalid lines, naming the first few (nothing changes).
pub(crate) fn refuse_invalid(list: &Path, invalid: &[(u64, &str)]) -> Result<(), OptoutError> {
    if invalid.is_empty() {
        return Ok(());
    }
    let first = invalid
        .iter()
        .take(5)
        .map(|(l, r)| format!("line {l}: {r}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(OptoutError::InvalidNumbers {
        path: list.to_owned(),
        count: invalid.len(),
        first,
    })
}
