//! What can go wrong reading or writing the store, and the exit status
//! each maps to at the binary's edge.

use std::path::{Path, PathBuf};

use super::log::AuditError;
use super::vectors::VectorError;
use crate::error::{Classify, ExitStatus};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{} is not a gpdp store (no manifest.json); run `gpdp collect` into it first", .0.display())]
    NotAStore(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "this store was collected with key id {store}, but the key given has id {given}: pseudonyms would not match"
    )]
    KeyMismatch { store: String, given: String },
    #[error("parquet file {}: {source}", path.display())]
    Parquet {
        path: PathBuf,
        #[source]
        source: ::parquet::errors::ParquetError,
    },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("deletion vector {0}")]
    Vector(#[from] VectorError),
}

impl Classify for StoreError {
    fn exit_status(&self) -> ExitStatus {
        match self {
            StoreError::NotAStore(_) | StoreError::KeyMismatch { .. } => ExitStatus::BadInput,
            // Fail closed: the file it masks is refused, never read unmasked.
            StoreError::Vector(_) => ExitStatus::Refused,
            StoreError::Io { source, .. } => crate::error::io_status(source),
            _ => ExitStatus::Internal,
        }
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn pq_err(
    path: &Path,
) -> impl FnOnce(::parquet::errors::ParquetError) -> StoreError + '_ {
    move |source| StoreError::Parquet {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Error, ErrorKind};

    use super::*;

    fn io(kind: ErrorKind) -> StoreError {
        StoreError::Io {
            path: "store/manifest.json".into(),
            source: Error::from(kind),
        }
    }

    /// Each store error's exit status, as the binary's edge reports it: the
    /// operator's mistakes are bad input (2), a vector that does not verify
    /// refuses its file (3, fail closed), and what is nobody's input is
    /// internal (1).
    #[test]
    fn each_store_error_exits_with_its_status() {
        let cases = [
            (StoreError::NotAStore("stroe".into()), ExitStatus::BadInput),
            (
                StoreError::KeyMismatch {
                    store: "a".into(),
                    given: "b".into(),
                },
                ExitStatus::BadInput,
            ),
            (
                StoreError::Vector(VectorError::Checksum {
                    path: "x.dv".into(),
                    expected: "0".into(),
                    found: "1".into(),
                }),
                ExitStatus::Refused,
            ),
            (io(ErrorKind::PermissionDenied), ExitStatus::BadInput),
            (io(ErrorKind::ReadOnlyFilesystem), ExitStatus::BadInput),
            (io(ErrorKind::NotFound), ExitStatus::Internal),
            (
                StoreError::Corrupt {
                    path: "m".into(),
                    message: "bad".into(),
                },
                ExitStatus::Internal,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(error.exit_status(), status, "{error}");
        }
    }
}
