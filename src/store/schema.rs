//! The stored schema of a provider table (hospital spells, death
//! registrations): what `gpdp link` writes and what the TRE's view of a
//! source not yet linked looks like, empty. The TRE reads it here, from the
//! store, rather than from `link`; the schema itself is the
//! de-identification plan's ([`crate::deid::plan`]), the one `link` writes
//! by, so the two cannot disagree.

use arrow::datatypes::SchemaRef;

use crate::deid::plan::Plan;
use crate::extract::Source;
use crate::policy::{Action, CollectionPolicy, PolicyError};

/// The built-in collection policy's actions for a source (what an empty
/// TRE view of a source not yet linked looks like).
pub fn default_linked_actions(source: Source) -> Result<Vec<Action>, PolicyError> {
    let policy = CollectionPolicy::load(None)?;
    Ok(policy.linked_actions(source).unwrap_or_default().to_vec())
}

/// The stored columns: the pseudonym and its key, then every column the
/// policy keeps or generalises, typed (dates `Date32`, numbers `Float64`,
/// text `Utf8`).
pub fn linked_schema(source: Source, actions: &[Action]) -> SchemaRef {
    Plan::source(source, actions).schema
}
