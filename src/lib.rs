//! # gpdp — GP data for research, safely, and measured
//!
//! gpdp shows end to end how identifiable English GP extracts can be
//! de-identified **on collection**, how Type 1 and National Data Opt-outs are
//! enforced, and how researchers get aggregate answers only, from inside a
//! Trusted Research Environment. It runs on synthetic data it generates.
//!
//! The modules follow the data flow (see `../shared/DESIGN.md`):
//!
//! 1. [`synth`] — synthetic GP extracts plus the ground truth to audit against.
//! 2. [`nhs_number`] — the identifier every extract row carries, and its check.
//! 3. [`policy`] — the typed, validated policies from `policies/`.
//! 4. [`deid`] — the collection key (and, with collection, pseudonyms).
//! 5. [`optout`] — the Type 1 and National Data Opt-out rules.
//! 6. [`demo`] — every stage on an embedded default.
//!
//! [`error`] maps every failure to the exit statuses of the interface
//! contract; [`progress`] draws progress bars on a terminal.

pub mod deid;
pub mod demo;
pub mod error;
pub mod nhs_number;
pub mod optout;
pub mod policy;
pub mod progress;
pub mod synth;
