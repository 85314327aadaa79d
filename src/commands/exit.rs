//! The exit status of a failed command, decided once at the binary's edge.
//!
//! Each layer's error type knows its status ([`Classify`]); only here,
//! above every layer, is it natural to know them all, so the library's
//! ground floor (`gpdp::error`) depends on none of them.

use gpdp::error::{BadInput, Classify, ExitStatus, IoError};

/// Finds the exit status of an error by walking its chain: the first error
/// that knows its status decides; anything unknown is internal.
pub fn exit_status_of(err: &anyhow::Error) -> ExitStatus {
    for cause in err.chain() {
        if let Some(known) = classify(cause) {
            return known.exit_status();
        }
    }
    ExitStatus::Internal
}

/// The cause as the layer error it is, if it is one.
fn classify<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a dyn Classify> {
    if let Some(e) = cause.downcast_ref::<BadInput>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<IoError>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::synth::SynthError>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::policy::PolicyError>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::deid::key::KeyError>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::link::LinkError>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::collect::CollectError>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::store::guard::HeldInputs>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::store::StoreError>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::extract::ExtractError>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::optout::list::OptoutError>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::tre::TreError>() {
        Some(e)
    } else if let Some(e) = cause.downcast_ref::<gpdp::audit::AuditFailure>() {
        Some(e)
    } else {
        None
    }
}
