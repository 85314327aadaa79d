//! Writes one practice's extract: its three tables as the practice system
//! would export them, plus this practice's share of the truth files.
//!
//! Bad rows are *extra* rows, injected after good ones (a mistyped copy,
//! a half-exported line): every real row stays good, so the truth about
//! what should be collected is simple, and every bad row is listed with its
//! line and reason in `truth/bad_rows.csv`. Type 1 code rows are never
//! corrupted; a collector that could not read a dissent would have to fail
//! safe, and the generator's job is to test the other paths.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::linked::{Parts, Subject};
use super::person::{
    ClinicalEvent, ETHNICITIES, FreeText, Issue, Kind, Person, Registration, Type1Pattern, World,
    age_band,
};
use super::population::Layout;
use super::rng::{Rng, Stream};
use super::tally::{BAD_REASONS, Tally};
use crate::calendar::DateTable;
use crate::optout::type1::Type1Code;

/// Share of good rows followed by an injected bad row.
pub const BAD_ROW_SHARE: f64 = 0.002;

pub const PATIENTS_HEADER: &str = "nhs_number,given_name,family_name,date_of_birth,sex,postcode,ethnicity,registration_start,registration_end,date_of_death";
pub const EVENTS_HEADER: &str = "nhs_number,date,snomedct_code,numeric_value,free_text";
pub const MEDICATIONS_HEADER: &str = "nhs_number,date,dmd_code,quantity,free_text";
pub const TRUTH_HEADER: &str = "nhs_number,practice,registered_at_extract,type1_at_extract,ndoo,deceased,age_band,sex,ethnicity,imd_decile,type1_anywhere,lsoa_code";

const MALFORMED_DATES: [&str; 4] = ["2021-13-45", "31/12/2020", "20200101", "not recorded"];

/// One CSV output with a line counter (the header is line 1).
struct Csv {
    w: BufWriter<File>,
    line: u64,
}

impl Csv {
    fn create(path: &Path, header: &str) -> io::Result<Csv> {
        let mut w = BufWriter::with_capacity(256 * 1024, File::create(path)?);
        w.write_all(header.as_bytes())?;
        w.write_all(b"\n")?;
        Ok(Csv { w, line: 1 })
    }

    fn write(&mut self, row: &[u8]) -> io::Result<u64> {
        self.w.write_all(row)?;
        self.line += 1;
        Ok(self.line)
    }

    fn finish(self) -> io::Result<()> {
        let file = self.w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    }
}

/// A row's fields, kept apart so a bad copy can be made by changing one.
#[derive(Default)]
struct Fields {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Fields {
    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    fn end(&mut self) {
        self.ends.push(self.bytes.len());
    }

    fn push(&mut self, field: &[u8]) {
        self.bytes.extend_from_slice(field);
        self.end();
    }

    fn push_int(&mut self, n: i64) {
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }

    fn field(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    /// Writes the row (with a newline) into `out`, corrupted as `bad` says.
    fn render(&self, out: &mut Vec<u8>, bad: Option<(usize, &[u8])>, date_field: usize) {
        out.clear();
        let n = self.ends.len();
        let (count, extra) = match bad {
            Some((3, _)) if n > 2 && self.bytes.len().is_multiple_of(2) => (n - 1, false),
            Some((3, _)) => (n, true),
            _ => (n, false),
        };
        for i in 0..count {
            if i > 0 {
                out.push(b',');
            }
            match bad {
                Some((0 | 1, replacement)) if i == 0 => out.extend_from_slice(replacement),
                Some((2, replacement)) if i == date_field => out.extend_from_slice(replacement),
                _ => out.extend_from_slice(self.field(i)),
            }
        }
        if extra {
            out.extend_from_slice(b",EXTRA");
        }
        out.push(b'\n');
    }
}

/// Decides which good rows get a bad twin, and what is wrong with it.
struct BadRows {
    rng: Rng,
}

impl BadRows {
    fn next(&mut self) -> Option<usize> {
        self.rng
            .chance(BAD_ROW_SHARE)
            .then(|| self.rng.below(BAD_REASONS.len() as u64) as usize)
    }
}

/// Reusable buffers for one worker thread.
#[derive(Default)]
pub struct Scratch {
    fields: Fields,
    line: Vec<u8>,
    text: Vec<u8>,
    events: Vec<ClinicalEvent>,
    issues: Vec<Issue>,
}

struct Out<'a> {
    patients: Csv,
    events: Csv,
    medications: Csv,
    truth: BufWriter<File>,
    ndoo: BufWriter<File>,
    bad: BufWriter<File>,
    code: &'a str,
    bad_rows: BadRows,
    linked: Parts<BufWriter<File>>,
    tally: Tally,
}

/// Writes practice `q`'s files into `practice_dir` and its parts of the
/// national files into `parts` (named by practice index, joined in order later).
pub fn write_practice(
    world: &World,
    dates: &DateTable,
    q: usize,
    practice_dir: &Path,
    parts: &Path,
    scratch: &mut Scratch,
    progress: &dyn Fn(u64),
) -> io::Result<Tally> {
    let layout = world.layout;
    std::fs::create_dir_all(practice_dir)?;
    let part = |ext: &str| -> io::Result<BufWriter<File>> {
        Ok(BufWriter::new(File::create(
            parts.join(format!("{q:06}.{ext}")),
        )?))
    };
    let mut out = Out {
        patients: Csv::create(&practice_dir.join("patients.csv"), PATIENTS_HEADER)?,
        events: Csv::create(&practice_dir.join("clinical_events.csv"), EVENTS_HEADER)?,
        medications: Csv::create(&practice_dir.join("medications.csv"), MEDICATIONS_HEADER)?,
        truth: part("truth")?,
        ndoo: part("ndoo")?,
        bad: part("bad")?,
        code: &layout.practices[q].code,
        bad_rows: BadRows {
            rng: Rng::new(layout.seed, Stream::BadRows, q as u64),
        },
        linked: Parts::new(part("apcs")?, part("ons")?, part("linkage")?),
        tally: Tally::default(),
    };

    let own = layout.persons_of(q);
    let mut done = 0u64;
    for i in own.clone() {
        let person = generate(world, scratch, i, q, layout.is_mover(i));
        count_person(world, &person, &mut out.tally);
        if person.ndoo {
            out.ndoo.write_all(person.nhs.as_bytes())?;
            out.ndoo.write_all(b"\n")?;
        }
        emit(world, dates, &person, 0, &mut out, scratch)?;
        let imd = layout.lsoas[person.current().lsoa as usize].imd_decile;
        out.linked.emit(
            layout.seed,
            dates,
            &Subject::of(&person, imd),
            world.window_start,
            world.extract,
        )?;
        recycle(person, scratch);
        done += 1;
        if done.is_multiple_of(1024) {
            progress(1024);
        }
    }
    progress(done % 1024);

    // Movers who came from here: their earlier registration belongs to this extract.
    if layout.practices.len() > 1 {
        let next = (q + 1) % layout.practices.len();
        for i in layout.persons_of(next).filter(|i| layout.is_mover(*i)) {
            let person = generate(world, scratch, i, next, true);
            emit(world, dates, &person, 1, &mut out, scratch)?;
            recycle(person, scratch);
        }
    }

    out.patients.finish()?;
    out.events.finish()?;
    out.medications.finish()?;
    let linked = out.linked;
    for mut w in [
        out.truth,
        out.ndoo,
        out.bad,
        linked.apcs,
        linked.deaths,
        linked.linkage,
    ] {
        w.flush()?;
    }
    out.tally.linked = linked.tally;
    Ok(out.tally)
}

fn generate(world: &World, scratch: &mut Scratch, i: u64, q: usize, mover: bool) -> Person {
    let events = std::mem::take(&mut scratch.events);
    let issues = std::mem::take(&mut scratch.issues);
    Person::generate(world, i, q, mover, events, issues)
}

fn recycle(person: Person, scratch: &mut Scratch) {
    scratch.events = person.events;
    scratch.issues = person.issues;
}

/// Person-level counts, made once per person (at their current practice).
fn count_person(world: &World, p: &Person, t: &mut Tally) {
    t.persons += 1;
    let age = p.age_at_extract(world.extract);
    if age >= 18 {
        t.adults += 1;
        for (n, has) in t.conditions.iter_mut().zip(p.conditions) {
            *n += u64::from(has);
        }
    }
    t.movers += u64::from(p.regs[1].is_some());
    t.deaths += u64::from(p.died.is_some());
    t.deregistered += u64::from(p.died.is_none() && p.current().end.is_some());
    t.ndoo_persons += u64::from(p.ndoo);
    let anywhere = p.type1_state(None);
    t.type1_persons_with_codes += u64::from(anywhere.has_codes());
    t.type1_opted_out_persons += u64::from(anywhere.dissents());
    if p.type1 != Type1Pattern::None {
        t.type1_patterns[p.type1 as usize] += 1;
    }
    for e in &p.events {
        if let Kind::Sensitive(c) = e.kind {
            t.sensitive_events[c as usize] += 1;
        }
    }
}

fn bool_text(b: bool) -> &'static [u8] {
    if b { b"true" } else { b"false" }
}

/// Writes the rows that registration `slot` of `person` holds.
fn emit(
    world: &World,
    dates: &DateTable,
    p: &Person,
    slot: u8,
    out: &mut Out,
    s: &mut Scratch,
) -> io::Result<()> {
    let Some(reg) = p.regs[slot as usize] else {
        return Ok(());
    };
    let nhs = p.nhs.as_bytes();
    let t1 = p.type1_state(Some(slot)).dissents();
    let t = &mut out.tally;
    t.registrations += 1;
    t.registered_at_extract += u64::from(reg.end.is_none());
    t.type1_opted_out_registrations += u64::from(t1);
    t.expected_patients_out += u64::from(!t1);

    // Truth row.
    let age = p.age_at_extract(world.extract);
    let imd = world.layout.lsoas[reg.lsoa as usize].imd_decile;
    let f = &mut s.fields;
    f.clear();
    f.push(nhs);
    f.push(out.code.as_bytes());
    f.push(bool_text(reg.end.is_none()));
    f.push(bool_text(t1));
    f.push(bool_text(p.ndoo));
    f.push(bool_text(p.died.is_some()));
    f.push(age_band(age).as_bytes());
    f.push(p.sex.code().as_bytes());
    f.push(ETHNICITIES[p.ethnicity].as_bytes());
    f.push_int(i64::from(imd));
    f.push(bool_text(p.type1_state(None).dissents()));
    Layout::lsoa_code(reg.lsoa, &mut f.bytes);
    f.end();
    f.render(&mut s.line, None, 0);
    out.truth.write_all(&s.line)?;

    // Patient row.
    let f = &mut s.fields;
    f.clear();
    f.push(nhs);
    f.push(p.given.as_bytes());
    f.push(p.family.as_bytes());
    f.push(dates.get(p.born));
    f.push(p.sex.code().as_bytes());
    Layout::postcode(reg.lsoa, reg.postcode, &mut f.bytes);
    f.end();
    f.push(ETHNICITIES[p.ethnicity].as_bytes());
    f.push(dates.get(reg.start));
    f.push(reg.end.map_or(&b""[..], |d| dates.get(d)));
    // The previous practice was never told of a later death.
    f.push(if slot == 0 {
        p.died.map_or(&b""[..], |d| dates.get(d))
    } else {
        b""
    });
    write_row(out, s, 0, 3, nhs, !t1, true)?;

    for e in p.events.iter().filter(|e| e.slot == slot) {
        let f = &mut s.fields;
        f.clear();
        f.push(nhs);
        f.push(dates.get(e.day));
        f.push(match e.kind {
            Kind::Type1(Type1Code::Dissent) => world.dissent_code.as_bytes(),
            Kind::Type1(Type1Code::Withdrawn) => world.withdrawn_code.as_bytes(),
            _ => e.code.as_bytes(),
        });
        match e.value {
            Some(v) if v.decimals == 0 => f.push_int(i64::from(v.tenths / 10)),
            Some(v) => {
                let b = &mut f.bytes;
                b.extend_from_slice(itoa::Buffer::new().format(v.tenths / 10).as_bytes());
                b.push(b'.');
                b.push(b'0' + (v.tenths % 10) as u8);
                f.end();
            }
            None => f.end(),
        }
        push_text(f, &mut s.text, e.text, 0, p, &reg);
        out.tally.free_text_rows[0] += u64::from(e.text.is_some());
        let corruptible = !matches!(e.kind, Kind::Type1(_));
        write_row(out, s, 1, 1, nhs, !t1, corruptible)?;
    }

    for m in p.issues.iter().filter(|m| m.slot == slot) {
        let f = &mut s.fields;
        f.clear();
        f.push(nhs);
        f.push(dates.get(m.day));
        f.push(m.med.code.as_bytes());
        f.push_int(i64::from(m.med.quantity));
        push_text(f, &mut s.text, m.text, 1, p, &reg);
        out.tally.free_text_rows[1] += u64::from(m.text.is_some());
        write_row(out, s, 2, 1, nhs, !t1, true)?;
    }
    Ok(())
}

/// Writes the good row in `s.fields` to table `table`, and perhaps a bad twin.
fn write_row(
    out: &mut Out,
    s: &mut Scratch,
    table: usize,
    date_field: usize,
    nhs: &[u8; 10],
    leaves: bool,
    corruptible: bool,
) -> io::Result<()> {
    s.fields.render(&mut s.line, None, date_field);
    let csv = match table {
        0 => &mut out.patients,
        1 => &mut out.events,
        _ => &mut out.medications,
    };
    csv.write(&s.line)?;
    out.tally.rows[table] += 1;
    out.tally.bytes += s.line.len() as u64;
    out.tally.expected_rows_out[table] += u64::from(leaves);
    if !corruptible {
        return Ok(());
    }
    let Some(reason) = out.bad_rows.next() else {
        return Ok(());
    };
    let mut wrong = *nhs;
    let replacement: &[u8] = match reason {
        0 => {
            // Any other check digit makes the number invalid.
            wrong[9] = b'0' + (wrong[9] - b'0' + 1 + out.bad_rows.rng.below(9) as u8) % 10;
            &wrong
        }
        1 => b"",
        2 => MALFORMED_DATES[out.bad_rows.rng.below(MALFORMED_DATES.len() as u64) as usize]
            .as_bytes(),
        _ => b"",
    };
    s.fields
        .render(&mut s.line, Some((reason, replacement)), date_field);
    let line = csv.write(&s.line)?;
    out.tally.rows[table] += 1;
    out.tally.bytes += s.line.len() as u64;
    out.tally.bad_by_table[table] += 1;
    out.tally.bad_by_reason[reason] += 1;
    writeln!(
        out.bad,
        "{},{},{line},{}",
        out.code,
        super::tally::TABLES[table],
        BAD_REASONS[reason]
    )
}

/// Appends the free-text field, quoted because it may hold commas.
fn push_text(
    f: &mut Fields,
    text: &mut Vec<u8>,
    free: Option<FreeText>,
    table: u8,
    p: &Person,
    reg: &Registration,
) {
    let Some(free) = free else {
        f.end();
        return;
    };
    text.clear();
    let mut postcode = Vec::with_capacity(8);
    Layout::postcode(reg.lsoa, reg.postcode, &mut postcode);
    let postcode = String::from_utf8_lossy(&postcode);
    let (given, family, relative) = (p.given, p.family, free.relative);
    let _ = match (table, free.template) {
        (0, 0) => write!(text, "Seen with {relative} {family}, lives at {postcode}"),
        (0, 1) => write!(text, "{given} {family} reports symptoms improving"),
        (0, 2) => write!(
            text,
            "Telephone call from {relative} {family} about {given}"
        ),
        (0, _) => write!(text, "Letter sent to {given} {family}, {postcode}"),
        (_, 0) => write!(text, "Collected by {relative} {family}"),
        (_, _) => write!(text, "Deliver to {given} {family} at {postcode}"),
    };
    f.bytes.push(b'"');
    f.bytes.extend_from_slice(text);
    f.bytes.push(b'"');
    f.end();
}
