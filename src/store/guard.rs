//! Shrink guards: what the store refuses to take in place of what it holds.
//!
//! A newer practice extract replaces that practice's batch, a newer
//! provider file replaces its linked source, and a newer National Data
//! Opt-out list replaces the list in force. Each is taken whole, so an
//! input cut short — a download that stopped, a file emptied by a failed
//! export — would silently lose data (or, for the NDOO list, un-opt
//! patients out). So an input is **held** (collect, link) or **refused**
//! (ingest) when it
//! - loses more than the collection policy's `max_shrink` share of the
//!   patients (or rows) in force: `shrink`;
//! - has more than `max_quarantine_share` of its rows quarantined:
//!   `quarantine_share`;
//! - has a file whose last line has no line ending: `truncated`;
//! - (an NDOO list) holds nobody at all: `empty`.
//!
//! Nothing of a held input replaces anything; the rest of the run goes on,
//! and the command's exit status (3) says that something was held. The
//! operator who knows the input is right passes `--accept-shrink`, and the
//! audit log records that with the counts.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{Classify, ExitStatus};
use crate::policy::Guards;

/// Why an input was held, and the numbers that show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Held {
    /// The rule: `shrink`, `quarantine_share`, `truncated` or `empty`.
    pub rule: &'static str,
    /// What was measured, in words.
    pub detail: String,
}

/// Holds an input whose count (`now`) fell by more than `guards.max_shrink`
/// against the count in force (`before`); `what` names the count.
pub fn shrink(guards: &Guards, what: &str, before: u64, now: u64) -> Option<Held> {
    let lost = before.saturating_sub(now);
    (before > 0 && lost as f64 > guards.max_shrink * before as f64).then(|| Held {
        rule: "shrink",
        detail: format!(
            "{now} {what} against {before} in force (−{:.1}%, more than the policy's max_shrink {:.1}%)",
            100.0 * lost as f64 / before as f64,
            100.0 * guards.max_shrink
        ),
    })
}

/// Holds an input with more than `guards.max_quarantine_share` of its
/// `rows` quarantined.
pub fn quarantine_share(guards: &Guards, rows: u64, quarantined: u64) -> Option<Held> {
    (rows > 0 && quarantined as f64 > guards.max_quarantine_share * rows as f64).then(|| Held {
        rule: "quarantine_share",
        detail: format!(
            "{quarantined} of {rows} rows quarantined ({:.1}%, more than the policy's max_quarantine_share {:.1}%)",
            100.0 * quarantined as f64 / rows as f64,
            100.0 * guards.max_quarantine_share
        ),
    })
}

/// Holds an input one of whose files does not end with a line ending: a
/// CSV export ends every line, so a missing one means the file was cut.
pub fn truncated<'a>(files: impl IntoIterator<Item = &'a Path>) -> std::io::Result<Option<Held>> {
    for path in files {
        if !ends_with_line_ending(path)? {
            return Ok(Some(Held {
                rule: "truncated",
                detail: format!(
                    "{} does not end with a line ending (a cut download?)",
                    path.file_name().map_or_else(
                        || path.display().to_string(),
                        |n| n.to_string_lossy().into_owned()
                    )
                ),
            }));
        }
    }
    Ok(None)
}

/// Whether a file is empty or its last byte is `\n`.
pub fn ends_with_line_ending(path: &Path) -> std::io::Result<bool> {
    let mut f = std::fs::File::open(path)?;
    let len = f.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Some inputs of a run were held (exit status 3): the rest was taken.
#[derive(Debug, thiserror::Error)]
#[error(
    "held by the shrink guards ({}): nothing of {} replaced what the store holds; the rest was taken. Check the input, or pass --accept-shrink to take it as it is",
    .0.iter().map(|(what, h)| format!("{what}: rule {} — {}", h.rule, h.detail)).collect::<Vec<_>>().join("; "),
    if .0.len() == 1 { "it" } else { "them" }
)]
pub struct HeldInputs(pub Vec<(String, Held)>);

impl Classify for HeldInputs {
    fn exit_status(&self) -> ExitStatus {
        ExitStatus::Refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_guard_holds_past_its_share_and_not_before() {
        let g = Guards {
            max_shrink: 0.05,
            max_quarantine_share: 0.10,
        };
        assert_eq!(shrink(&g, "patients", 1000, 950), None);
        assert_eq!(shrink(&g, "patients", 1000, 949).unwrap().rule, "shrink");
        assert_eq!(shrink(&g, "patients", 1000, 2000), None, "growth is fine");
        assert_eq!(shrink(&g, "patients", 0, 0), None, "nothing in force");
        assert_eq!(quarantine_share(&g, 1000, 100), None);
        assert_eq!(
            quarantine_share(&g, 1000, 101).unwrap().rule,
            "quarantine_share"
        );
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.csv");
        let cut = dir.path().join("cut.csv");
        std::fs::write(&whole, "a,b\n1,2\n").unwrap();
        std::fs::write(&cut, "a,b\n1,").unwrap();
        assert_eq!(truncated([whole.as_path()]).unwrap(), None);
        let held = truncated([whole.as_path(), cut.as_path()])
            .unwrap()
            .unwrap();
        assert_eq!(held.rule, "truncated");
        assert!(held.detail.contains("cut.csv"), "{}", held.detail);
    }
}
