//! What collecting can end in besides success, and the exit status each
//! gives. In a file of its own so that a practice's work
//! ([`super::practice`]) returns them without importing the commit step
//! ([`super`]) that calls it.

use std::path::{Path, PathBuf};

use crate::deid::generalise::LookupError;
use crate::deid::key::KeyError;
use crate::error::{Classify, ExitStatus};
use crate::extract::ExtractError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Extract(#[from] ExtractError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Store(Box<StoreError>),
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
}

impl From<StoreError> for CollectError {
    fn from(e: StoreError) -> Self {
        CollectError::Store(Box::new(e))
    }
}

impl CollectError {
    pub(super) fn io(path: &Path, source: std::io::Error) -> CollectError {
        CollectError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(super) fn parquet(path: &Path, e: parquet::errors::ParquetError) -> CollectError {
        CollectError::Write {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }

    pub(super) fn arrow(path: &Path, e: arrow::error::ArrowError) -> CollectError {
        CollectError::Write {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}

impl Classify for CollectError {
    fn exit_status(&self) -> ExitStatus {
        match self {
            CollectError::Key(e) => e.exit_status(),
            CollectError::Extract(e) => e.exit_status(),
            CollectError::Lookup(e) => e.exit_status(),
            CollectError::Store(e) => e.exit_status(),
            CollectError::Io { .. } | CollectError::Write { .. } => ExitStatus::Internal,
        }
    }
}
