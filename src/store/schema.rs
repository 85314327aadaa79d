//! The stored schema of a provider table (hospital spells, death
//! registrations): what `gpdp link` writes and what the TRE's view of a
//! source not yet linked looks like, empty. It lives with the store because
//! both the writer and the reader of those files depend on it, and neither
//! should depend on the other.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::extract::{Kind, Source};
use crate::policy::{Action, CollectionPolicy, PolicyError};

/// The built-in collection policy's actions for a source (what an empty
/// TRE view of a source not yet linked looks like).
pub fn default_linked_actions(source: Source) -> Result<Vec<Action>, PolicyError> {
    let policy = CollectionPolicy::load(None)?;
    Ok(policy.linked_actions(source).unwrap_or_default().to_vec())
}

/// The stored columns: the pseudonym and its key, then every column the
/// policy keeps or generalises, typed.
pub fn linked_schema(source: Source, actions: &[Action]) -> SchemaRef {
    let mut fields = vec![
        Field::new("patient_id", DataType::FixedSizeBinary(32), false),
        Field::new("patient_key", DataType::Int64, false),
    ];
    for (c, a) in source.columns().iter().zip(actions) {
        if matches!(a, Action::Drop | Action::Pseudonymise) {
            continue;
        }
        let data_type = match c.kind {
            Kind::Date | Kind::BirthDate => DataType::Date32,
            Kind::Number => DataType::Int64,
            _ => DataType::Utf8,
        };
        fields.push(Field::new(c.name, data_type, !c.required));
    }
    Arc::new(Schema::new(fields))
}
