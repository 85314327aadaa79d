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
