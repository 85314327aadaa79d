//! Exit statuses shared by every command (docs/design.md §5).
//!
//! 0 success; 1 internal error; 2 bad usage or bad input (clear message,
//! nothing changed); 3 refused by policy (the reason names the rule).
//! Each layer has its own error enum; each knows which status it maps to,
//! and the binary walks the error chain once to find it.

use std::path::PathBuf;

/// The process exit status of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Success = 0,
    Internal = 1,
    BadInput = 2,
    Refused = 3,
}

/// Implemented by every layer's error type.
pub trait Classify {
    fn exit_status(&self) -> ExitStatus;
}

/// Bad usage or bad input that no layer-specific error describes better.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

impl Classify for BadInput {
    fn exit_status(&self) -> ExitStatus {
        ExitStatus::BadInput
    }
}

/// An I/O failure on a path the user did not choose badly (internal, exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct IoError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    pub fn new(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> IoError {
        IoError {
            action,
            path: path.into(),
            source,
        }
    }
}

impl Classify for IoError {
    fn exit_status(&self) -> ExitStatus {
        io_status(&self.source)
    }
}

/// The status of an I/O failure: a path the user named that may not be
/// read or written (permissions) is bad input, as a missing one is;
/// anything else (a full disk, a failing device) is internal.
pub fn io_status(e: &std::io::Error) -> ExitStatus {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            ExitStatus::BadInput
        }
        _ => ExitStatus::Internal,
    }
}
