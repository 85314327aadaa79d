//! Opt-outs: the rules that decide whose data may leave a practice (Type 1)
//! and whose data a project may see (National Data Opt-out).

pub mod apply;
pub mod ingest;
pub mod list;
pub mod purge;
pub mod request;
pub mod status;
pub mod type1;
