//! Measuring: peers that gpdp's figures are compared with in the same run.
//!
//! [`baseline`] is the practical limit for collection: the same extract
//! converted from CSV to Parquet with the same crates and no
//! de-identification at all. [`run`] is `gpdp bench`; [`tre`] measures
//! query latency through the TRE boundary against DataFusion directly (and
//! each rule set against OpenSAFELY's); [`privacy`] measures what an
//! attacker learns about one person, against the truth.

pub mod baseline;
pub mod privacy;
pub mod run;
pub mod tre;
