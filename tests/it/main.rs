//! gpdp's integration tests, one test binary (`cargo test --test it`).
//!
//! Each module below was once its own file under `tests/` and so its own
//! test binary, and every one of them linked DataFusion: linking them took
//! most of a debug build. As modules of one binary they link once. A test
//! is now named by its module, e.g. `differencing::measure_…`, so
//! `cargo test --test it -- tre::` runs one former file and the README's
//! `--skip measure_` still matches the measurements by substring.
//!
//! They now share one process, so a test must not change anything
//! process-wide (the environment, the working directory): each one works in
//! its own temporary directory and runs the `gpdp` binary as a child
//! process, and the library's in-process caches are keyed by absolute path.
//!
//! Data the tests read sits beside them: `tre_cases.slt`, the attack
//! families in `attacks/`; the Python client in `tests/python/`. Proptest
//! keeps the regressions of these modules in `tests/proptest-regressions/`
//! (its rule for a crate rooted at `tests/it/main.rs`).

mod common;

mod attacks;
mod audit;
mod bad_input;
mod bench;
mod cli;
mod collect;
mod differencing;
mod docs;
mod erasure;
mod layout;
mod ledger;
mod lifecycle;
mod link;
mod noise;
mod optout;
mod pages;
mod properties;
mod report;
mod serve;
mod synth;
mod tre;
mod tre_vectors;
