//! `gpdp demo`: every stage of the pipeline on an embedded default, in one
//! command with no arguments: synthetic extracts; collection into a store;
//! the National Data Opt-out list; research questions through the TRE
//! boundary (with one that it refuses); Type 1 opt-outs registered after
//! collection, deleted everywhere; and an audit of the whole store against
//! the ground truth; one question over Arrow Flight SQL through `gpdp serve`
//! started for the purpose; then the report (`report/report.html` and `.json`),
//! the public data-uses register (`register/register.html` and `.json`) with
//! the audit log's head to publish, and one patient's own answer at the
//! practice (`gpdp optout status`). It says where everything is.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::collect::{self, CollectOptions, CollectSummary};
use crate::error::BadInput;
use crate::policy::CollectionPolicy;
use crate::policy::tre::TrePolicy;
use crate::progress::Progress;
use crate::synth::{self, SynthOptions};

/// The demo population: small enough to run in seconds, large enough that
/// every opt-out pattern and bad-row kind occurs.
pub const DEMO_PRACTICES: u32 = 8;
pub const DEMO_PATIENTS: u64 = 20_000;
pub const DEMO_SEED: u64 = 42;

/// The demo researchers of `policies/tre.toml` (demo credentials only), one
/// per rule set so that each has the guarantee of the rule set they use:
/// (project, user, token).
pub const DEMO_RESEARCHERS: [(&str, &str, &str); 4] = [
    ("demo-opensafely", "alice", "demo-alice-token"),
    ("demo-research", "dana", "demo-dana-token"),
    ("demo-planning-exempt", "carol", "demo-carol-token"),
    ("demo-prescribing-acro", "priya", "demo-priya-token"),
];

/// The demo researcher approved for a shipped `project`, and their token.
pub fn researcher_for(project: &str) -> Option<(&'static str, &'static str)> {
    DEMO_RESEARCHERS
        .iter()
        .find(|(p, _, _)| *p == project)
        .map(|(_, user, token)| (*user, *token))
}

/// A marker that says a directory was made by `gpdp demo` and may be replaced.
const MARKER: &str = ".gpdp-demo";

pub struct DemoOutcome {
    pub dir: PathBuf,
    pub extracts: PathBuf,
    pub key: PathBuf,
    /// The TRE's perturbation key (cell key method), TRE side only.
    pub perturbation_key: PathBuf,
    pub store: PathBuf,
    pub report: synth::SynthReport,
    pub collection: CollectSummary,
    pub ndoo: crate::optout::ingest::IngestReport,
    /// Hospital spells and death registrations linked at their providers.
    pub linked: Vec<crate::link::LinkReceipt>,
    pub questions: Vec<Question>,
    pub requests: PathBuf,
    pub later: crate::optout::apply::ApplyReport,
    pub audit: crate::audit::AuditReport,
    /// `report.html` (beside it, `report.json`).
    pub report_page: PathBuf,
    /// The public register, `register.html` (beside it, `register.json`).
    pub register_page: PathBuf,
    /// The audit log's head, as the operator would publish it.
    pub head: crate::store::log::Head,
    /// A patient's own answer at the practice: the first later Type 1 request.
    pub status: crate::optout::status::Status,
    pub flight: FlightAnswer,
    /// Each researcher of the policy, their projects and their effective
    /// guarantee (the weakest rule set they reach).
    pub guarantees: Vec<ResearcherGuarantee>,
}

/// One researcher's effective guarantee, as the demo prints it.
pub struct ResearcherGuarantee {
    pub user: String,
    pub projects: Vec<String>,
    pub guarantee: crate::policy::tre::Guarantee,
}

/// One question asked over Arrow Flight SQL, as a researcher's tool would.
pub struct FlightAnswer {
    pub addr: std::net::SocketAddr,
    pub sql: &'static str,
    pub batches: Vec<arrow::array::RecordBatch>,
}

const FLIGHT_SQL: &str = "SELECT age_band, count(*) AS patients FROM patients WHERE registered GROUP BY age_band ORDER BY age_band";

/// Starts `gpdp serve` on a free loopback port, asks one question with the
/// Rust Flight SQL client (handshake as dana@demo-research), and stops it.
fn ask_over_flight(store: &Path, tre: &crate::tre::Boundary) -> anyhow::Result<FlightAnswer> {
    let rt = crate::tre::runtime(Some(2))?;
    rt.block_on(async {
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::serve::serve(
            store.to_owned(),
            tre.clone(),
            crate::serve::Listen::new("127.0.0.1:0".parse()?, false, None)?,
            move |addr| {
                let _ = addr_tx.send(addr);
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        let addr = addr_rx.await?;
        // The demo researcher of policies/tre.toml (demo credentials only).
        let mut client =
            crate::serve::connect(addr, "dana", "demo-research", "demo-dana-token").await?;
        let batches = crate::serve::fetch(&mut client, FLIGHT_SQL).await;
        drop(client);
        let _ = stop_tx.send(());
        server.await??;
        Ok(FlightAnswer {
            addr,
            sql: FLIGHT_SQL,
            batches: batches?,
        })
    })
}

/// How many later Type 1 opt-outs the demo applies, and how many of them moved practice.
pub const DEMO_LATER_OPTOUTS: usize = 40;
const DEMO_LATER_MOVERS: usize = 10;

/// One research question asked through the TRE, and its answer.
pub struct Question {
    pub title: &'static str,
    pub project: &'static str,
    /// The demo researcher of the project, who asked it.
    pub user: &'static str,
    pub sql: String,
    pub answer: Result<crate::tre::Released, crate::tre::TreError>,
}

/// Diabetes: any of the three diagnosis codes of synthetic-data/codelists/conditions.csv.
const DIABETES: &str = "SELECT patient_id FROM clinical_events WHERE snomedct_code IN ('73211009', '46635009', '44054006')";

const QUESTIONS: [(&str, &str, &str); 10] = [
    (
        "Diabetes prevalence by age band: all patients, and those with a diabetes code",
        "demo-research",
        "SELECT p.age_band, count(DISTINCT p.patient_id) AS patients, count(DISTINCT d.patient_id) AS with_diabetes FROM patients p LEFT JOIN (DIABETES) d ON p.patient_id = d.patient_id GROUP BY p.age_band ORDER BY p.age_band",
    ),
    (
        "Diabetes by deprivation (IMD decile, 1 = most deprived)",
        "demo-research",
        "SELECT imd_decile, count(DISTINCT patient_id) AS with_diabetes FROM patients WHERE patient_id IN (DIABETES) GROUP BY imd_decile ORDER BY imd_decile",
    ),
    (
        "HbA1c control: mean HbA1c (mmol/mol) by age band, with the number of tests",
        "demo-research",
        "SELECT p.age_band, count(*) AS tests, avg(c.numeric_value) AS mean_hba1c FROM clinical_events c JOIN patients p ON c.patient_id = p.patient_id WHERE c.snomedct_code = '999791000000106' GROUP BY p.age_band ORDER BY p.age_band",
    ),
    (
        "Linked hospital data: patients with an emergency admission in 2025, by deprivation",
        "demo-research",
        "SELECT p.imd_decile, count(DISTINCT a.patient_id) AS emergency_patients FROM apcs a JOIN patients p ON a.patient_id = p.patient_id WHERE a.admission_method IN ('21', '22', '28') AND a.admission_year = 2025 GROUP BY p.imd_decile ORDER BY p.imd_decile",
    ),
    (
        "Planning, under the cell key method: mean HbA1c by deprivation (10 of the researcher's 15 released cells)",
        "demo-planning-exempt",
        "SELECT p.imd_decile, avg(c.numeric_value) AS mean_hba1c FROM clinical_events c JOIN patients p ON c.patient_id = p.patient_id WHERE c.snomedct_code = '999791000000106' GROUP BY p.imd_decile ORDER BY p.imd_decile",
    ),
    (
        "Under OpenSAFELY's rules: patients with a diabetes code by sex",
        "demo-opensafely",
        "SELECT sex, count(DISTINCT patient_id) AS with_diabetes FROM patients WHERE patient_id IN (DIABETES) GROUP BY sex ORDER BY sex",
    ),
    (
        "Under ACRO's rules: patients prescribed and quantity dispensed in 2025, by deprivation",
        "demo-prescribing-acro",
        "SELECT p.imd_decile, count(DISTINCT m.patient_id) AS patients, sum(m.quantity) AS quantity FROM medications m JOIN patients p ON m.patient_id = p.patient_id WHERE m.event_year = 2025 GROUP BY p.imd_decile ORDER BY p.imd_decile",
    ),
    (
        "The National Data Opt-out at work (1/2): patients a research project can see",
        "demo-research",
        "SELECT count(DISTINCT patient_id) AS patients FROM patients",
    ),
    (
        "The National Data Opt-out at work (2/2): patients a planning project with an exemption can see",
        "demo-planning-exempt",
        "SELECT count(DISTINCT patient_id) AS patients FROM patients",
    ),
    (
        "A row-level request, which the boundary refuses",
        "demo-research",
        "SELECT * FROM patients",
    ),
];

pub fn run(dir: &Path, threads: usize, progress: &Progress) -> anyhow::Result<DemoOutcome> {
    prepare(dir)?;

    let extracts = dir.join("extracts");
    progress.stage("1/8 generating synthetic GP extracts");
    let policy = CollectionPolicy::load(None)?;
    let report = synth::run(
        &SynthOptions {
            out: extracts.clone(),
            practices: DEMO_PRACTICES,
            patients: DEMO_PATIENTS,
            seed: DEMO_SEED,
            start_year: synth::DEFAULT_START_YEAR,
            extract_date: synth::DEFAULT_EXTRACT_DATE.parse()?,
            threads,
            policy: policy.clone(),
        },
        progress,
    )?;

    progress.stage("2/8 collecting: de-identification on collection into the store");
    let key = dir.join("collection.key");
    crate::deid::key::generate(&key)?;
    let store = dir.join("store");
    let collection = collect::run(
        &CollectOptions {
            extract: extracts.clone(),
            store: store.clone(),
            key: key.clone(),
            policy: policy.clone(),
            practices: Vec::new(),
            threads,
            quarantine: None,
            accept_shrink: false,
        },
        progress,
    )?;

    progress.stage(
        "3/8 linking hospital spells and death registrations; ingesting the National Data Opt-out list",
    );
    let linked = crate::link::link(&crate::link::LinkOptions {
        extract: extracts.clone(),
        store: store.clone(),
        key: key.clone(),
        policy: policy.clone(),
        sources: Vec::new(),
        quarantine: None,
        accept_shrink: false,
    })?;
    let ndoo = crate::optout::ingest::ingest(
        &extracts.join("national/ndoo.csv"),
        &store,
        &key,
        false,
        false,
        &policy,
    )?;

    progress.stage("4/8 asking research questions through the TRE boundary");
    // The TRE's own secret for the cell key method (demo-planning-exempt),
    // held on the TRE side only; never the collection key.
    let perturbation_key = dir.join("perturbation.key");
    crate::deid::key::generate(&perturbation_key)?;
    let tre = boundary(&store, &perturbation_key)?;
    let tre_policy = &tre.policy;
    let questions = ask(&tre, &store);
    let guarantees = tre_policy
        .researchers
        .iter()
        .map(|r| ResearcherGuarantee {
            user: r.user.clone(),
            projects: r.projects.clone(),
            guarantee: tre_policy.effective_guarantee(r),
        })
        .collect();

    progress.stage("5/8 deleting Type 1 opt-outs registered after collection");
    let requests = dir.join("type1-requests.csv");
    write_later_optouts(&extracts.join("truth/patients.csv"), &requests)?;
    // Both phases of erasure: unreachable (deletion vectors), then erased (purge).
    let later = crate::optout::apply::apply(&requests, &store, &key, false, policy.codec, true)?;

    progress.stage("6/8 auditing the store against the ground truth");
    let audit = crate::audit::audit(
        &store,
        Some(crate::audit::Truth {
            dir: &extracts.join("truth"),
            key: &key,
        }),
        None,
    )?;

    progress.stage("7/8 the TRE as a service: one question over Arrow Flight SQL");
    let flight = ask_over_flight(&store, &tre)?;

    progress.stage("8/8 writing the report and the public register");
    let built = crate::report::build(
        &store,
        Some(crate::report::TruthInput {
            dir: &extracts.join("truth"),
            key: Some(&key),
        }),
        None,
    )?;
    let (_, page) = crate::report::html::write(&built, &dir.join("report"))?;
    let register = crate::register::build(&store, tre_policy)?;
    let (_, register_page) = crate::register::html::write(&register, &dir.join("register"))?;
    let first_request = std::fs::read_to_string(&requests)?
        .lines()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let status = crate::optout::status::status(&first_request, &store, &key, tre_policy)?;
    Ok(DemoOutcome {
        register_page,
        head: register.log_head,
        status,
        flight,
        guarantees,
        report_page: page,
        dir: dir.to_owned(),
        extracts,
        key,
        perturbation_key,
        store,
        report,
        collection,
        ndoo,
        linked,
        questions,
        requests,
        later,
        audit,
    })
}

/// Refuses a directory gpdp demo did not make; otherwise starts it afresh,
/// with the marker that says it may be replaced.
fn prepare(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        if !dir.join(MARKER).exists()
            && std::fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(BadInput(format!(
                "{} exists and was not made by gpdp demo; pass --out with a new directory",
                dir.display()
            ))
            .into());
        }
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing the previous demo in {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "made by gpdp demo; safe to delete\n")
        .with_context(|| format!("writing into {}", dir.display()))?;
    Ok(())
}

/// The demo's TRE: the shipped policy, and beside it (never in it) the
/// record keys from the perturbation key, bound to the store's collection
/// key id.
fn boundary(store: &Path, perturbation_key: &Path) -> anyhow::Result<crate::tre::Boundary> {
    let manifest = crate::store::read_manifest(store)?;
    Ok(crate::tre::Boundary {
        record_keys: Some(
            crate::tre::aggregates::record_keys::RecordKeys::load(
                perturbation_key,
                manifest.key_id.as_deref().unwrap_or(""),
            )
            .map_err(|e| BadInput(e.to_string()))?,
        ),
        ..crate::tre::Boundary::new(TrePolicy::load(None)?)
    })
}

/// Each of the demo's questions, asked by its project's demo researcher
/// through the boundary.
fn ask(tre: &crate::tre::Boundary, store: &Path) -> Vec<Question> {
    QUESTIONS
        .iter()
        .map(|(title, project, sql)| {
            let sql = sql.replace("DIABETES", DIABETES);
            // Each project's demo researcher of policies/tre.toml (demo
            // credentials only).
            let (user, token) = researcher_for(project).unwrap_or(("", ""));
            let request = crate::tre::Request {
                store: store.to_owned(),
                user: user.into(),
                token: Some(token.into()),
                project: (*project).into(),
                sql: sql.clone(),
            };
            Question {
                title,
                project,
                user,
                sql,
                answer: crate::tre::query_blocking(tre, &request),
            }
        })
        .collect()
}

/// A request list of patients who opt out (Type 1) after collection: some
/// who moved practice (their data sits in two batches), the rest not; none
/// with a Type 1 code already.
fn write_later_optouts(truth: &Path, out: &Path) -> anyhow::Result<()> {
    let mut reader =
        csv::Reader::from_path(truth).with_context(|| format!("reading {}", truth.display()))?;
    let headers = reader.headers()?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{} has no column {name}", truth.display()))
    };
    let (nhs, type1) = (col("nhs_number")?, col("type1_anywhere")?);
    let mut registrations: std::collections::BTreeMap<String, (usize, bool)> = Default::default();
    for r in reader.records() {
        let r = r?;
        let e = registrations.entry(r[nhs].to_owned()).or_default();
        e.0 += 1;
        e.1 |= &r[type1] == "true";
    }
    let pick = |moved: bool, n: usize| {
        registrations
            .iter()
            .filter(move |(_, (k, t1))| !t1 && (*k > 1) == moved)
            .map(|(n, _)| n.clone())
            .take(n)
    };
    let mut text = "nhs_number\n".to_owned();
    for n in
        pick(true, DEMO_LATER_MOVERS).chain(pick(false, DEMO_LATER_OPTOUTS - DEMO_LATER_MOVERS))
    {
        text += &n;
        text.push('\n');
    }
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each shipped project's demo researcher gets in with their token, and
    /// into that project only.
    #[test]
    fn each_demo_researcher_is_approved_for_their_project_only() {
        let policy = TrePolicy::load(None).unwrap();
        for (project, user, token) in DEMO_RESEARCHERS {
            assert_eq!(researcher_for(project), Some((user, token)));
            for (other, _, _) in DEMO_RESEARCHERS {
                let got = crate::tre::auth::authorise(&policy, user, Some(token), other);
                assert_eq!(got.is_ok(), other == project, "{user} in {other}");
            }
        }
        assert_eq!(DEMO_RESEARCHERS.len(), policy.projects.len());
    }
}
