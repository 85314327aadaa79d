//! Provider extracts with truth: hospital spells and death registrations
//! (docs/design.md §9), consistent with the GP population.
//!
//! `linked/apcs.csv` holds hospital spells as NHS England's SUS / HES APC
//! (ehrQL's `apcs` columns; ICD-10 and OPCS-4 codes without dots, several
//! codes in one field separated by `;`), `linked/ons_deaths.csv` ONS death
//! registrations (ehrQL's `ons_deaths` columns). Both are written per person
//! at their current practice, from the person's own record, so they are a
//! pure function of the seed, like the GP extracts:
//!
//! - **Admissions** arrive at a yearly rate that rises with age and with each
//!   chronic condition the GP record holds; the spell's diagnoses follow the
//!   conditions (a COPD exacerbation, a diabetic complication) or a general
//!   list. **Emergency** admissions are more likely in deprived areas (IMD
//!   decile 1 has 1.7× the emergency share of decile 10) and at older ages;
//!   women 16–45 have maternity spells. A death in hospital ends a spell with
//!   discharge destination 79.
//! - **Deaths**: every death the GP record holds is registered with ONS after
//!   a delay (days, or months when a coroner is involved), so deaths shortly
//!   before the extract date are **not yet registered**. 4% of registered
//!   dates differ from the GP's (3% by a few days, 1% by a month); 0.2% of
//!   people alive in the GP record have an ONS death (the practice was
//!   never told).
//! - **People registered at no practice in the extract** (2% on top of the
//!   registered population: visitors, people never registered, registered
//!   elsewhere) have spells and deaths too; they can never link.
//! - **Linkage failures**: a provider record's NHS number is missing or
//!   invalid more often for young adults, for ethnic minority groups, in
//!   deprived areas, in emergency admissions, and most of all for people not
//!   registered with a GP — the groups in which HES's missed matches
//!   concentrate (Hagger-Johnson et al., BMJ Open 2015;5:e008118, linkage
//!   errors between paediatric intensive care records and HES, more common
//!   for ethnic minority groups; Harron et al., Big Data & Society 2017, on
//!   the bias linkage error brings). The base rates (1.2% of
//!   spells, 0.4% of deaths) are of the order of HES APC's invalid or
//!   missing NHS numbers in NHS Digital's data quality reports; the
//!   multipliers are illustrative.
//!
//! `truth/linkage.csv` says, for every provider record (`line` is the data
//! line in its file, the header not counted), whose it really is, whether it
//! should link to a GP patient and why not — with the person's age band,
//! sex, ethnicity and IMD decile, so linkage bias can be measured by group.
//!
//! Codes (ICD-10 5th edition, WHO 2016 / NHS Digital 2019 edition; OPCS-4.9,
//! NHS Digital) are a short illustrative list, not a clinical codelist.

use std::io::{self, Write};

use super::person::{ETHNICITIES, Person, Sex, age_band};
use super::rng::{Rng, Stream};
use crate::calendar::{DateTable, Day};
use crate::nhs_number::NhsNumber;

pub const APCS_HEADER: &str = "nhs_number,apcs_ident,admission_date,discharge_date,admission_method,primary_diagnosis,all_diagnoses,all_procedures,days_in_critical_care,discharge_destination";
pub const LINKAGE_HEADER: &str =
    "source,line,person,linkable,reason,age_band,sex,ethnicity,imd_decile";
/// Why a provider record does or does not link (`truth/linkage.csv`).
pub const REASONS: [&str; 4] = [
    "linked",
    "not_registered_with_gp",
    "missing_nhs_number",
    "invalid_nhs_number",
];
pub const PLACES: [&str; 6] = [
    "Hospital",
    "Home",
    "Care Home",
    "Hospice",
    "Elsewhere",
    "Other communal establishment",
];
const PLACE_WEIGHTS: [f64; 6] = [0.44, 0.28, 0.21, 0.05, 0.015, 0.005];

/// The group columns of `truth/linkage.csv`, in [`LinkageTruth::groups`] order.
pub const LINKAGE_GROUPS: [&str; 4] = ["age_band", "sex", "ethnicity", "imd_decile"];

/// One row of `truth/linkage.csv`, as the audit and the report read it.
pub struct LinkageTruth {
    pub source: String,
    /// The person the record is about.
    pub person: NhsNumber,
    /// One of [`REASONS`].
    pub reason: String,
    /// The person's age band, sex, ethnicity and IMD decile.
    pub groups: [String; 4],
}

impl LinkageTruth {
    /// Whether the provider recorded the NHS number validly (the record is
    /// stored by `gpdp link`, linkable or not).
    pub fn stored(&self) -> bool {
        matches!(self.reason.as_str(), "linked" | "not_registered_with_gp")
    }
}

/// Reads `truth/linkage.csv` by its header's column names.
pub fn read_linkage_truth(
    path: &std::path::Path,
) -> Result<Vec<LinkageTruth>, crate::error::BadInput> {
    let bad = |m: String| crate::error::BadInput(format!("the truth {}: {m}", path.display()));
    let mut reader = csv::Reader::from_path(path).map_err(|e| bad(e.to_string()))?;
    let headers = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
    let at = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| bad(format!("no column {name}")))
    };
    let (source, person, reason) = (at("source")?, at("person")?, at("reason")?);
    let groups = [
        at(LINKAGE_GROUPS[0])?,
        at(LINKAGE_GROUPS[1])?,
        at(LINKAGE_GROUPS[2])?,
        at(LINKAGE_GROUPS[3])?,
    ];
    let mut rows = Vec::new();
    for r in reader.records() {
        let r = r.map_err(|e| bad(e.to_string()))?;
        rows.push(LinkageTruth {
            source: r[source].to_owned(),
            person: NhsNumber::parse(r[person].as_bytes())
                .map_err(|_| bad("a person that is not a valid NHS number".into()))?,
            reason: r[reason].to_owned(),
            groups: groups.map(|g| r[g].to_owned()),
        });
    }
    Ok(rows)
}

/// `nhs_number,date,underlying_cause_of_death,cause_of_death_01 … _15,place`.
pub fn ons_deaths_header() -> String {
    let mut h = String::from("nhs_number,date,underlying_cause_of_death");
    for k in 1..=15 {
        h += &format!(",cause_of_death_{k:02}");
    }
    h + ",place"
}

/// ICD-10 codes the GP record's conditions show up as in hospital, by
/// `Condition` index (diabetes, type 1, type 2, hypertension, asthma, COPD,
/// depression); the first is the one a spell is admitted with.
const CONDITION_ICD10: [&str; 7] = ["E119", "E109", "E119", "I10X", "J459", "J449", "F329"];
/// What an emergency admission for a condition is for.
const CONDITION_EMERGENCY: [&str; 7] = ["E162", "E101", "E162", "I509", "J46X", "J441", "F329"];
/// Emergency diagnoses: (minimum age, code).
const EMERGENCY: [(i32, &str); 10] = [
    (0, "J189"),
    (0, "K359"),
    (0, "A099"),
    (0, "R103"),
    (16, "N390"),
    (16, "R55X"),
    (30, "R074"),
    (35, "I219"),
    (45, "I639"),
    (60, "S720"),
];
/// Elective spells: (ages, sex if only one, primary diagnosis, procedure).
const ELECTIVE: [(std::ops::Range<i32>, Option<Sex>, &str, &str); 9] = [
    (2..40, None, "J350", "F341"),
    (0..200, None, "K409", "T202"),
    (20..200, None, "K802", "J183"),
    (18..200, None, "Z511", "X352"),
    (30..200, Some(Sex::Female), "C509", "B281"),
    (40..200, None, "D126", "H229"),
    (50..200, None, "M179", "W401"),
    (50..200, None, "M169", "W371"),
    (55..200, None, "H251", "C751"),
];
const MATERNITY: [(&str, &str); 2] = [("O800", "R241"), ("O820", "R182")];
/// Underlying causes by age: (minimum age, code).
const CAUSES: [(i32, &str); 10] = [
    (0, "X599"),
    (30, "C349"),
    (40, "I219"),
    (50, "C189"),
    (50, "I639"),
    (60, "I500"),
    (60, "J189"),
    (65, "C61X"),
    (75, "F03X"),
    (75, "J189"),
];

/// Who a provider's records are about: a registered person (from their GP
/// record) or someone registered at no practice in the extract.
pub struct Subject {
    pub index: u64,
    pub nhs: NhsNumber,
    pub sex: Sex,
    pub born: Day,
    pub ethnicity: usize,
    pub imd: u8,
    pub conditions: [bool; 7],
    /// The death the GP record holds (or, unregistered, the true death).
    pub died: Option<Day>,
    pub registered: bool,
}

impl Subject {
    pub fn of(p: &Person, imd: u8) -> Subject {
        Subject {
            index: p.index,
            nhs: p.nhs,
            sex: p.sex,
            born: p.born,
            ethnicity: p.ethnicity,
            imd,
            conditions: p.conditions,
            died: p.died,
            registered: true,
        }
    }

    /// Someone registered at no practice in the extract, index `i` past
    /// the registered population: the layout's NHS number `i`, the rest
    /// drawn from the seed.
    pub fn unregistered(seed: u64, i: u64, nhs: NhsNumber, window: (Day, Day)) -> Subject {
        let mut rng = Rng::new(seed, Stream::Linked, i ^ (1 << 63));
        let age = rng.between(0, 95);
        let born = window.1 - (f64::from(age) * 365.2425) as Day - rng.between(0, 364);
        let died = rng
            .chance(0.03)
            .then(|| rng.between(window.0, window.1 - 1))
            .filter(|d| *d > born);
        Subject {
            index: i,
            nhs,
            sex: if rng.chance(0.5) {
                Sex::Female
            } else {
                Sex::Male
            },
            born,
            ethnicity: rng.weighted(&[0.6, 0.15, 0.1, 0.05, 0.05, 0.05]),
            imd: rng.between(1, 10) as u8,
            conditions: [false; 7],
            died,
            registered: false,
        }
    }

    fn age_on(&self, day: Day) -> i32 {
        ((day - self.born) as f64 / 365.2425).floor() as i32
    }
}

/// Counts for `truth/summary.json`.
#[derive(Debug, Default, Clone)]
pub struct LinkedTally {
    pub unregistered_persons: u64,
    pub spells: u64,
    pub emergency_spells: u64,
    pub deaths_registered: u64,
    pub deaths_not_yet_registered: u64,
    pub death_date_differs: u64,
    pub ons_death_not_in_gp: u64,
    /// Provider records by `REASONS` index, per source (apcs, ons_deaths).
    pub by_reason: [[u64; 4]; 2],
}

impl LinkedTally {
    pub fn merge(&mut self, o: &LinkedTally) {
        self.unregistered_persons += o.unregistered_persons;
        self.spells += o.spells;
        self.emergency_spells += o.emergency_spells;
        self.deaths_registered += o.deaths_registered;
        self.deaths_not_yet_registered += o.deaths_not_yet_registered;
        self.death_date_differs += o.death_date_differs;
        self.ons_death_not_in_gp += o.ons_death_not_in_gp;
        for (a, b) in self.by_reason.iter_mut().zip(&o.by_reason) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let reasons = |a: &[u64; 4]| -> serde_json::Value {
            REASONS
                .iter()
                .zip(a)
                .map(|(r, n)| ((*r).to_owned(), serde_json::json!(n)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        serde_json::json!({
            "unregistered_persons": self.unregistered_persons,
            "apcs_spells": self.spells,
            "apcs_emergency_spells": self.emergency_spells,
            "ons_deaths_registered": self.deaths_registered,
            "gp_deaths_not_yet_registered": self.deaths_not_yet_registered,
            "ons_death_date_differs_from_gp": self.death_date_differs,
            "ons_death_not_in_gp_record": self.ons_death_not_in_gp,
            "apcs_by_reason": reasons(&self.by_reason[0]),
            "ons_deaths_by_reason": reasons(&self.by_reason[1]),
        })
    }
}

/// One practice's (or the unregistered people's) share of the provider
/// files, with data line numbers local to the part (made global when the
/// parts are joined).
pub struct Parts<W: Write> {
    pub apcs: W,
    pub deaths: W,
    pub linkage: W,
    pub apcs_lines: u64,
    pub death_lines: u64,
    pub tally: LinkedTally,
}

impl<W: Write> Parts<W> {
    pub fn new(apcs: W, deaths: W, linkage: W) -> Parts<W> {
        Parts {
            apcs,
            deaths,
            linkage,
            apcs_lines: 0,
            death_lines: 0,
            tally: LinkedTally::default(),
        }
    }

    /// Writes everything the providers hold about `s` up to the extract
    /// date `extract`, over the window from `start`.
    pub fn emit(
        &mut self,
        seed: u64,
        dates: &DateTable,
        s: &Subject,
        start: Day,
        extract: Day,
    ) -> io::Result<()> {
        let mut rng = Rng::new(seed, Stream::Linked, s.index);
        self.tally.unregistered_persons += u64::from(!s.registered);
        // Nothing before birth.
        let start = start.max(s.born);
        let until = s.died.unwrap_or(extract).min(extract);

        // The death first: a death in hospital ends the last spell.
        let place = s.died.map(|_| rng.weighted(&PLACE_WEIGHTS));
        let chronic = s.conditions[3..].iter().filter(|c| **c).count() as f64
            + f64::from(u8::from(s.conditions[0]));
        let rate = yearly_admissions(s.age_on(until))
            * (1.0 + 0.6 * chronic)
            * if s.registered { 1.0 } else { 1.3 };
        let mut day = start + rng.exponential(365.2425 / rate) as Day;
        let mut k = 0u64;
        while day < until && k < 200 {
            let spell = self.spell(&mut rng, s, day, until);
            self.write_spell(&mut rng, dates, s, k, day, &spell)?;
            day = spell.discharge + 1 + rng.exponential(365.2425 / rate) as Day;
            k += 1;
        }
        if let (Some(died), Some(place)) = (s.died, place)
            && place == 0
            && died >= start
        {
            let admitted = died - rng.between(0, 20);
            let spell = Spell {
                method: "21",
                primary: cause(&mut rng, s, died),
                procedure: "",
                discharge: died,
                critical: 0,
                destination: "79",
            };
            self.write_spell(&mut rng, dates, s, k, admitted.max(start), &spell)?;
        }

        // ONS: a registered death, or one the GP record never got.
        let death = match s.died {
            Some(d) => Some(d),
            None if s.registered && rng.chance(0.002) => {
                self.tally.ons_death_not_in_gp += 1;
                Some(rng.between(start, extract - 1))
            }
            None => None,
        };
        if let Some(died) = death.filter(|d| *d >= start) {
            let coroner = rng.chance(0.1);
            let delay = 2 + rng.exponential(if coroner { 120.0 } else { 5.0 }) as Day;
            if died + delay > extract {
                self.tally.deaths_not_yet_registered += u64::from(s.died.is_some());
            } else {
                let shift = match rng.unit() {
                    u if u < 0.03 => rng.between(1, 3) * if rng.chance(0.5) { 1 } else { -1 },
                    u if u < 0.04 => 30,
                    _ => 0,
                };
                self.tally.death_date_differs += u64::from(shift != 0 && s.died.is_some());
                let date = (died + shift).min(extract - 1);
                let place = place.unwrap_or_else(|| rng.weighted(&PLACE_WEIGHTS));
                self.write_death(&mut rng, dates, s, date, place)?;
            }
        }
        Ok(())
    }

    fn spell(&mut self, rng: &mut Rng, s: &Subject, day: Day, until: Day) -> Spell {
        let age = s.age_on(day);
        // Emergency share: 0.30 in the least deprived decile, 1.7× that in the most.
        let deprivation = 1.0 + 0.7 * f64::from(10 - s.imd.clamp(1, 10)) / 9.0;
        let emergency_p = (0.30 * deprivation * if age >= 75 { 1.3 } else { 1.0 }).min(0.9);
        let maternity = s.sex == Sex::Female && (16..=45).contains(&age) && rng.chance(0.15);
        let held: Vec<usize> = (0..7).filter(|c| s.conditions[*c]).collect();
        let (method, primary, procedure, stay) = if maternity {
            let (d, p) = *rng.pick(&MATERNITY);
            (
                if rng.chance(0.8) { "31" } else { "32" },
                d,
                p,
                rng.between(0, 3),
            )
        } else if rng.chance(emergency_p) {
            self.tally.emergency_spells += 1;
            let method = *rng.pick(&["21", "21", "21", "22", "28"]);
            let primary = match held.as_slice() {
                held if !held.is_empty() && rng.chance(0.35) => {
                    CONDITION_EMERGENCY[*rng.pick(held)]
                }
                _ => {
                    let fitting: Vec<&str> = EMERGENCY
                        .iter()
                        .filter(|(min, _)| age >= *min)
                        .map(|(_, c)| *c)
                        .collect();
                    *rng.pick(&fitting)
                }
            };
            let stay = rng.exponential(3.0 + f64::from(age.max(0)) / 15.0) as i32;
            (method, primary, "", stay)
        } else {
            let fitting: Vec<(&str, &str)> = ELECTIVE
                .iter()
                .filter(|(ages, sex, _, _)| ages.contains(&age) && sex.is_none_or(|x| x == s.sex))
                .map(|(_, _, d, p)| (*d, *p))
                .collect();
            let (d, p) = *rng.pick(&fitting);
            let method = *rng.pick(&["11", "11", "11", "12", "13"]);
            let stay = if rng.chance(0.5) {
                0
            } else {
                rng.between(1, 4)
            };
            (method, d, p, stay)
        };
        let discharge = (day + stay as Day).min(until.max(day));
        let critical = if method.starts_with('2') && age > 50 && rng.chance(0.05) {
            rng.between(1, 8).min(stay.max(1))
        } else {
            0
        };
        let destination = match rng.unit() {
            u if age >= 80 && u < 0.10 => "54",
            u if u < 0.13 => "51",
            _ => "19",
        };
        Spell {
            method,
            primary,
            procedure,
            discharge,
            critical,
            destination,
        }
    }

    fn write_spell(
        &mut self,
        rng: &mut Rng,
        dates: &DateTable,
        s: &Subject,
        k: u64,
        admitted: Day,
        spell: &Spell,
    ) -> io::Result<()> {
        let emergency = spell.method.starts_with('2');
        let (number, reason) = recorded_number(rng, s, s.age_on(admitted), 0.012, emergency);
        let mut diagnoses = vec![spell.primary];
        for c in (0..7).filter(|c| s.conditions[*c]) {
            if !diagnoses.contains(&CONDITION_ICD10[c]) && (c != 0 || !s.conditions[1]) {
                diagnoses.push(CONDITION_ICD10[c]);
            }
        }
        let w = &mut self.apcs;
        w.write_all(&number)?;
        write!(w, ",{},", s.index * 1000 + k + 1)?;
        w.write_all(dates.get(admitted))?;
        w.write_all(b",")?;
        w.write_all(dates.get(spell.discharge))?;
        writeln!(
            w,
            ",{},{},{},{},{},{}",
            spell.method,
            spell.primary,
            diagnoses.join(";"),
            spell.procedure,
            spell.critical,
            spell.destination
        )?;
        self.apcs_lines += 1;
        self.tally.spells += 1;
        self.tally.by_reason[0][reason] += 1;
        let line = self.apcs_lines;
        self.truth("apcs", line, s, reason, admitted)
    }

    fn write_death(
        &mut self,
        rng: &mut Rng,
        dates: &DateTable,
        s: &Subject,
        date: Day,
        place: usize,
    ) -> io::Result<()> {
        let (number, reason) = recorded_number(rng, s, s.age_on(date), 0.004, false);
        let underlying = cause(rng, s, date);
        let mut causes = vec![underlying];
        let mut contributing: Vec<&str> = (3..7)
            .filter(|c| s.conditions[*c])
            .map(|c| CONDITION_ICD10[c])
            .collect();
        if s.conditions[0] {
            contributing.push(CONDITION_ICD10[if s.conditions[1] { 1 } else { 2 }]);
        }
        for c in contributing {
            if !causes.contains(&c) {
                causes.push(c);
            }
        }
        let w = &mut self.deaths;
        w.write_all(&number)?;
        w.write_all(b",")?;
        w.write_all(dates.get(date))?;
        write!(w, ",{underlying}")?;
        for k in 0..15 {
            write!(w, ",{}", causes.get(k).copied().unwrap_or(""))?;
        }
        writeln!(w, ",{}", PLACES[place])?;
        self.death_lines += 1;
        self.tally.deaths_registered += 1;
        self.tally.by_reason[1][reason] += 1;
        let line = self.death_lines;
        self.truth("ons_deaths", line, s, reason, date)
    }

    fn truth(
        &mut self,
        source: &str,
        line: u64,
        s: &Subject,
        reason: usize,
        on: Day,
    ) -> io::Result<()> {
        writeln!(
            self.linkage,
            "{source},{line},{},{},{},{},{},{},{}",
            std::str::from_utf8(s.nhs.as_bytes()).unwrap_or(""),
            reason == 0,
            REASONS[reason],
            age_band(s.age_on(on)),
            s.sex.code(),
            ETHNICITIES[s.ethnicity],
            s.imd
        )
    }
}

struct Spell {
    method: &'static str,
    primary: &'static str,
    procedure: &'static str,
    discharge: Day,
    critical: i32,
    destination: &'static str,
}

/// Spells per person-year by age, of the order of England's ~0.3 overall.
fn yearly_admissions(age: i32) -> f64 {
    match age {
        ..16 => 0.08,
        16..30 => 0.08,
        30..40 => 0.10,
        40..50 => 0.12,
        50..60 => 0.18,
        60..70 => 0.28,
        70..80 => 0.45,
        _ => 0.70,
    }
}

/// The underlying cause of death: a condition the record holds, or one
/// common at the person's age.
fn cause(rng: &mut Rng, s: &Subject, on: Day) -> &'static str {
    if s.conditions[5] && rng.chance(0.4) {
        return "J449";
    }
    if s.conditions[0] && rng.chance(0.15) {
        return "E119";
    }
    let age = s.age_on(on);
    let fitting: Vec<&str> = CAUSES
        .iter()
        .filter(|(min, code)| age >= *min && !(*code == "C61X" && s.sex == Sex::Female))
        .map(|(_, c)| *c)
        .collect();
    let chosen: &&'static str = rng.pick(&fitting);
    chosen
}

/// The NHS number as the provider recorded it, and why it will or will not
/// link (an index into `REASONS`).
fn recorded_number(
    rng: &mut Rng,
    s: &Subject,
    age: i32,
    base: f64,
    emergency: bool,
) -> (Vec<u8>, usize) {
    let mut p = base;
    p *= match age {
        16..30 => 2.0,
        30..40 => 1.3,
        _ => 1.0,
    };
    p *= match ETHNICITIES[s.ethnicity] {
        "White" => 1.0,
        "Not stated" => 1.5,
        _ => 2.0,
    };
    p *= if s.imd <= 2 { 1.5 } else { 1.0 };
    p *= if emergency { 1.5 } else { 1.0 };
    p *= if s.registered { 1.0 } else { 5.0 };
    let valid = s.nhs.as_bytes().to_vec();
    if rng.chance(p.min(0.5)) {
        if rng.chance(2.0 / 3.0) {
            return (Vec::new(), 2);
        }
        // A transcription error: two adjacent digits swapped (the check
        // digit catches every such swap) or the last digit wrong.
        let mut bad = valid.clone();
        let at = rng.between(0, 8) as usize;
        if bad[at] != bad[at + 1] {
            bad.swap(at, at + 1);
        } else {
            bad[9] = b'0' + (bad[9] - b'0' + 1) % 10;
        }
        if NhsNumber::parse(&bad).is_err() {
            return (bad, 3);
        }
        return (Vec::new(), 2);
    }
    (valid, if s.registered { 0 } else { 1 })
}
