//! Measuring: peers that gpdp's figures are compared with in the same run.
//!
//! [`baseline`] is the practical limit for collection: the same extract
//! converted from CSV to Parquet with the same crates and no
//! de-identification at all. [`run`] is `gpdp bench`; [`tre`] measures
//! query latency through the TRE boundary against DataFusion directly.

pub mod baseline;
pub mod run;
pub mod tre;
