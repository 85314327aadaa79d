//! De-identification: the one engine that turns identifiable rows into
//! stored ones, for GP extracts (`collect`, at the practice) and provider
//! files (`link`, at the provider) alike.
//!
//! In the order a row meets them:
//!
//! - [`key`] — the collection key, which never leaves the sender's side;
//! - [`plan`] — from the collection policy's column actions to the stored
//!   schema and, per stored column, how it is filled and checked;
//! - [`row`] — one row checked against its plan: the NHS number validated,
//!   every value checked and generalised, or the row quarantined with its
//!   reason; and the exclusion lists of codes;
//! - [`pseudonym`] — keyed pseudonyms (HMAC-SHA256 per identifier kind);
//! - [`generalise`] — dates to the month or year, postcodes to LSOA and
//!   IMD decile;
//! - [`builders`] — checked rows into Arrow record batches.
//!
//! The callers keep what is theirs: reading their files, deciding whose
//! rows may leave (Type 1 dissent, tombstones, exclusions, for practices),
//! writing Parquet and committing to the store. This module imports the
//! policy and the extract formats, never the store or the callers.

pub mod builders;
pub mod generalise;
pub mod key;
pub mod plan;
pub mod pseudonym;
pub mod row;
