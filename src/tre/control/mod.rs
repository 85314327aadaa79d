//! Safe outputs, after running: the disclosure-control rule sets a
//! project's answers pass through before anyone sees them.
//!
//! The compiled plan hands over every statistic as its parts (counts,
//! sums) beside the patients who contribute to it; a rule set turns those
//! into what is released:
//! - [`sdc`] — threshold rule sets: statistics of too few patients are
//!   redacted, counts rounded, and (where the rule set says) sums checked
//!   for [`dominance`] by a few patients;
//! - [`ckm`] — the cell key method: every statistic perturbed by a key
//!   fixed by who contributes to it, looked up in its perturbation table
//!   ([`ckm::ptable`]); [`sdc`] applies it cell by cell;
//! - [`dp`] — differential privacy: the noise plan and the privacy
//!   ledger's charge fixed before anything runs, then noise on every cell
//!   of the group keys' public domains.

pub mod ckm;
pub mod dominance;
pub mod dp;
pub mod sdc;
