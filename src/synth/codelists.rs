//! The clinical code lists the generator draws from, compiled in from
//! `synthetic-data/codelists/` (see the README there for each list's public
//! source). Parsed once per run into typed lookups.

/// Conditions the generator gives patients, in the order used by the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Diabetes,
    DiabetesType1,
    DiabetesType2,
    Hypertension,
    Asthma,
    Copd,
    Depression,
}

impl Condition {
    pub const ALL: [Condition; 7] = [
        Condition::Diabetes,
        Condition::DiabetesType1,
        Condition::DiabetesType2,
        Condition::Hypertension,
        Condition::Asthma,
        Condition::Copd,
        Condition::Depression,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Condition::Diabetes => "diabetes",
            Condition::DiabetesType1 => "diabetes_type1",
            Condition::DiabetesType2 => "diabetes_type2",
            Condition::Hypertension => "hypertension",
            Condition::Asthma => "asthma",
            Condition::Copd => "copd",
            Condition::Depression => "depression",
        }
    }
}

/// Observations recorded with (or as) a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Hba1c,
    SystolicBp,
    DiastolicBp,
    Bmi,
    SmokingCurrent,
    SmokingEx,
    SmokingNever,
}

impl Observation {
    pub const ALL: [Observation; 7] = [
        Observation::Hba1c,
        Observation::SystolicBp,
        Observation::DiastolicBp,
        Observation::Bmi,
        Observation::SmokingCurrent,
        Observation::SmokingEx,
        Observation::SmokingNever,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Observation::Hba1c => "hba1c",
            Observation::SystolicBp => "systolic_bp",
            Observation::DiastolicBp => "diastolic_bp",
            Observation::Bmi => "bmi",
            Observation::SmokingCurrent => "smoking_current",
            Observation::SmokingEx => "smoking_ex",
            Observation::SmokingNever => "smoking_never",
        }
    }
}

/// Sensitive categories that a collection policy is expected to exclude.
pub const SENSITIVE_CATEGORIES: [&str; 5] = [
    "ivf",
    "gender_reassignment",
    "termination_of_pregnancy",
    "hiv",
    "sexually_transmitted_infection",
];

#[derive(Debug, Clone, Copy)]
pub struct Medication {
    pub code: &'static str,
    pub quantity: u16,
}

/// Every list, parsed. Codes are `&'static str` slices of the embedded files.
#[derive(Debug)]
pub struct CodeLists {
    conditions: Vec<&'static str>,
    observations: Vec<&'static str>,
    medications: Vec<Vec<Medication>>,
    sensitive: Vec<Vec<&'static str>>,
    pub acute: Vec<&'static str>,
}

const CONDITIONS_CSV: &str = include_str!("../../synthetic-data/codelists/conditions.csv");
const OBSERVATIONS_CSV: &str = include_str!("../../synthetic-data/codelists/observations.csv");
const MEDICATIONS_CSV: &str = include_str!("../../synthetic-data/codelists/medications.csv");
const SENSITIVE_CSV: &str = include_str!("../../synthetic-data/codelists/sensitive.csv");
const ACUTE_CSV: &str = include_str!("../../synthetic-data/codelists/acute.csv");

/// Splits one line of our own simple CSV: fields may be quoted to hold
/// commas; the lists contain no escaped quotes.
fn fields(line: &'static str) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut rest = line;
    loop {
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            out.push(&quoted[..end]);
            rest = quoted[end..].trim_start_matches('"');
            match rest.strip_prefix(',') {
                Some(r) => rest = r,
                None => return out,
            }
        } else {
            match rest.find(',') {
                Some(i) => {
                    out.push(&rest[..i]);
                    rest = &rest[i + 1..];
                }
                None => {
                    out.push(rest);
                    return out;
                }
            }
        }
    }
}

/// Data rows (header skipped, blank lines ignored) as field vectors.
fn rows(
    csv: &'static str,
    name: &str,
    header_starts: &str,
) -> Result<Vec<Vec<&'static str>>, String> {
    let mut lines = csv.lines().map(str::trim_end).filter(|l| !l.is_empty());
    match lines.next() {
        Some(h) if h.starts_with(header_starts) => {}
        other => {
            return Err(format!(
                "{name}: header should start with {header_starts:?}, found {other:?}"
            ));
        }
    }
    Ok(lines.map(fields).collect())
}

fn is_code(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

impl CodeLists {
    pub fn load() -> Result<CodeLists, String> {
        let keyed = |csv, name: &str, header, keys: &[&str]| -> Result<Vec<&'static str>, String> {
            let rows = rows(csv, name, header)?;
            keys.iter()
                .map(|k| {
                    rows.iter()
                        .find(|r| r.first() == Some(k))
                        .and_then(|r| r.get(1).copied())
                        .filter(|c| is_code(c))
                        .ok_or_else(|| format!("{name}: no valid code for {k}"))
                })
                .collect()
        };
        let conditions = keyed(
            CONDITIONS_CSV,
            "conditions.csv",
            "key,snomedct_code",
            &Condition::ALL.map(Condition::key),
        )?;
        let observations = keyed(
            OBSERVATIONS_CSV,
            "observations.csv",
            "key,snomedct_code",
            &Observation::ALL.map(Observation::key),
        )?;

        let med_rows = rows(MEDICATIONS_CSV, "medications.csv", "key,dmd_code")?;
        let medications = Condition::ALL
            .iter()
            .map(|c| {
                med_rows
                    .iter()
                    .filter(|r| r.first() == Some(&c.key()) && r.len() >= 4 && is_code(r[1]))
                    .map(|r| Medication {
                        code: r[1],
                        quantity: r[3].parse().unwrap_or(28),
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        for c in [
            Condition::DiabetesType1,
            Condition::DiabetesType2,
            Condition::Hypertension,
            Condition::Asthma,
            Condition::Copd,
            Condition::Depression,
        ] {
            if medications[c as usize].is_empty() {
                return Err(format!("medications.csv: no medication for {}", c.key()));
            }
        }

        let sens_rows = rows(SENSITIVE_CSV, "sensitive.csv", "category,snomedct_code")?;
        let sensitive = SENSITIVE_CATEGORIES
            .iter()
            .map(|cat| {
                let codes: Vec<_> = sens_rows
                    .iter()
                    .filter(|r| r.first() == Some(cat) && r.len() >= 2 && is_code(r[1]))
                    .map(|r| r[1])
                    .collect();
                if codes.is_empty() {
                    Err(format!("sensitive.csv: no code for {cat}"))
                } else {
                    Ok(codes)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;

        let acute: Vec<_> = rows(ACUTE_CSV, "acute.csv", "snomedct_code")?
            .into_iter()
            .filter_map(|r| r.first().copied().filter(|c| is_code(c)))
            .collect();
        if acute.is_empty() {
            return Err("acute.csv: no codes".into());
        }
        Ok(CodeLists {
            conditions,
            observations,
            medications,
            sensitive,
            acute,
        })
    }

    pub fn condition(&self, c: Condition) -> &'static str {
        self.conditions[c as usize]
    }

    pub fn observation(&self, o: Observation) -> &'static str {
        self.observations[o as usize]
    }

    pub fn medications(&self, c: Condition) -> &[Medication] {
        &self.medications[c as usize]
    }

    /// Codes of sensitive category `i` (index into [`SENSITIVE_CATEGORIES`]).
    pub fn sensitive(&self, i: usize) -> &[&'static str] {
        &self.sensitive[i]
    }

    /// Every sensitive code with its category, for policies and tests.
    pub fn all_sensitive(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        SENSITIVE_CATEGORIES
            .iter()
            .zip(&self.sensitive)
            .flat_map(|(cat, codes)| codes.iter().map(move |c| (*cat, *c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_lists_are_complete() {
        let lists = CodeLists::load().unwrap();
        assert_eq!(lists.condition(Condition::DiabetesType2), "44054006");
        assert_eq!(lists.observation(Observation::Hba1c), "999791000000106");
        assert!(lists.all_sensitive().count() >= SENSITIVE_CATEGORIES.len());
        assert!(lists.acute.len() >= 10);
    }

    #[test]
    fn quoted_fields_keep_their_commas() {
        assert_eq!(fields("a,\"b, c\",d"), ["a", "b, c", "d"]);
        assert_eq!(fields("a,,"), ["a", "", ""]);
    }
}
