//! # gpdp — GP data for research, safely, and measured
//!
//! gpdp shows end to end how identifiable English GP extracts can be
//! de-identified **on collection**, how Type 1 and National Data Opt-outs are
//! enforced, and how researchers get aggregate answers only, from inside a
//! Trusted Research Environment. It runs on synthetic data it generates.
//!
//! The modules follow the data flow:
//!
//! 1. [`synth`] — synthetic GP extracts plus the ground truth to audit against.
//! 2. [`extract`] — the tables of a GP extract and a streaming reader.
//! 3. [`policy`] — the typed, validated policies from `policies/`, and the
//!    cell key method's perturbation table a TRE rule set's parameters define.
//! 4. [`deid`] — the collection key, keyed pseudonyms, generalisation.
//! 5. [`collect`] — de-identification on collection, per practice.
//! 6. [`link`] — provider files collected at their provider with the same key.
//! 7. [`store`] — Parquet batches, manifest, tombstones, hash-chained audit log.
//! 8. [`optout`] — the Type 1 and National Data Opt-out rules.
//! 9. [`tre`] — the TRE boundary, started as a [`tre::Boundary`]: the policy,
//!    and beside it the operator's perturbation key and ledger directory.
//! 10. [`serve`] — the boundary over Arrow Flight SQL.
//! 11. [`audit`], [`report`], [`register`] — the independent checks, the
//!     evidence page, the public data-uses register.
//! 12. [`bench`](mod@bench) measures it all; [`demo`] runs every stage on an embedded
//!     default.
//!
//! [`nhs_number`], [`calendar`] and [`digest`] (hex and SHA-256) are shared
//! by several stages; [`page`] by the HTML pages.
//!
//! Imports point one way: no two modules name each other, directly or
//! round a longer circle, at any level (`scripts/import-circles`, run by
//! the integration tests).
//!
//! [`error`] defines the exit statuses of the interface contract and the
//! [`error::Classify`] trait by which each layer's error names its status
//! (the binary, above every layer, walks an error's chain to find it);
//! [`progress`] draws progress bars on a terminal.

pub mod audit;
pub mod bench;
pub mod calendar;
pub mod collect;
pub mod deid;
pub mod demo;
pub mod digest;
pub mod error;
pub mod extract;
pub mod link;
pub mod nhs_number;
pub mod optout;
pub mod page;
pub mod policy;
pub mod progress;
pub mod register;
pub mod report;
pub mod serve;
pub mod store;
pub mod synth;
pub mod tre;

/// Crash-testing hook: when the environment variable `GPDP_FAILPOINT` names
/// this point, the process aborts here, as if killed. Tests use it to prove
/// that a crash at each step of a commit leaves the store as it was.
pub fn failpoint(name: &str) {
    if std::env::var_os("GPDP_FAILPOINT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}

/// Runs `f` over `items` on `threads` workers, keeping the order.
pub fn parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .filter_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}
