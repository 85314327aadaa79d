//! De-identification on collection: the collection key, keyed pseudonyms,
//! and generalisation of quasi-identifiers.

pub mod generalise;
pub mod key;
pub mod pseudonym;
