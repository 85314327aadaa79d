//! One synthetic person's life in the GP record: demographics, where and
//! when they were registered, conditions, observations, prescriptions,
//! opt-outs, and the events each practice recorded.
//!
//! A person is a pure function of `(seed, index)`: generating them twice
//! gives the same person, which is what lets two practices' extracts agree
//! about a patient who moved between them.
//!
//! The rates below are approximate published English figures where one
//! exists (sources in `synthetic-data/README.md`); opt-out multipliers are
//! **illustrative**, chosen so that opt-out bias is visible and measurable,
//! not estimates of real behaviour.

use super::codelists::{CodeLists, Condition, Medication, Observation};
use super::names::{FAMILY, GIVEN_FEMALE, GIVEN_MALE};
use super::population::Layout;
use super::rng::{Rng, Stream};
use crate::calendar::{Day, age_on};
use crate::nhs_number::NhsNumber;
use crate::optout::type1::{Type1Code, Type1State};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sex {
    Female,
    Male,
}

impl Sex {
    pub fn code(self) -> &'static str {
        match self {
            Sex::Female => "F",
            Sex::Male => "M",
        }
    }
}

/// Ethnic group as recorded in primary care, 2021 Census high-level groups
/// (England: White 81.0%, Asian 9.6%, Black 4.2%, Mixed 3.0%, Other 2.2%),
/// with "Not stated" for the records that carry none.
pub const ETHNICITIES: [&str; 6] = ["White", "Asian", "Black", "Mixed", "Other", "Not stated"];
const ETHNICITY_WEIGHTS: [f64; 6] = [0.77, 0.091, 0.04, 0.028, 0.021, 0.05];

/// Five-year age bands of England's population (ONS mid-2021, %), 0-4 … 90-99.
const AGE_BAND_WEIGHTS: [f64; 19] = [
    5.4, 6.0, 6.0, 5.6, 6.0, 6.6, 6.9, 6.7, 6.3, 6.4, 6.9, 6.7, 5.8, 5.0, 5.0, 3.6, 2.5, 1.5, 0.9,
];

/// Age bands used in the truth files and reports.
pub fn age_band(age: i32) -> &'static str {
    match age {
        i32::MIN..=15 => "0-15",
        16..=29 => "16-29",
        30..=39 => "30-39",
        40..=49 => "40-49",
        50..=59 => "50-59",
        60..=69 => "60-69",
        70..=79 => "70-79",
        _ => "80+",
    }
}

/// Opt-out propensity multipliers (illustrative; see the module docs).
fn optout_multiplier(age: i32, sex: Sex, ethnicity: usize, imd: u8, type1: bool) -> f64 {
    let by_age = match (age, type1) {
        (i32::MIN..=15, true) => 0.5,
        (i32::MIN..=15, false) => 0.6,
        (16..=29, _) => 0.75,
        (30..=49, _) => 1.2,
        (50..=69, true) => 1.3,
        (50..=69, false) => 1.15,
        _ => 0.85,
    };
    let by_sex = if sex == Sex::Female { 1.1 } else { 0.9 };
    let by_ethnicity = [1.0, 1.3, 1.4, 1.2, 1.3, 1.0][ethnicity];
    // Less deprived areas (higher deciles) opt out more in this model.
    let by_imd = 0.8 + 0.04 * f64::from(imd - 1);
    by_age * by_sex * by_ethnicity * by_imd
}
const NDOO_BASE: f64 = 0.041;
const TYPE1_ANY_BASE: f64 = 0.034;
const NDOO_GIVEN_TYPE1: f64 = 0.35;

/// How a person's Type 1 codes were recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type1Pattern {
    None,
    /// One dissent code.
    Dissent,
    /// Dissent, then withdrawn: ends opted in.
    Withdrew,
    /// Dissent, withdrawn, dissent again: ends opted out.
    Redissented,
    /// Dissent and withdrawal on the same day: counts as dissent.
    SameDayTie,
    /// Dissent recorded only at the practice the person has since left.
    PreviousPracticeOnly,
}

#[derive(Debug, Clone, Copy)]
pub struct Registration {
    pub practice: usize,
    pub start: Day,
    pub end: Option<Day>,
    pub lsoa: u32,
    pub postcode: u16,
}

/// A numeric value with one implied decimal place (`tenths`), printed with
/// `decimals` digits after the point (0 or 1).
#[derive(Debug, Clone, Copy)]
pub struct Value {
    pub tenths: i32,
    pub decimals: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ordinary,
    /// A Type 1 code; its SNOMED id comes from the policy when written.
    Type1(Type1Code),
    /// Index into `SENSITIVE_CATEGORIES`.
    Sensitive(u8),
}

/// A coded event, recorded by the practice registration `slot` (0 = current, 1 = previous).
#[derive(Debug, Clone, Copy)]
pub struct ClinicalEvent {
    pub day: Day,
    pub slot: u8,
    pub code: &'static str,
    pub value: Option<Value>,
    pub text: Option<FreeText>,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy)]
pub struct Issue {
    pub day: Day,
    pub slot: u8,
    pub med: Medication,
    pub text: Option<FreeText>,
}

/// Free text that mentions the patient, a relative or an address: the
/// kind of thing de-identification must never let through.
#[derive(Debug, Clone, Copy)]
pub struct FreeText {
    pub template: u8,
    pub relative: &'static str,
}

pub struct Person {
    pub index: u64,
    pub nhs: NhsNumber,
    pub sex: Sex,
    pub born: Day,
    pub ethnicity: usize,
    pub given: &'static str,
    pub family: &'static str,
    /// `regs[0]` is the current (latest) registration, `regs[1]` the previous one.
    pub regs: [Option<Registration>; 2],
    pub died: Option<Day>,
    pub ndoo: bool,
    pub type1: Type1Pattern,
    pub conditions: [bool; 7],
    pub events: Vec<ClinicalEvent>,
    pub issues: Vec<Issue>,
}

/// What the generator needs to know about the extract being made.
pub struct World<'a> {
    pub layout: &'a Layout,
    pub lists: &'a CodeLists,
    pub window_start: Day,
    pub extract: Day,
    pub gpdpr_start: Day,
    pub gpdpr_end: Day,
    pub dissent_code: &'a str,
    pub withdrawn_code: &'a str,
}

const YEAR: f64 = 365.2425;

fn years(n: f64) -> Day {
    (n * YEAR).round() as Day
}

impl Person {
    pub fn current(&self) -> &Registration {
        self.regs[0]
            .as_ref()
            .unwrap_or_else(|| unreachable!("every person has a current registration"))
    }

    /// The registration that was open on `day` (history before the first
    /// registration belongs to the first one: GP2GP carries it over).
    fn slot_for(&self, day: Day) -> u8 {
        match &self.regs[1] {
            Some(prev) if day <= prev.end.unwrap_or(Day::MAX) => 1,
            _ => 0,
        }
    }

    pub fn first_start(&self) -> Day {
        self.regs[1].as_ref().unwrap_or(self.current()).start
    }

    pub fn record_end(&self, extract: Day) -> Day {
        self.current().end.unwrap_or(extract)
    }

    pub fn age_at_extract(&self, extract: Day) -> i32 {
        age_on(self.born, self.died.unwrap_or(extract))
    }

    /// The slot (0 or 1) that practice `q` holds, if any.
    pub fn slot_at(&self, q: usize) -> Option<u8> {
        self.regs
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.practice == q))
            .map(|s| s as u8)
    }

    /// The Type 1 state as seen by one practice, or across all (`None`).
    pub fn type1_state(&self, slot: Option<u8>) -> Type1State {
        let mut state = Type1State::default();
        for e in &self.events {
            if let Kind::Type1(code) = e.kind
                && slot.is_none_or(|s| s == e.slot)
            {
                state.record(e.day, code);
            }
        }
        state
    }

    pub fn generate(
        world: &World,
        index: u64,
        practice: usize,
        mover: bool,
        events: Vec<ClinicalEvent>,
        issues: Vec<Issue>,
    ) -> Person {
        let layout = world.layout;
        let mut rng = Rng::new(layout.seed, Stream::Person, index);
        let extract = world.extract;
        let window_start = world.window_start;

        let sex = if rng.chance(0.505) {
            Sex::Female
        } else {
            Sex::Male
        };
        let band = rng.weighted(&AGE_BAND_WEIGHTS) as i32;
        let mut age = if band == 18 {
            90 + rng.between(0, 9)
        } else {
            band * 5 + rng.between(0, 4)
        };
        if mover {
            age = age.max(1);
        }
        let born = extract - years(f64::from(age)) - rng.between(0, 364);
        let ethnicity = rng.weighted(&ETHNICITY_WEIGHTS);
        let given = *rng.pick(if sex == Sex::Female {
            GIVEN_FEMALE
        } else {
            GIVEN_MALE
        });
        let family = *rng.pick(FAMILY);

        let home = |rng: &mut Rng, q: usize| {
            let lsoas = &layout.practices[q].lsoas;
            let lsoa = lsoas.start + rng.below(u64::from(lsoas.end - lsoas.start)) as u32;
            let postcode = rng.below(u64::from(layout.lsoas[lsoa as usize].postcodes)) as u16;
            (lsoa, postcode)
        };

        // Registrations: movers have a previous practice and a move date in the window.
        let (lsoa, postcode) = home(&mut rng, practice);
        let mut regs = [None, None];
        let current_start = if mover {
            let move_day = rng.between((window_start + 180).max(born + 30), extract - 90);
            let (plsoa, ppostcode) = home(&mut rng, layout.previous_practice(practice));
            let prev_start = (move_day - 30 - rng.between(0, years(20.0))).max(born);
            regs[1] = Some(Registration {
                practice: layout.previous_practice(practice),
                start: prev_start,
                end: Some(move_day - 1),
                lsoa: plsoa,
                postcode: ppostcode,
            });
            move_day
        } else {
            let back = rng.unit() * f64::from(age.min(30)) + rng.unit();
            (extract - years(back)).max(born)
        };
        regs[0] = Some(Registration {
            practice,
            start: current_start,
            end: None,
            lsoa,
            postcode,
        });

        // Deaths (annual mortality by age, approximate) and departures.
        let annual_death = match age {
            i32::MIN..=49 => 0.001,
            50..=69 => 0.006,
            70..=79 => 0.02,
            80..=89 => 0.06,
            _ => 0.15,
        };
        let window_years = f64::from(extract - window_start.max(current_start)) / YEAR;
        let mut died = None;
        if window_years > 0.1 && rng.chance(1.0 - (1.0f64 - annual_death).powf(window_years)) {
            let day = rng.between(window_start.max(current_start) + 1, extract - 1);
            died = Some(day);
            if let Some(r) = regs[0].as_mut() {
                r.end = Some(day);
            }
        } else if window_years > 0.1 && rng.chance(0.02) {
            let day = rng.between(window_start.max(current_start) + 1, extract - 1);
            if let Some(r) = regs[0].as_mut() {
                r.end = Some(day);
            }
        }

        let mut person = Person {
            index,
            nhs: layout.nhs_number(index),
            sex,
            born,
            ethnicity,
            given,
            family,
            regs,
            died,
            ndoo: false,
            type1: Type1Pattern::None,
            conditions: [false; 7],
            events,
            issues,
        };
        person.events.clear();
        person.issues.clear();

        let imd = layout.lsoas[lsoa as usize].imd_decile;
        let age_now = person.age_at_extract(extract);

        // Opt-outs: Type 1 first, since NDOO is correlated with it.
        let type1_p = TYPE1_ANY_BASE * optout_multiplier(age_now, sex, ethnicity, imd, true);
        person.type1 = if rng.chance(type1_p) {
            match rng.weighted(&[0.75, 0.10, 0.07, 0.03, 0.05]) {
                0 => Type1Pattern::Dissent,
                1 => Type1Pattern::Withdrew,
                2 => Type1Pattern::Redissented,
                3 => Type1Pattern::SameDayTie,
                _ if person.regs[1].is_some() => Type1Pattern::PreviousPracticeOnly,
                _ => Type1Pattern::Dissent,
            }
        } else {
            Type1Pattern::None
        };
        person.add_type1_events(world, &mut rng);
        let dissents = person.type1_state(None).dissents();
        let ndoo_p = if dissents {
            NDOO_GIVEN_TYPE1
        } else {
            NDOO_BASE * optout_multiplier(age_now, sex, ethnicity, imd, false)
        };
        person.ndoo = rng.chance(ndoo_p);

        person.add_clinical_history(world, &mut rng, age_now, imd);
        person.events.sort_by_key(|e| e.day);
        person.issues.sort_by_key(|e| e.day);
        person
    }

    fn add_type1_events(&mut self, world: &World, rng: &mut Rng) {
        let pattern = self.type1;
        if pattern == Type1Pattern::None {
            return;
        }
        // Where the codes go: the previous practice, or the current one.
        let (slot, reg) = match (pattern, &self.regs[1]) {
            (Type1Pattern::PreviousPracticeOnly, Some(prev)) => (1u8, *prev),
            _ => (0u8, *self.current()),
        };
        let lo = reg
            .start
            .max(world.window_start.min(reg.end.unwrap_or(world.extract)));
        let hi = reg.end.unwrap_or(world.extract);
        // Half of first dissents fall in the GPDPR surge of summer 2021.
        let surge = world.gpdpr_start.max(lo)..=world.gpdpr_end.min(hi);
        let first = if !surge.is_empty() && rng.chance(0.5) {
            rng.between(*surge.start(), *surge.end())
        } else {
            rng.between(lo, hi)
        };
        let mut push = |day: Day, withdrawn: bool| {
            self.events.push(ClinicalEvent {
                day,
                slot,
                code: "",
                value: None,
                text: None,
                kind: Kind::Type1(if withdrawn {
                    Type1Code::Withdrawn
                } else {
                    Type1Code::Dissent
                }),
            })
        };
        match pattern {
            Type1Pattern::Dissent | Type1Pattern::PreviousPracticeOnly => push(first, false),
            Type1Pattern::SameDayTie => {
                push(first, false);
                push(first, true);
            }
            Type1Pattern::Withdrew if first < hi => {
                push(first, false);
                push(rng.between(first + 1, hi), true);
            }
            Type1Pattern::Redissented if first + 1 < hi => {
                let withdrawn = rng.between(first + 1, hi - 1);
                push(first, false);
                push(withdrawn, true);
                push(rng.between(withdrawn + 1, hi), false);
            }
            // No room for a second code on the last day: record a plain dissent.
            _ => {
                push(first, false);
                self.type1 = Type1Pattern::Dissent;
            }
        }
    }

    /// The clinical record over the person's active period (from the window's
    /// start or their first registration, to the extract or their leaving):
    /// chronic conditions with their monitoring and medication, routine
    /// observations, sensitive events policy must exclude, and acute
    /// consultations — drawn in that order from one generator, so one seed
    /// gives one history.
    fn add_clinical_history(&mut self, world: &World, rng: &mut Rng, age: i32, imd: u8) {
        let record_end = self.record_end(world.extract);
        let active_start = world.window_start.max(self.first_start());
        if active_start > record_end {
            return;
        }
        let active = (active_start, record_end);
        self.add_chronic_conditions(world, rng, age, imd, active);
        self.add_routine_observations(world, rng, age, active);
        self.add_sensitive_events(world, rng, age, active);
        self.add_acute_consultations(world, rng, age, active);
    }

    /// Chronic conditions, by their prevalence at the extract date, each
    /// with its diagnosis code, monitoring and repeat prescriptions.
    fn add_chronic_conditions(
        &mut self,
        world: &World,
        rng: &mut Rng,
        age: i32,
        imd: u8,
        (active_start, record_end): (Day, Day),
    ) {
        let lists = world.lists;
        let adult = age >= 18;
        let deprivation = 1.3 - 0.06 * f64::from(imd - 1);

        let diabetes_p = match age {
            i32::MIN..=17 => 0.002,
            18..=39 => 0.02,
            40..=59 => 0.07,
            60..=79 => 0.14,
            _ => 0.16,
        } * [1.0, 1.8, 1.5, 1.2, 1.2, 1.0][self.ethnicity]
            * deprivation;
        let hypertension_p = match age {
            i32::MIN..=17 => 0.0,
            18..=39 => 0.02,
            40..=59 => 0.12,
            60..=79 => 0.30,
            _ => 0.40,
        } * if self.ethnicity == 2 { 1.3 } else { 1.0 };
        let asthma_p = if age >= 6 { 0.065 } else { 0.0 };
        let copd_p = match age {
            i32::MIN..=34 => 0.0,
            35..=59 => 0.01,
            60..=79 => 0.05,
            _ => 0.07,
        } * deprivation;
        let depression_p = if adult {
            0.13 * if self.sex == Sex::Female { 1.35 } else { 0.65 }
        } else {
            0.0
        };

        let (born, first_start) = (self.born, self.first_start());
        let diag = |rng: &mut Rng, years_old: f64| {
            let earliest = (born + years(years_old)).max(first_start - years(15.0));
            rng.between(earliest.min(record_end), record_end)
        };

        if rng.chance(diabetes_p) {
            let which = match rng.weighted(&[0.08, 0.90, 0.02]) {
                0 => Condition::DiabetesType1,
                1 => Condition::DiabetesType2,
                _ => Condition::Diabetes,
            };
            self.conditions[Condition::Diabetes as usize] = true;
            self.conditions[which as usize] = true;
            let type1 = which == Condition::DiabetesType1;
            let day = diag(rng, if type1 { 1.0 } else { 18.0 });
            self.diagnose(world, which, day);
            let mean = if type1 { 68.0 } else { 58.0 };
            self.series(
                rng,
                day.max(active_start),
                record_end,
                (150, 240),
                |rng, e| {
                    e.code = lists.observation(Observation::Hba1c);
                    e.value = Some(Value {
                        tenths: rng.normal(mean, 12.0, 35.0, 130.0).round() as i32 * 10,
                        decimals: 0,
                    });
                },
            );
            let meds = lists.medications(if type1 {
                Condition::DiabetesType1
            } else {
                Condition::DiabetesType2
            });
            self.prescribe(rng, meds, day.max(active_start), record_end, (28, 84), 0.35);
        }
        if rng.chance(hypertension_p) {
            self.conditions[Condition::Hypertension as usize] = true;
            let day = diag(rng, 25.0);
            self.diagnose(world, Condition::Hypertension, day);
            self.blood_pressure(
                lists,
                rng,
                day.max(active_start),
                record_end,
                (180, 400),
                142.0,
            );
            self.prescribe(
                rng,
                lists.medications(Condition::Hypertension),
                day.max(active_start),
                record_end,
                (28, 84),
                0.3,
            );
        }
        if rng.chance(asthma_p) {
            self.conditions[Condition::Asthma as usize] = true;
            let day = diag(rng, 5.0);
            self.diagnose(world, Condition::Asthma, day);
            self.prescribe(
                rng,
                lists.medications(Condition::Asthma),
                day.max(active_start),
                record_end,
                (60, 150),
                0.5,
            );
        }
        if rng.chance(copd_p) {
            self.conditions[Condition::Copd as usize] = true;
            let day = diag(rng, 35.0);
            self.diagnose(world, Condition::Copd, day);
            self.prescribe(
                rng,
                lists.medications(Condition::Copd),
                day.max(active_start),
                record_end,
                (28, 56),
                0.0,
            );
        }
        if rng.chance(depression_p) {
            self.conditions[Condition::Depression as usize] = true;
            let day = diag(rng, 16.0);
            self.diagnose(world, Condition::Depression, day);
            let episode_end = (day + rng.between(180, 720)).min(record_end);
            self.prescribe(
                rng,
                lists.medications(Condition::Depression),
                day.max(active_start),
                episode_end,
                (28, 56),
                0.0,
            );
        }
    }

    /// Routine observations for adults: blood pressure from 40, BMI, smoking status.
    fn add_routine_observations(
        &mut self,
        world: &World,
        rng: &mut Rng,
        age: i32,
        (active_start, record_end): (Day, Day),
    ) {
        let lists = world.lists;
        let adult = age >= 18;
        if adult {
            if !self.conditions[Condition::Hypertension as usize] && age >= 40 {
                let from = active_start + rng.between(0, 700);
                self.blood_pressure(lists, rng, from, record_end, (700, 1400), 127.0);
            }
            let bmi_mean = 27.5;
            let from = active_start + rng.between(0, 900);
            self.series(rng, from, record_end, (700, 1500), |rng, e| {
                e.code = lists.observation(Observation::Bmi);
                e.value = Some(Value {
                    tenths: (rng.normal(bmi_mean, 5.0, 15.0, 60.0) * 10.0).round() as i32,
                    decimals: 1,
                });
            });
            if rng.chance(0.6) {
                let status = match rng.weighted(&[0.13, 0.25, 0.62]) {
                    0 => Observation::SmokingCurrent,
                    1 => Observation::SmokingEx,
                    _ => Observation::SmokingNever,
                };
                self.push_event(
                    rng_day(rng, active_start, record_end),
                    lists.observation(status),
                    None,
                    Kind::Ordinary,
                );
            }
        }
    }

    /// Sensitive events (the categories collection policy must exclude),
    /// each by its rate for the person's age and sex.
    fn add_sensitive_events(
        &mut self,
        world: &World,
        rng: &mut Rng,
        age: i32,
        (active_start, record_end): (Day, Day),
    ) {
        let lists = world.lists;
        let adult = age >= 18;
        let female = self.sex == Sex::Female;
        let sensitive_p = [
            if female && (25..=44).contains(&age) {
                0.004
            } else {
                0.0
            },
            0.0005,
            if female && (16..=44).contains(&age) {
                0.015
            } else {
                0.0
            },
            if adult { 0.0015 } else { 0.0 },
            if (16..=34).contains(&age) { 0.02 } else { 0.0 },
        ];
        for (category, p) in sensitive_p.iter().enumerate() {
            if rng.chance(*p) {
                let code = *rng.pick(lists.sensitive(category));
                let day = rng_day(rng, active_start, record_end);
                self.push_event(day, code, None, Kind::Sensitive(category as u8));
            }
        }
    }

    /// Acute consultations: a Poisson process over the active period, at a
    /// rate by age and sex; some carry free text naming a relative.
    fn add_acute_consultations(
        &mut self,
        world: &World,
        rng: &mut Rng,
        age: i32,
        (active_start, record_end): (Day, Day),
    ) {
        let lists = world.lists;
        let female = self.sex == Sex::Female;
        let rate = match age {
            i32::MIN..=4 => 2.4,
            5..=15 => 0.9,
            16..=44 if female => 1.5,
            16..=44 => 0.9,
            45..=64 => 1.5,
            _ => 2.4,
        };
        let mut t = f64::from(active_start) + rng.exponential(YEAR / rate);
        while t <= f64::from(record_end) {
            let code = *rng.pick(&lists.acute);
            let text = rng.chance(0.08).then(|| FreeText {
                template: rng.below(4) as u8,
                relative: relative_name(rng),
            });
            self.push_event(t as Day, code, text, Kind::Ordinary);
            t += rng.exponential(YEAR / rate);
        }
    }

    fn push_event(&mut self, day: Day, code: &'static str, text: Option<FreeText>, kind: Kind) {
        let slot = self.slot_for(day);
        self.events.push(ClinicalEvent {
            day,
            slot,
            code,
            value: None,
            text,
            kind,
        });
    }

    fn diagnose(&mut self, world: &World, condition: Condition, day: Day) {
        let code = world.lists.condition(condition);
        self.push_event(day, code, None, Kind::Ordinary);
    }

    /// Repeated observations every `gap` days from `from` to `to`.
    fn series(
        &mut self,
        rng: &mut Rng,
        from: Day,
        to: Day,
        gap: (i32, i32),
        mut fill: impl FnMut(&mut Rng, &mut ClinicalEvent),
    ) {
        let mut day = from;
        while day <= to {
            let mut e = ClinicalEvent {
                day,
                slot: self.slot_for(day),
                code: "",
                value: None,
                text: None,
                kind: Kind::Ordinary,
            };
            fill(rng, &mut e);
            self.events.push(e);
            day += rng.between(gap.0, gap.1);
        }
    }

    fn blood_pressure(
        &mut self,
        lists: &CodeLists,
        rng: &mut Rng,
        from: Day,
        to: Day,
        gap: (i32, i32),
        systolic_mean: f64,
    ) {
        let mut day = from;
        while day <= to {
            let systolic = rng.normal(systolic_mean, 15.0, 85.0, 220.0).round() as i32;
            let diastolic =
                (rng.normal(f64::from(systolic) * 0.6, 7.0, 45.0, 130.0)).round() as i32;
            for (o, v) in [
                (Observation::SystolicBp, systolic),
                (Observation::DiastolicBp, diastolic),
            ] {
                self.events.push(ClinicalEvent {
                    day,
                    slot: self.slot_for(day),
                    code: lists.observation(o),
                    value: Some(Value {
                        tenths: v * 10,
                        decimals: 0,
                    }),
                    text: None,
                    kind: Kind::Ordinary,
                });
            }
            day += rng.between(gap.0, gap.1);
        }
    }

    /// Repeat prescriptions of one (sometimes two) of `meds` every `gap` days.
    fn prescribe(
        &mut self,
        rng: &mut Rng,
        meds: &[Medication],
        from: Day,
        to: Day,
        gap: (i32, i32),
        second: f64,
    ) {
        let first = *rng.pick(meds);
        let both = meds.len() > 1 && rng.chance(second);
        let other =
            meds[(meds.iter().position(|m| m.code == first.code).unwrap_or(0) + 1) % meds.len()];
        let mut day = from + rng.between(0, gap.0);
        while day <= to {
            for med in std::iter::once(first).chain(both.then_some(other)) {
                let text = rng.chance(0.03).then(|| FreeText {
                    template: rng.below(2) as u8,
                    relative: relative_name(rng),
                });
                self.issues.push(Issue {
                    day,
                    slot: self.slot_for(day),
                    med,
                    text,
                });
            }
            day += rng.between(gap.0, gap.1);
        }
    }
}

fn relative_name(rng: &mut Rng) -> &'static str {
    let names = if rng.chance(0.5) {
        GIVEN_FEMALE
    } else {
        GIVEN_MALE
    };
    rng.pick::<&str>(names)
}

fn rng_day(rng: &mut Rng, from: Day, to: Day) -> Day {
    rng.between(from, to.max(from))
}
