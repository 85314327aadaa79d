//! `gpdp synth`: realistic, deterministic synthetic GP extracts with a ground
//! truth to audit against (docs/design.md §2).
//!
//! The flow: [`population`] lays out practices, areas and NHS numbers;
//! [`person`] generates each person's record as a pure function of the seed;
//! [`practice`] writes one practice's extract and its share of the truth.
//! Practices are written in parallel (one worker per core) and the national
//! files are joined in practice order, so the output is byte-identical for a
//! seed whatever the thread count. Memory stays bounded: one person at a time
//! per worker, plus four bytes of NHS-number layout per person.
//!
//! Everything is written into a hidden staging directory beside `--out` and
//! renamed into place at the end: an interrupted run leaves nothing behind
//! that looks like an extract.

pub mod codelists;
pub mod linked;
pub mod names;
pub mod person;
pub mod population;
pub mod practice;
pub mod rng;
pub mod tally;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{Datelike, NaiveDate};
use serde_json::json;

use self::codelists::CodeLists;
use self::person::World;
use self::population::Layout;
use self::practice::{Scratch, write_practice};
use self::tally::Tally;
use crate::calendar::{DateTable, day_of, year_start};
use crate::error::{Classify, ExitStatus};
use crate::policy::CollectionPolicy;
use crate::progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{} already exists and is not empty; choose a new directory (gpdp synth never overwrites data)", .0.display())]
    OutputNotEmpty(PathBuf),
    #[error("cannot write to {}: {source}", path.display())]
    OutputUnwritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("embedded code lists are incomplete: {0}")]
    CodeLists(String),
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Classify for SynthError {
    fn exit_status(&self) -> ExitStatus {
        match self {
            SynthError::InvalidArgument(_)
            | SynthError::OutputNotEmpty(_)
            | SynthError::OutputUnwritable { .. } => ExitStatus::BadInput,
            SynthError::CodeLists(_) | SynthError::Io { .. } => ExitStatus::Internal,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub out: PathBuf,
    pub practices: u32,
    pub patients: u64,
    pub seed: u64,
    pub start_year: i32,
    pub extract_date: NaiveDate,
    pub threads: usize,
    pub policy: CollectionPolicy,
}

pub const DEFAULT_START_YEAR: i32 = 2018;
pub const DEFAULT_EXTRACT_DATE: &str = "2026-03-31";
/// At most this many practices (ODS-like codes are a letter and five digits).
pub const MAX_PRACTICES: u32 = 99_999;

/// What a run produced.
#[derive(Debug)]
pub struct SynthReport {
    pub out: PathBuf,
    pub tally: Tally,
    pub elapsed: Duration,
    pub warnings: Vec<String>,
}

impl SynthReport {
    pub fn rows_per_second(&self) -> f64 {
        self.tally.total_rows() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Removes the staging directory unless the run completed.
struct Staging {
    path: PathBuf,
    done: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_owned(),
        source,
    }
}

pub fn run(opts: &SynthOptions, progress: &Progress) -> Result<SynthReport, SynthError> {
    let started = Instant::now();
    check_options(opts)?;
    let lists = CodeLists::load().map_err(SynthError::CodeLists)?;
    let staging = prepare_output(&opts.out)?;
    let mut staging = Staging {
        path: staging,
        done: false,
    };
    let root = staging.path.clone();

    let mut warnings = Vec::new();
    let capacity = population::test_range_capacity();
    if opts.patients > capacity {
        warnings.push(format!(
            "the 999 test range holds {capacity} valid NHS numbers; the other {} patients have numbers starting 998 or lower, which are not issued in England but are not a documented test range",
            opts.patients - capacity
        ));
    }

    progress.stage("laying out practices and NHS numbers");
    let layout = Layout::new(opts.seed, opts.practices, opts.patients);
    let window_start = year_start(opts.start_year).unwrap_or_default();
    let extract = day_of(opts.extract_date);
    let world = World {
        layout: &layout,
        lists: &lists,
        window_start,
        extract,
        gpdpr_start: day_of(NaiveDate::from_ymd_opt(2021, 5, 12).unwrap_or_default()),
        gpdpr_end: day_of(NaiveDate::from_ymd_opt(2021, 9, 1).unwrap_or_default()),
        dissent_code: &opts.policy.type1.dissent[0],
        withdrawn_code: &opts.policy.type1.withdrawn[0],
    };
    let dates = DateTable::new(extract - 110 * 366, extract + 1);

    for dir in [
        "practices",
        "national",
        "reference",
        "truth",
        "linked",
        ".parts",
    ] {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).map_err(io_at(&d))?;
    }
    write_reference(&layout, &root.join("reference/postcode_lsoa.csv"))?;

    let mut tally = write_practices(&world, &dates, &root, opts, progress)?;
    progress.stage("people in provider data only");
    let n = layout.practices.len();
    tally.linked.merge(&write_unregistered(
        &world,
        &dates,
        &root.join(".parts"),
        n,
    )?);

    progress.stage("joining national files");
    join_national(&root, n)?;

    let elapsed = started.elapsed();
    write_summary(&root, opts, &world, &tally)?;

    // Swap into place: the empty target (if any) goes, the staging dir takes its name.
    if opts.out.exists() {
        std::fs::remove_dir(&opts.out).map_err(io_at(&opts.out))?;
    }
    std::fs::rename(&root, &opts.out).map_err(io_at(&opts.out))?;
    staging.done = true;
    Ok(SynthReport {
        out: opts.out.clone(),
        tally,
        elapsed,
        warnings,
    })
}

/// Refuses options that cannot make a population, before anything is written.
fn check_options(opts: &SynthOptions) -> Result<(), SynthError> {
    let invalid = |m: String| Err(SynthError::InvalidArgument(m));
    if opts.practices == 0 {
        return invalid("--practices must be at least 1".into());
    }
    if opts.practices > MAX_PRACTICES {
        return invalid(format!("--practices must be at most {MAX_PRACTICES}"));
    }
    if opts.patients < u64::from(opts.practices) {
        return invalid(format!(
            "--patients ({}) must be at least --practices ({}): every practice needs a patient",
            opts.patients, opts.practices
        ));
    }
    if opts.patients > 50_000_000 {
        return invalid("--patients must be at most 50,000,000".into());
    }
    let extract_year = opts.extract_date.year();
    if !(1950..extract_year).contains(&opts.start_year) {
        return invalid(format!(
            "--start-year must be between 1950 and {} (a year before the extract date {})",
            extract_year - 1,
            opts.extract_date
        ));
    }
    Ok(())
}

/// Writes every practice's extract, in parallel (each worker takes the next
/// practice index), and adds up what was written. The first error stops the
/// other workers at their next practice.
fn write_practices(
    world: &World,
    dates: &DateTable,
    root: &Path,
    opts: &SynthOptions,
    progress: &Progress,
) -> Result<Tally, SynthError> {
    let layout = world.layout;
    let bar = progress.bar(opts.patients, "patients");
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let tallies: Mutex<Vec<(usize, Tally)>> = Mutex::new(Vec::new());
    let first_error: Mutex<Option<SynthError>> = Mutex::new(None);
    let threads = opts.threads.clamp(1, layout.practices.len());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut scratch = Scratch::default();
                let tick = |n: u64| bar.inc(n);
                loop {
                    let q = next.fetch_add(1, Ordering::Relaxed);
                    if q >= layout.practices.len() || failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let dir = root.join("practices").join(&layout.practices[q].code);
                    match write_practice(
                        world,
                        dates,
                        q,
                        &dir,
                        &root.join(".parts"),
                        &mut scratch,
                        &tick,
                    ) {
                        Ok(t) => tallies
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((q, t)),
                        Err(source) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(SynthError::Io { path: dir, source });
                        }
                    }
                }
            });
        }
    });
    bar.finish();
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let mut tally = Tally::default();
    for (_, t) in tallies.into_inner().unwrap_or_else(|e| e.into_inner()) {
        tally.merge(&t);
    }
    Ok(tally)
}

/// Joins the per-practice parts (`n` practices) into the national files —
/// linked provider data, the truth, the National Data Opt-out list and the
/// bad rows' record — and removes the parts.
fn join_national(root: &Path, n: usize) -> Result<(), SynthError> {
    join_linked(root, n + 1)?;
    join_parts(
        root,
        "truth",
        n,
        &root.join("truth/patients.csv"),
        practice::TRUTH_HEADER,
    )?;
    join_parts(
        root,
        "ndoo",
        n,
        &root.join("national/ndoo.csv"),
        "nhs_number",
    )?;
    join_parts(
        root,
        "bad",
        n,
        &root.join("truth/bad_rows.csv"),
        "practice,table,line,reason",
    )?;
    let parts = root.join(".parts");
    std::fs::remove_dir_all(&parts).map_err(io_at(&parts))
}

/// `truth/summary.json`: how the population was generated and what it holds.
fn write_summary(
    root: &Path,
    opts: &SynthOptions,
    world: &World,
    tally: &Tally,
) -> Result<(), SynthError> {
    let summary = json!({
        "generator": {
            "name": "gpdp synth",
            "version": env!("CARGO_PKG_VERSION"),
            "seed": opts.seed,
            "practices": opts.practices,
            "patients": opts.patients,
            "start_year": opts.start_year,
            "extract_date": opts.extract_date.to_string(),
            "collection_policy_sha256": opts.policy.sha256,
            "type1_codes": {"dissent": world.dissent_code, "withdrawn": world.withdrawn_code},
            "bad_row_share": practice::BAD_ROW_SHARE,
            "mover_share": population::MOVER_SHARE,
        },
        "practice_codes": world.layout.practices.iter().map(|p| p.code.as_str()).collect::<Vec<_>>(),
        "counts": tally.to_json(),
    });
    let path = root.join("truth/summary.json");
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default() + "\n";
    std::fs::write(&path, text).map_err(io_at(&path))
}

/// Checks that `out` is absent or an empty directory and creates the
/// staging directory beside it.
fn prepare_output(out: &Path) -> Result<PathBuf, SynthError> {
    if out.exists() {
        let mut entries =
            std::fs::read_dir(out).map_err(|source| SynthError::OutputUnwritable {
                path: out.to_owned(),
                source,
            })?;
        if entries.next().is_some() {
            return Err(SynthError::OutputNotEmpty(out.to_owned()));
        }
    }
    let name = out.file_name().ok_or_else(|| {
        SynthError::InvalidArgument(format!("--out {} has no directory name", out.display()))
    })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let staging = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::create_dir_all(&staging).map_err(|source| SynthError::OutputUnwritable {
        path: out.to_owned(),
        source,
    })?;
    Ok(staging)
}

fn write_reference(layout: &Layout, path: &Path) -> Result<(), SynthError> {
    let write = || -> io::Result<()> {
        let mut w = io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(w, "postcode,lsoa_code,imd_decile")?;
        let mut line = Vec::new();
        for (l, lsoa) in layout.lsoas.iter().enumerate() {
            for k in 0..lsoa.postcodes {
                line.clear();
                Layout::postcode(l as u32, k, &mut line);
                line.push(b',');
                Layout::lsoa_code(l as u32, &mut line);
                line.push(b',');
                line.extend_from_slice(itoa::Buffer::new().format(lsoa.imd_decile).as_bytes());
                line.push(b'\n');
                w.write_all(&line)?;
            }
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().map_err(io_at(path))
}

/// The provider-only people's share of the linked files: part `n`, after
/// the practices'.
fn write_unregistered(
    world: &World,
    dates: &DateTable,
    parts: &Path,
    n: usize,
) -> Result<linked::LinkedTally, SynthError> {
    let layout = world.layout;
    let part = |ext: &str| -> Result<io::BufWriter<std::fs::File>, SynthError> {
        let path = parts.join(format!("{n:06}.{ext}"));
        Ok(io::BufWriter::new(
            std::fs::File::create(&path).map_err(io_at(&path))?,
        ))
    };
    let mut out = linked::Parts::new(part("apcs")?, part("ons")?, part("linkage")?);
    let write = |out: &mut linked::Parts<io::BufWriter<std::fs::File>>| -> io::Result<()> {
        for i in layout.unregistered() {
            let s = linked::Subject::unregistered(
                layout.seed,
                i,
                layout.nhs_number(i),
                (world.window_start, world.extract),
            );
            out.emit(layout.seed, dates, &s, world.window_start, world.extract)?;
        }
        out.apcs.flush()?;
        out.deaths.flush()?;
        out.linkage.flush()
    };
    write(&mut out).map_err(io_at(parts))?;
    Ok(out.tally)
}

/// Joins the linked parts of `parts` writers (practices, then the
/// provider-only people) into `linked/apcs.csv`, `linked/ons_deaths.csv`
/// and `truth/linkage.csv`, turning each part's local line numbers into
/// the joined files' data line numbers.
fn join_linked(root: &Path, parts: usize) -> Result<(), SynthError> {
    join_parts(
        root,
        "apcs",
        parts,
        &root.join("linked/apcs.csv"),
        linked::APCS_HEADER,
    )?;
    join_parts(
        root,
        "ons",
        parts,
        &root.join("linked/ons_deaths.csv"),
        &linked::ons_deaths_header(),
    )?;
    let dest = root.join("truth/linkage.csv");
    let join = || -> io::Result<()> {
        use std::io::BufRead;
        let mut w = io::BufWriter::new(std::fs::File::create(&dest)?);
        writeln!(w, "{}", linked::LINKAGE_HEADER)?;
        // Lines already joined, per source.
        let (mut apcs, mut ons) = (0u64, 0u64);
        for q in 0..parts {
            let part = root.join(".parts").join(format!("{q:06}.linkage"));
            let (mut last_apcs, mut last_ons) = (0u64, 0u64);
            for line in io::BufReader::new(std::fs::File::open(part)?).lines() {
                let line = line?;
                let mut fields = line.splitn(3, ',');
                let (Some(source), Some(n), Some(rest)) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    return Err(io::Error::other("a malformed linkage part"));
                };
                let n: u64 = n.parse().map_err(io::Error::other)?;
                let offset = if source == "apcs" {
                    last_apcs = n;
                    apcs
                } else {
                    last_ons = n;
                    ons
                };
                writeln!(w, "{source},{},{rest}", offset + n)?;
            }
            apcs += last_apcs;
            ons += last_ons;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    join().map_err(io_at(&dest))
}

fn join_parts(
    root: &Path,
    ext: &str,
    practices: usize,
    dest: &Path,
    header: &str,
) -> Result<(), SynthError> {
    let join = || -> io::Result<()> {
        let mut w = io::BufWriter::new(std::fs::File::create(dest)?);
        writeln!(w, "{header}")?;
        for q in 0..practices {
            let mut part = std::fs::File::open(root.join(".parts").join(format!("{q:06}.{ext}")))?;
            io::copy(&mut part, &mut w)?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    join().map_err(io_at(dest))
}
