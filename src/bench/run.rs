//! `gpdp bench`: how fast de-identification on collection runs on this
//! machine, where the time goes, and how it grows — with its peer measured
//! in the same run.
//!
//! For each scale it generates a synthetic population (or reuses one cached
//! under `--data` by its parameters), collects it into a scratch store and
//! measures wall time, CPU time and peak memory; converts the same extract
//! with the [`super::baseline`] peer (plain CSV → Parquet, same crates, no
//! de-identification) and reports the ratio; and sums the receipts' per-stage
//! times. On the last scale it also measures TRE query latency through the
//! boundary and directly ([`super::tre`]).
//!
//! Each scale's practice files and reference are read once before anything
//! is measured, so that every run reads them from the page cache.
//!
//! CPU time comes from `/proc/self/stat` (user + system, 100 ticks a
//! second); peak memory from `VmHWM` in `/proc/self/status`, reset before
//! each measurement through `/proc/self/clear_refs` (Linux).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::collect::{self, CollectOptions, CollectSummary};
use crate::policy::CollectionPolicy;
use crate::progress::Progress;

pub struct BenchOptions {
    pub patients: u64,
    pub practices: u32,
    pub scales: Vec<u32>,
    /// Thread counts: the largest runs every scale; each of the others
    /// collects the first scale once more, for the thread scaling.
    pub threads: Vec<usize>,
    /// Where generated populations are cached and scratch stores live.
    pub data: PathBuf,
    /// TRE runs per query (0: skip the TRE).
    pub tre_runs: usize,
    /// Targets of the privacy measurement (0: skip it).
    pub privacy_targets: usize,
    /// Only the privacy measurement (no collection scales, no TRE latency).
    pub privacy_only: bool,
    /// Counts the reconstruction asks at most (0: skip it).
    pub reconstruction_counts: usize,
    /// Reconstruction attacks averaged per rule set.
    pub reconstruction_runs: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Worker threads of the scale runs.
    pub threads: usize,
    pub runs: Vec<ScaleRun>,
    /// Collection of the first scale at each `--threads` count, fewest first.
    pub thread_scaling: Vec<ThreadRun>,
    pub tre: Vec<super::tre::QueryLatency>,
    /// The same queries under OpenSAFELY's rules, the cell key method and
    /// differential privacy, in one run.
    pub tre_rule_sets: Vec<super::tre::RuleSetCost>,
    /// What an attacker learns about one person, by rule set and budget
    /// ([`super::privacy`]), on a store of [`PRIVACY_PATIENTS`] patients.
    pub privacy: Vec<super::privacy::Measured>,
    /// Reconstruction of a small group's attribute on the same store, by
    /// number of counts, under the cell key method and OpenSAFELY's rules
    /// ([`super::privacy::by_queries`]).
    pub reconstruction: Vec<super::privacy::Reconstruction>,
    /// Whether peak memory could be reset between measurements (else it is
    /// the process's peak so far).
    pub peak_memory_per_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleRun {
    pub scale: u32,
    pub patients: u64,
    pub practices: u32,
    pub collect: Measured,
    /// `gpdp link` of the population's hospital spells and death
    /// registrations into the collected store, in the same run.
    pub link: Measured,
    pub baseline: Measured,
    /// gpdp rows/s ÷ baseline rows/s.
    pub ratio_to_baseline: f64,
    /// Seconds per stage, summed over practices (worker time, not wall time).
    pub stage_seconds: BTreeMap<String, f64>,
    /// Each stage's share of the summed stage time.
    pub stage_shares: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThreadRun {
    pub threads: usize,
    pub collect: Measured,
    /// rows/s ÷ rows/s with the fewest threads.
    pub speedup: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Measured {
    pub rows_in: u64,
    pub rows_out: u64,
    pub bytes_in: u64,
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    pub rows_per_second: f64,
    pub mb_per_second: f64,
    pub peak_memory_mib: f64,
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces): utime is
            // the 12th, stime the 13th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

fn peak_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Gives freed heap back to the system, then resets the high-water mark,
/// so that a run's peak is its own and not memory the allocator kept from
/// an earlier run.
fn reset_peak() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only releases free memory; it takes no
        // pointers and is safe to call at any time.
        unsafe {
            malloc_trim(0);
        }
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs `f`, measuring wall time, CPU time and peak memory.
fn measured<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Measured)> {
    reset_peak();
    let (cpu, t) = (cpu_seconds(), Instant::now());
    let value = f()?;
    let m = Measured {
        wall_seconds: t.elapsed().as_secs_f64(),
        cpu_seconds: cpu_seconds() - cpu,
        peak_memory_mib: peak_mib(),
        ..Measured::default()
    };
    Ok((value, m))
}

fn rates(mut m: Measured) -> Measured {
    let s = m.wall_seconds.max(1e-9);
    m.rows_per_second = m.rows_in as f64 / s;
    m.mb_per_second = m.bytes_in as f64 / 1e6 / s;
    m
}

/// The population for these parameters, generated once and cached.
fn population(
    opts: &BenchOptions,
    policy: &CollectionPolicy,
    patients: u64,
    practices: u32,
    progress: &Progress,
) -> anyhow::Result<PathBuf> {
    let dir = opts
        .data
        .join(format!("synth-{patients}-{practices}-seed1"));
    // A population cached before provider data existed is made again.
    if dir.join("truth/summary.json").is_file() && dir.join("linked").is_dir() {
        return Ok(dir);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    progress.stage(&format!(
        "generating {patients} patients in {practices} practices (cached in {})",
        dir.display()
    ));
    crate::synth::run(
        &crate::synth::SynthOptions {
            out: dir.clone(),
            practices,
            patients,
            seed: 1,
            start_year: crate::synth::DEFAULT_START_YEAR,
            extract_date: crate::synth::DEFAULT_EXTRACT_DATE.parse()?,
            threads: opts.most_threads(),
            policy: policy.clone(),
        },
        progress,
    )?;
    Ok(dir)
}

/// Reads every file under `dir` once, unmeasured, so that gpdp and the
/// baseline both read it from memory: on a cold cache whichever ran first
/// would pay for the disk, and the ratio would measure that.
fn warm_page_cache(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            warm_page_cache(&path)?;
        } else {
            std::io::copy(&mut std::fs::File::open(&path)?, &mut std::io::sink())?;
        }
    }
    Ok(())
}

/// Collection runs at each thread count, with speed-ups over the fewest.
fn thread_scaling(mut runs: Vec<(usize, Measured)>) -> Vec<ThreadRun> {
    runs.sort_by_key(|(threads, _)| *threads);
    let base = runs
        .first()
        .map_or(1e-9, |(_, m)| m.rows_per_second.max(1e-9));
    runs.into_iter()
        .map(|(threads, collect)| ThreadRun {
            threads,
            speedup: collect.rows_per_second / base,
            collect,
        })
        .collect()
}

/// Collects `extract` into a fresh store under `scratch` with `threads`
/// workers, measured; returns the summary, the figures (with the receipts'
/// row and byte counts) and the options used (the store and key).
fn measure_collection(
    policy: &CollectionPolicy,
    extract: &Path,
    scratch: &Path,
    threads: usize,
    progress: &Progress,
) -> anyhow::Result<(CollectSummary, Measured, CollectOptions)> {
    if scratch.exists() {
        std::fs::remove_dir_all(scratch)?;
    }
    std::fs::create_dir_all(scratch)?;
    let key = scratch.join("bench.key");
    crate::deid::key::generate(&key)?;
    let options = CollectOptions {
        extract: extract.to_owned(),
        store: scratch.join("store"),
        key,
        policy: policy.clone(),
        practices: Vec::new(),
        threads,
        quarantine: Some(scratch.join("quarantine")),
        accept_shrink: false,
    };
    let (summary, m) = measured(|| Ok(collect::run(&options, progress)?))?;
    let receipts: Vec<_> = summary.receipts().collect();
    let m = rates(Measured {
        rows_in: receipts.iter().map(|r| r.rows_in_total()).sum(),
        rows_out: receipts.iter().map(|r| r.rows_out_total()).sum(),
        bytes_in: receipts.iter().map(|r| r.bytes_in).sum(),
        ..m
    });
    Ok((summary, m, options))
}

/// Links the population's provider extracts into the collected store, measured.
fn measure_link(
    policy: &CollectionPolicy,
    extract: &Path,
    scratch: &Path,
    collected: &CollectOptions,
) -> anyhow::Result<Measured> {
    let (receipts, m) = measured(|| {
        Ok(crate::link::link(&crate::link::LinkOptions {
            extract: extract.to_owned(),
            store: collected.store.clone(),
            key: collected.key.clone(),
            policy: policy.clone(),
            sources: Vec::new(),
            quarantine: Some(scratch.join("quarantine")),
            accept_shrink: false,
        })?)
    })?;
    let bytes_in = crate::extract::Source::ALL
        .iter()
        .filter_map(|s| {
            std::fs::metadata(extract.join("linked").join(format!("{}.csv", s.name()))).ok()
        })
        .map(|m| m.len())
        .sum();
    Ok(rates(Measured {
        rows_in: receipts.iter().map(|r| r.rows_in).sum(),
        rows_out: receipts.iter().map(|r| r.rows_out).sum(),
        bytes_in,
        ..m
    }))
}

/// Seconds per stage summed over the receipts, with the commit's, and each
/// stage's share of their total.
fn stages(summary: &CollectSummary) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
    let mut seconds = BTreeMap::new();
    for r in summary.receipts() {
        let s = &r.stage_seconds;
        for (name, v) in [
            ("hash_inputs", s.hash_inputs),
            ("type1", s.type1),
            ("read_parse", s.read_parse),
            ("validate_generalise", s.validate_generalise),
            ("pseudonymise", s.pseudonymise),
            ("parquet_write", s.parquet_write),
        ] {
            *seconds.entry(name.to_owned()).or_insert(0.0) += v;
        }
    }
    seconds.insert("commit".into(), summary.commit_seconds);
    let total: f64 = seconds.values().sum::<f64>().max(1e-9);
    let shares = seconds
        .iter()
        .map(|(k, v)| (k.clone(), v / total))
        .collect();
    (seconds, shares)
}

impl BenchOptions {
    /// The thread count of the scale runs.
    pub fn most_threads(&self) -> usize {
        self.threads.iter().copied().max().unwrap_or(1)
    }
}

/// Ingests the population's National Data Opt-out list into a collected
/// store (the TRE's research projects need it).
fn ingest_ndoo(
    policy: &CollectionPolicy,
    extract: &Path,
    collected: &CollectOptions,
) -> anyhow::Result<()> {
    crate::optout::ingest::ingest(
        &extract.join("national/ndoo.csv"),
        &collected.store,
        &collected.key,
        false,
        false,
        policy,
    )?;
    Ok(())
}

/// The privacy measurement's store: small enough that thousands of
/// questions take a minute, large enough for a hundred unique targets.
pub const PRIVACY_PATIENTS: u64 = 4_000;
const PRIVACY_PRACTICES: u32 = 3;

/// Runs the benchmark.
pub fn run(opts: &BenchOptions, progress: &Progress) -> anyhow::Result<BenchReport> {
    std::fs::create_dir_all(&opts.data)?;
    let scratch = opts.data.join("bench-scratch");
    let policy = CollectionPolicy::load(None)?;
    let threads = opts.most_threads();
    let mut runs = Vec::new();
    let mut thread_scaling = Vec::new();
    let mut tre = Vec::new();
    let mut tre_rule_sets = Vec::new();
    let peak_memory_per_run = reset_peak();
    let scales: &[u32] = if opts.privacy_only { &[] } else { &opts.scales };
    for (i, &scale) in scales.iter().enumerate() {
        let (patients, practices) = (opts.patients * scale as u64, opts.practices * scale);
        let extract = population(opts, &policy, patients, practices, progress)?;
        // What collection and the baseline read.
        warm_page_cache(&extract.join("practices"))?;
        warm_page_cache(&extract.join("reference"))?;

        // On the first scale, the other thread counts first (each run
        // replaces the scratch store, and the last scale's is queried).
        let mut sweep = Vec::new();
        if i == 0 {
            for &t in opts.threads.iter().filter(|&&t| t != threads) {
                progress.stage(&format!(
                    "scale {scale}: collecting {patients} patients with {t} threads"
                ));
                let m = measure_collection(&policy, &extract, &scratch, t, progress)?.1;
                sweep.push((t, m));
            }
        }
        progress.stage(&format!(
            "scale {scale}: collecting {patients} patients with {threads} threads"
        ));
        let (summary, collect, collected) =
            measure_collection(&policy, &extract, &scratch, threads, progress)?;
        let (stage_seconds, stage_shares) = stages(&summary);
        if i == 0 {
            sweep.push((threads, collect.clone()));
            thread_scaling = self::thread_scaling(sweep);
        }

        progress.stage(&format!(
            "scale {scale}: linking hospital spells and death registrations"
        ));
        let link = measure_link(&policy, &extract, &scratch, &collected)?;

        progress.stage(&format!(
            "scale {scale}: the baseline (plain CSV to Parquet)"
        ));
        let (b, m) = measured(|| {
            super::baseline::csv_to_parquet(
                &extract,
                &scratch.join("baseline"),
                threads,
                policy.codec,
            )
        })?;
        let baseline = rates(Measured {
            rows_in: b.rows,
            rows_out: b.rows,
            bytes_in: b.bytes,
            ..m
        });

        if i + 1 == scales.len() && opts.tre_runs > 0 {
            progress.stage("TRE query latency: through the boundary and directly");
            ingest_ndoo(&policy, &extract, &collected)?;
            tre = super::tre::measure(&collected.store, opts.tre_runs)?;
            progress
                .stage("TRE rule sets: OpenSAFELY's, the cell key method and differential privacy");
            tre_rule_sets = super::tre::measure_rule_sets(&collected.store, opts.tre_runs)?;
        }
        runs.push(ScaleRun {
            scale,
            patients,
            practices,
            ratio_to_baseline: collect.rows_per_second / baseline.rows_per_second.max(1e-9),
            collect,
            link,
            baseline,
            stage_seconds,
            stage_shares,
        });
        std::fs::remove_dir_all(&scratch)?;
    }
    let (mut privacy, mut reconstruction) = (Vec::new(), Vec::new());
    if opts.privacy_targets > 0 || opts.reconstruction_counts > 0 {
        progress.stage(&format!(
            "privacy: the padding attack against the truth on {PRIVACY_PATIENTS} patients, by rule set and budget"
        ));
        let extract = population(opts, &policy, PRIVACY_PATIENTS, PRIVACY_PRACTICES, progress)?;
        let collected = measure_collection(&policy, &extract, &scratch, threads, progress)?.2;
        ingest_ndoo(&policy, &extract, &collected)?;
        if opts.privacy_targets > 0 {
            privacy = super::privacy::by_budget(&collected.store, opts.privacy_targets)?;
        }
        if opts.reconstruction_counts > 0 {
            progress.stage(&format!(
                "privacy: reconstruction of a group of {RECONSTRUCTION_MEMBERS:?} members against the truth, up to {} counts",
                opts.reconstruction_counts
            ));
            reconstruction = super::privacy::by_queries(
                &collected.store,
                RECONSTRUCTION_MEMBERS,
                &checkpoints(opts.reconstruction_counts),
                opts.reconstruction_runs,
            )?;
        }
        std::fs::remove_dir_all(&scratch)?;
    }
    Ok(BenchReport {
        threads,
        runs,
        thread_scaling,
        tre,
        tre_rule_sets,
        privacy,
        reconstruction,
        peak_memory_per_run,
    })
}

/// The reconstruction's group size on the privacy store (a sex, age band
/// and IMD decile of [`PRIVACY_PATIENTS`] patients), and the numbers of
/// counts after which it is decoded.
pub const RECONSTRUCTION_MEMBERS: std::ops::RangeInclusive<usize> = 20..=40;
pub const RECONSTRUCTION_CHECKPOINTS: [usize; 19] = [
    2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 25, 30, 40, 50, 75, 100, 125, 150, 200,
];

/// The checkpoints up to `most` counts, ending at `most`.
fn checkpoints(most: usize) -> Vec<usize> {
    let mut c: Vec<usize> = RECONSTRUCTION_CHECKPOINTS
        .into_iter()
        .filter(|&q| q < most)
        .collect();
    c.push(most);
    c
}

impl BenchReport {
    /// Writes `bench.json` and `bench.html` (the scaling curve as SVG
    /// charts, readable offline) into `out`; returns the page's path.
    pub fn write(&self, out: &std::path::Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(out)?;
        std::fs::write(
            out.join("bench.json"),
            serde_json::to_string_pretty(self)? + "\n",
        )?;
        if let Some(m) = self.privacy_measurement()? {
            std::fs::write(
                out.join("privacy.json"),
                serde_json::to_string_pretty(&m)? + "\n",
            )?;
        }
        let labels: Vec<String> = self
            .runs
            .iter()
            .flat_map(|r| {
                [
                    format!("×{} gpdp", r.scale),
                    format!("×{} baseline", r.scale),
                ]
            })
            .collect();
        let series = |f: &dyn Fn(&Measured) -> f64| -> Vec<f64> {
            self.runs
                .iter()
                .flat_map(|r| [f(&r.collect), f(&r.baseline)])
                .collect()
        };
        let mut page = String::from(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>gpdp bench</title></head><body style=\"font-family:sans-serif;max-width:960px;margin:2em auto\"><h1>gpdp bench</h1>",
        );
        for (title, unit, values) in [
            ("Wall time by scale", "seconds", series(&|m| m.wall_seconds)),
            (
                "Throughput by scale",
                "M rows/s",
                series(&|m| m.rows_per_second / 1e6),
            ),
            (
                "Peak memory by scale",
                "MiB",
                series(&|m| m.peak_memory_mib),
            ),
        ] {
            page += &crate::page::bar_chart(title, &labels, &values, unit, None);
        }
        if self.thread_scaling.len() > 1 {
            let labels: Vec<String> = self
                .thread_scaling
                .iter()
                .map(|r| format!("{} threads", r.threads))
                .collect();
            let values: Vec<f64> = self
                .thread_scaling
                .iter()
                .map(|r| r.collect.rows_per_second / 1e6)
                .collect();
            page += &crate::page::bar_chart(
                "Collection throughput by thread count (scale 1)",
                &labels,
                &values,
                "M rows/s",
                None,
            );
        }
        if !self.privacy.is_empty() {
            let labels: Vec<String> = self
                .privacy
                .iter()
                .map(|m| match m.rho_per_target {
                    Some(rho) => format!("dp ρ {rho}"),
                    None => format!("{} ({} questions)", m.rule_set, m.questions_per_target),
                })
                .collect();
            let values: Vec<f64> = self.privacy.iter().map(|m| 100.0 * m.accuracy).collect();
            page += &crate::page::bar_chart(
                "What an attacker learns about one person, by budget spent on them (the line: guessing)",
                &labels,
                &values,
                "% of targets right",
                self.privacy.first().map(|m| 100.0 * m.chance),
            );
        }
        page += &format!(
            "<pre>{}</pre></body></html>\n",
            self.to_table().replace('<', "&lt;")
        );
        let path = out.join("bench.html");
        std::fs::write(&path, page)?;
        Ok(path)
    }

    /// The privacy measurement as `gpdp report --privacy` reads it, if
    /// this run made one.
    pub fn privacy_measurement(
        &self,
    ) -> anyhow::Result<Option<crate::report::privacy::Measurement>> {
        use crate::report::privacy::{BudgetAttack, Curve, Measurement, SCHEMA};
        if self.privacy.is_empty() && self.reconstruction.is_empty() {
            return Ok(None);
        }
        let policy = crate::policy::tre::TrePolicy::load(None)?;
        Ok(Some(Measurement {
            schema: SCHEMA.to_owned(),
            measured_at: crate::store::now_rfc3339(),
            machine: format!(
                "{} cores, {} {}",
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                std::env::consts::OS,
                std::env::consts::ARCH
            ),
            gpdp_version: env!("CARGO_PKG_VERSION").to_owned(),
            tre_policy_rules_sha256: policy.rules_sha256,
            patients: PRIVACY_PATIENTS,
            by_budget: self
                .privacy
                .iter()
                .map(|m| BudgetAttack {
                    rule_set: m.rule_set.clone(),
                    questions_per_target: m.questions_per_target,
                    rho_per_target: m.rho_per_target,
                    targets: m.targets,
                    right: m.right,
                    accuracy: m.accuracy,
                    chance: m.chance,
                    theory: m.theory,
                })
                .collect(),
            reconstruction: self
                .reconstruction
                .iter()
                .map(|r| Curve {
                    rule_set: r.rule_set.clone(),
                    members: r.members,
                    base_rate: r.base_rate,
                    points: r.points.iter().map(|p| (p.queries, p.accuracy)).collect(),
                    stopped_by: r.stopped_by.clone(),
                    runs: r.runs,
                })
                .collect(),
        }))
    }

    /// The figures as tables for people.
    pub fn to_table(&self) -> String {
        let mut out = format!("gpdp bench ({} threads)\n\n", self.threads);
        out += "scale  patients  run       rows in  MB in   rows out  wall s   cpu s   M rows/s   MB/s  peak MiB\n";
        for r in &self.runs {
            for (name, m) in [
                ("gpdp", &r.collect),
                ("link", &r.link),
                ("baseline", &r.baseline),
            ] {
                out += &format!(
                    "{:>5}  {:>8}  {:<8} {:>9} {:>6.0} {:>10} {:>7.2} {:>7.2} {:>10.2} {:>6.0} {:>9.0}\n",
                    r.scale,
                    r.patients,
                    name,
                    m.rows_in,
                    m.bytes_in as f64 / 1e6,
                    m.rows_out,
                    m.wall_seconds,
                    m.cpu_seconds,
                    m.rows_per_second / 1e6,
                    m.mb_per_second,
                    m.peak_memory_mib
                );
            }
            out += &format!(
                "       gpdp runs at {:.2}× the baseline's speed; stages: {}\n",
                r.ratio_to_baseline,
                r.stage_shares
                    .iter()
                    .map(|(k, v)| format!("{k} {:.0}%", 100.0 * v))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if self.runs.len() > 1 {
            let (first, last) = (&self.runs[0], &self.runs[self.runs.len() - 1]);
            out += &format!(
                "\nscaling ×{}: time ×{:.2}, peak memory ×{:.2}\n",
                last.scale / first.scale.max(1),
                last.collect.wall_seconds / first.collect.wall_seconds.max(1e-9),
                last.collect.peak_memory_mib / first.collect.peak_memory_mib.max(1e-9)
            );
        }
        if self.thread_scaling.len() > 1 {
            out += "\nthreads  wall s   cpu s  M rows/s  speedup\n";
            for r in &self.thread_scaling {
                out += &format!(
                    "{:>7} {:>7.2} {:>7.2} {:>9.2} {:>7.2}×\n",
                    r.threads,
                    r.collect.wall_seconds,
                    r.collect.cpu_seconds,
                    r.collect.rows_per_second / 1e6,
                    r.speedup
                );
            }
        }
        if !self.tre.is_empty() {
            out += "\nTRE latency          boundary p50    p95   direct p50    p95  overhead\n";
            for q in &self.tre {
                out += &format!(
                    "{:<20} {:>10.1}ms {:>6.0}ms {:>9.1}ms {:>6.0}ms {:>8.0}%\n",
                    q.query,
                    q.boundary_p50_ms,
                    q.boundary_p95_ms,
                    q.direct_p50_ms,
                    q.direct_p95_ms,
                    100.0 * q.overhead
                );
            }
        }
        if !self.tre_rule_sets.is_empty() {
            out += "\nTRE rule sets (p50)   opensafely         ckm                 dp\n";
            for q in &self.tre_rule_sets {
                let cell = |p: &str| match (q.p50_ms.get(p), q.vs_opensafely.get(p)) {
                    (Some(t), Some(x)) => format!("{t:>8.1}ms {x:>5.2}x"),
                    _ => format!("{:>15}", "-"),
                };
                out += &format!(
                    "{:<20} {}  {}  {}\n",
                    q.query,
                    cell(super::tre::RULE_SETS[0]),
                    cell(super::tre::RULE_SETS[1]),
                    cell(super::tre::RULE_SETS[2])
                );
            }
        }
        if !self.privacy.is_empty() {
            out += &format!(
                "\nprivacy: the padding attack against the truth ({PRIVACY_PATIENTS} patients)\n"
            );
            out += "rule set  questions/target  ρ/target  targets  right  accuracy  chance  far-above-chance bound  expected Φ(√(ρ/4))\n";
            for m in &self.privacy {
                let opt = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.2}"));
                out += &format!(
                    "{:<9} {:>16}  {:>8}  {:>7}  {:>5}  {:>8.2}  {:>6.2}  {:>22.2}  {:>17}\n",
                    m.rule_set,
                    m.questions_per_target,
                    opt(m.rho_per_target),
                    m.targets,
                    m.right,
                    m.accuracy,
                    m.chance,
                    m.bound,
                    opt(m.theory)
                );
            }
        }
        for r in &self.reconstruction {
            out += &format!(
                "\nreconstruction under {} ({} members, mean of {} attacks, guessing {:.3}; above guessing from {:?} counts)\ncounts  accuracy\n",
                r.rule_set,
                r.members,
                r.runs,
                r.base_rate,
                r.passes(r.base_rate)
            );
            for p in &r.points {
                out += &format!("{:>6}  {:>8.3}\n", p.queries, p.accuracy);
            }
        }
        if !self.peak_memory_per_run {
            out += "\n(peak memory could not be reset between runs: figures are the process's peak so far)\n";
        }
        out
    }
}
