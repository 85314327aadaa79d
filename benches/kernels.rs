//! Micro-benchmarks for collection's hot kernels, with throughput in
//! elements per second, so that regressions show up: keyed pseudonymisation
//! of a batch of NHS numbers (one reused HMAC key), the Type 1 rule, and
//! date parsing with generalisation to the month. (Modulus 11 validation is
//! in `benches/synth.rs`.)

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gpdp::calendar::parse_ymd;
use gpdp::deid::generalise::generalise_ymd;
use gpdp::deid::key::CollectionKey;
use gpdp::deid::pseudonym::Pseudonymiser;
use gpdp::nhs_number::NhsNumber;
use gpdp::optout::type1::{Type1Code, Type1State};
use gpdp::policy::Rule;

fn numbers(n: usize) -> Vec<NhsNumber> {
    (999_000_000u32..)
        .filter_map(NhsNumber::from_prefix)
        .take(n)
        .collect()
}

fn pseudonymise(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("key");
    gpdp::deid::key::generate(&path).expect("key");
    let key = CollectionKey::load(&path).expect("key");
    let p = Pseudonymiser::new(&key);
    let batch = numbers(10_000);
    let mut group = c.benchmark_group("pseudonymise");
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("hmac_sha256_batch_10k", |b| {
        b.iter(|| {
            batch
                .iter()
                .map(|n| p.patient(black_box(n))[0] as u64)
                .sum::<u64>()
        })
    });
    group.finish();
}

fn type1(c: &mut Criterion) {
    // 100k codes over 10k patients, dissents and withdrawals interleaved.
    let codes: Vec<(usize, i32, Type1Code)> = (0..100_000)
        .map(|i| {
            let code = if i % 3 == 0 {
                Type1Code::Withdrawn
            } else {
                Type1Code::Dissent
            };
            (i % 10_000, (i * 7919 % 5000) as i32, code)
        })
        .collect();
    let mut group = c.benchmark_group("type1");
    group.throughput(Throughput::Elements(codes.len() as u64));
    group.bench_function("latest_code_wins_100k", |b| {
        b.iter(|| {
            let mut states = vec![Type1State::default(); 10_000];
            for &(p, day, code) in &codes {
                states[p].record(black_box(day), code);
            }
            states.iter().filter(|s| s.dissents()).count()
        })
    });
    group.finish();
}

fn generalise(c: &mut Criterion) {
    let dates: Vec<String> = (0..100_000)
        .map(|i| format!("{:04}-{:02}-{:02}", 1920 + i % 100, 1 + i % 12, 1 + i % 28))
        .collect();
    let mut group = c.benchmark_group("generalise");
    group.throughput(Throughput::Elements(dates.len() as u64));
    group.bench_function("parse_date_to_month_100k", |b| {
        b.iter(|| {
            dates
                .iter()
                .filter_map(|d| parse_ymd(black_box(d.as_bytes())))
                .map(|ymd| generalise_ymd(ymd, Some(Rule::Month)) as i64)
                .sum::<i64>()
        })
    });
    group.finish();
}

criterion_group!(benches, pseudonymise, type1, generalise);
criterion_main!(benches);
