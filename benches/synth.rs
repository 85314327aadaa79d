//! Micro-benchmarks for the generator's hot kernels, with throughput in
//! elements per second: Modulus 11 validation, and one whole small
//! population written to disk. The 1M-patient figure comes from
//! `benches/synth_1m.sh` (wall time and peak memory of the real binary).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gpdp::nhs_number::NhsNumber;
use gpdp::policy::CollectionPolicy;
use gpdp::progress::Progress;
use gpdp::synth::{self, SynthOptions};

fn modulus_11(c: &mut Criterion) {
    let numbers: Vec<[u8; 10]> = (999_000_000u32..999_100_000)
        .filter_map(NhsNumber::from_prefix)
        .map(|n| *n.as_bytes())
        .collect();
    let mut group = c.benchmark_group("nhs_number");
    group.throughput(Throughput::Elements(numbers.len() as u64));
    group.bench_function("parse_and_check", |b| {
        b.iter(|| {
            numbers
                .iter()
                .filter(|n| NhsNumber::parse(black_box(&n[..])).is_ok())
                .count()
        })
    });
    group.finish();
}

fn generate(c: &mut Criterion) {
    let policy = CollectionPolicy::load(None).expect("built-in policy");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut group = c.benchmark_group("synth");
    group.sample_size(10);
    // Rows per run, measured once so throughput is in CSV rows.
    let rows = {
        let opts = options(dir.path().join("probe"), &policy);
        synth::run(&opts, &Progress::hidden())
            .expect("synth")
            .tally
            .total_rows()
    };
    group.throughput(Throughput::Elements(rows));
    let mut n = 0;
    group.bench_function("20k_patients_4_practices", |b| {
        b.iter(|| {
            n += 1;
            let out = dir.path().join(format!("run{n}"));
            synth::run(&options(out.clone(), &policy), &Progress::hidden()).expect("synth");
            let _ = std::fs::remove_dir_all(out);
        })
    });
    group.finish();
}

fn options(out: std::path::PathBuf, policy: &CollectionPolicy) -> SynthOptions {
    SynthOptions {
        out,
        practices: 4,
        patients: 20_000,
        seed: 1,
        start_year: synth::DEFAULT_START_YEAR,
        extract_date: synth::DEFAULT_EXTRACT_DATE.parse().expect("date"),
        threads: 2,
        policy: policy.clone(),
    }
}

criterion_group!(benches, modulus_11, generate);
criterion_main!(benches);
