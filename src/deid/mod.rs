//! De-identification: the collection key and (with `gpdp collect`) keyed
//! pseudonyms and generalisation.

pub mod key;
