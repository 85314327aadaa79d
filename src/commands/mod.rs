//! The binary's commands: one handler per command, each in its own file
//! with the printing of its result beside it. A handler takes its parsed
//! arguments (and the progress bars, if it draws any) and returns the
//! error that decides the exit status; [`exit`] walks that error once, at
//! the binary's edge.
//!
//! Every `print!`/`println!` in these modules goes through
//! [`write_stdout`], so that output into a closed pipe is dropped rather
//! than a panic.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether whoever reads our standard output has gone (`gpdp … | head`).
/// From then on output is dropped, and the command ends with the status
/// of its work, as ripgrep does: a collection that committed its batches
/// has succeeded even if nobody read the summary.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes to standard output; a closed pipe is noted, never a panic (the
/// standard `print!` panics on it).
pub fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = std::io::stdout().lock().write_fmt(args)
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

// Shadow the standard macros in every command module declared below.
macro_rules! print {
    ($($arg:tt)*) => { $crate::commands::write_stdout(format_args!($($arg)*)) };
}
macro_rules! println {
    () => { $crate::commands::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::commands::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

pub mod audit;
pub mod bench;
pub mod cli;
pub mod collect;
pub mod demo;
pub mod exit;
pub mod keygen;
pub mod link;
pub mod optout;
pub mod query;
pub mod register;
pub mod report;
pub mod rotate_perturbation_key;
pub mod serve;
pub mod synth;

/// The worker threads asked for, or one per core.
fn default_threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The TRE as the operator starts it: the policy, and beside it the
/// perturbation key's record keys when one is given (checked against the
/// store's collection key id) and the ledgers' place.
fn tre_boundary(tre: cli::TreArgs, store: &Path) -> anyhow::Result<gpdp::tre::Boundary> {
    let policy = gpdp::policy::tre::TrePolicy::load(tre.policy.as_deref())?;
    let record_keys = match tre.perturbation_key.as_deref() {
        Some(path) => {
            let manifest = gpdp::store::read_manifest(store)?;
            Some(
                gpdp::tre::aggregates::record_keys::RecordKeys::load(
                    path,
                    manifest.key_id.as_deref().unwrap_or(""),
                )
                .map_err(|e| gpdp::error::BadInput(e.to_string()))?,
            )
        }
        None => None,
    };
    Ok(gpdp::tre::Boundary {
        record_keys,
        ledger_dir: tre.ledger,
        ..gpdp::tre::Boundary::new(policy)
    })
}
