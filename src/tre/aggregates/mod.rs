//! The DataFusion kernels the compiled plan calls by name, each built for
//! a rule set's cost on a store's rows (grouped by patient, ordered by
//! date):
//! - [`patients`] (`gpdp_patients`) — for threshold rule sets, a cell's
//!   patients counted only up to one more than the threshold;
//! - [`contributors`] (`gpdp_contributors`) — for the cell key method,
//!   each cell's exact contributors and the sum of their record keys;
//! - [`bounded`] (`gpdp_bounded`) — for differential privacy, every
//!   patient's contribution bounded and totalled into every cell of the
//!   keys' public domains;
//! - [`record_keys`] (`gpdp_record_key`) — the cell key method's record
//!   keys, from the TRE's perturbation key.
//!
//! The two patient-bounding kernels share how they walk a store's rows
//! (`layout`) and how their partial states reach the final step
//! (`handoff`). What a kernel computes is read only by disclosure control
//! ([`control`](crate::tre::control)), which decides what is released;
//! nothing here imports it or the request pipeline.

pub mod bounded;
pub mod contributors;
mod handoff;
mod layout;
pub mod patients;
pub mod record_keys;
