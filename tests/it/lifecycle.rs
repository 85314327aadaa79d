//! Model-based property test of the opt-out lifecycle: random sequences of
//! collect / opt out (recorded at the practice, with or without a request
//! applied at once) / withdraw / move practice / ingest the NDOO, on a small
//! hand-built world of 8 patients and 3 practices. After every step the store
//! must equal a simple model of what each practice's batch should hold, no
//! opted-out patient may have a row any reader returns (a request masks
//! them with deletion vectors; every other one is purged at once, and the
//! store is read as its readers read it), the research project's views
//! must exclude exactly the NDOO patients, and the audit log must verify.
//!
//! The model's rules (docs/design.md §3–4, in words):
//! - collecting practice X takes a snapshot of every patient registered
//!   there; X's batch is that snapshot minus every *blocked* patient;
//! - blocked = patients whose latest Type 1 code, in the last collected
//!   record of any practice, is a dissent (ties dissent), plus patients with
//!   an applied request;
//! - a request ends when a collected record shows the opt-out withdrawn on or
//!   after the request's date;
//! - blocking a patient deletes them from every batch at once; unblocking
//!   brings them back only when a batch holding them is collected again.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use crate::common::*;
use gpdp::policy::CollectionPolicy;
use gpdp::policy::tre::TrePolicy;
use proptest::prelude::*;

const KEY: u8 = 11;
const PRACTICES: [&str; 3] = ["A10001", "B10002", "C10003"];
const DISSENT: &str = "827241000000103";
const WITHDRAWN: &str = "827261000000102";

#[derive(Debug, Clone)]
enum Op {
    Collect(usize),
    /// Dissent recorded at the patient's practice and, if `request`, applied
    /// at once with `gpdp optout apply`.
    OptOut {
        patient: usize,
        request: bool,
    },
    Withdraw(usize),
    Move {
        patient: usize,
        to: usize,
    },
    IngestNdoo(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize).prop_map(Op::Collect),
        // Ops touch patients 0–3 (of 8) so that sequences revisit them.
        2 => (0..4usize, any::<bool>()).prop_map(|(patient, request)| Op::OptOut { patient, request }),
        2 => (0..4usize).prop_map(Op::Withdraw),
        2 => (0..4usize, 0..3usize).prop_map(|(patient, to)| Op::Move { patient, to }),
        1 => any::<u8>().prop_map(Op::IngestNdoo),
    ]
}

/// The world the practices record, and the model of the store.
struct World {
    dir: PathBuf,
    nhs: Vec<String>,
    /// (patient, practice, start day, end day)
    registrations: Vec<(usize, usize, u32, Option<u32>)>,
    /// (patient, practice, day, dissent)
    codes: Vec<(usize, usize, u32, bool)>,
    day: u32,
    // The model.
    batches: BTreeMap<usize, BTreeSet<usize>>,
    dissent_at: BTreeMap<usize, BTreeSet<usize>>,
    requests: BTreeMap<usize, u32>,
    ndoo: Option<BTreeSet<usize>>,
}

fn date(day: u32) -> String {
    let d = chrono::NaiveDate::from_ymd_opt(2024, 1, 1).unwrap() + chrono::Days::new(day as u64);
    d.format("%Y-%m-%d").to_string()
}

impl World {
    fn new(dir: &Path) -> World {
        let nhs: Vec<String> = (999_000_000u64..)
            .map(|n| format!("{n}"))
            .flat_map(|n| (0..10).map(move |c| format!("{n}{c}")))
            .filter(|n| nhs_valid(n))
            .take(8)
            .collect();
        World {
            dir: dir.to_owned(),
            registrations: (0..8).map(|p| (p, p % 3, 0, None)).collect(),
            nhs,
            codes: Vec::new(),
            day: 10,
            batches: BTreeMap::new(),
            dissent_at: BTreeMap::new(),
            requests: BTreeMap::new(),
            ndoo: None,
        }
    }

    fn extract(&self) -> PathBuf {
        self.dir.join("extract")
    }
    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    fn key(&self) -> PathBuf {
        self.dir.join(format!("key{KEY}"))
    }

    fn current_practice(&self, patient: usize) -> usize {
        self.registrations
            .iter()
            .rev()
            .find(|r| r.0 == patient && r.3.is_none())
            .map(|r| r.1)
            .unwrap()
    }

    /// The patient's latest Type 1 code in `practice`'s record: (day, dissent).
    fn latest_code(&self, patient: usize, practice: usize) -> Option<(u32, bool)> {
        let mut latest: Option<(u32, bool)> = None;
        for &(p, pr, day, dissent) in &self.codes {
            if p == patient && pr == practice {
                latest = match latest {
                    Some((d, was)) if d == day => Some((d, was || dissent)),
                    Some((d, _)) if d > day => latest,
                    _ => Some((day, dissent)),
                };
            }
        }
        latest
    }

    fn write_practice(&self, practice: usize) {
        let dir = self.extract().join("practices").join(PRACTICES[practice]);
        std::fs::create_dir_all(&dir).unwrap();
        let mut patients = "nhs_number,given_name,family_name,date_of_birth,sex,postcode,ethnicity,registration_start,registration_end,date_of_death\n".to_owned();
        let mut events = "nhs_number,date,snomedct_code,numeric_value,free_text\n".to_owned();
        let mut meds = "nhs_number,date,dmd_code,quantity,free_text\n".to_owned();
        for &(p, pr, start, end) in &self.registrations {
            if pr != practice {
                continue;
            }
            let n = &self.nhs[p];
            let end = end.map(date).unwrap_or_default();
            patients += &format!(
                "{n},Ann,Example,1970-01-01,F,QA1 0AA,White,{},{end},\n",
                date(start)
            );
            events += &format!("{n},{},44054006,,\n", date(start + 1));
            meds += &format!("{n},{},325242002,56,\n", date(start + 1));
        }
        for &(p, pr, day, dissent) in &self.codes {
            if pr == practice {
                let code = if dissent { DISSENT } else { WITHDRAWN };
                events += &format!("{},{},{code},,\n", self.nhs[p], date(day));
            }
        }
        std::fs::write(dir.join("patients.csv"), patients).unwrap();
        std::fs::write(dir.join("clinical_events.csv"), events).unwrap();
        std::fs::write(dir.join("medications.csv"), meds).unwrap();
    }

    fn blocked(&self) -> BTreeSet<usize> {
        self.dissent_at
            .values()
            .flatten()
            .chain(self.requests.keys())
            .copied()
            .collect()
    }

    fn collect(&mut self, practice: usize) {
        self.write_practice(practice);
        gpdp::collect::run(
            &gpdp::collect::CollectOptions {
                extract: self.extract(),
                store: self.store(),
                key: self.key(),
                policy: CollectionPolicy::load(None).unwrap(),
                practices: vec![PRACTICES[practice].to_owned()],
                threads: 1,
                quarantine: Some(self.dir.join("quarantine")),
                // Eight patients moving between three practices shrink a
                // batch by a third at a time: the model is about opt-outs,
                // and takes every extract (the guards have their own tests).
                accept_shrink: true,
            },
            &gpdp::progress::Progress::new(true),
        )
        .unwrap();
        // The model.
        let snapshot: BTreeSet<usize> = self
            .registrations
            .iter()
            .filter(|r| r.1 == practice)
            .map(|r| r.0)
            .collect();
        let withdrawn: Vec<usize> = self
            .requests
            .iter()
            .filter(|&(&p, &asked)| {
                matches!(self.latest_code(p, practice), Some((day, false)) if day >= asked)
            })
            .map(|(&p, _)| p)
            .collect();
        for p in withdrawn {
            self.requests.remove(&p);
        }
        let dissenting = snapshot
            .iter()
            .copied()
            .filter(|&p| matches!(self.latest_code(p, practice), Some((_, true))))
            .collect();
        self.dissent_at.insert(practice, dissenting);
        let blocked = self.blocked();
        self.batches
            .insert(practice, snapshot.difference(&blocked).copied().collect());
        for batch in self.batches.values_mut() {
            batch.retain(|p| !blocked.contains(p));
        }
    }

    fn apply(&mut self, patient: usize) {
        let list = self.dir.join("requests.csv");
        std::fs::write(
            &list,
            format!(
                "nhs_number,requested_at\n{},{}\n",
                self.nhs[patient],
                date(self.day)
            ),
        )
        .unwrap();
        gpdp::optout::apply::apply(
            &list,
            &self.store(),
            &self.key(),
            false,
            gpdp::policy::Codec::Zstd(1),
            // Every other request purged at once: masked and erased
            // patients must look the same to every reader.
            self.day.is_multiple_of(2),
        )
        .unwrap();
        self.requests.entry(patient).or_insert(self.day);
        for batch in self.batches.values_mut() {
            batch.remove(&patient);
        }
    }

    fn ingest(&mut self, mask: u8) {
        let set: BTreeSet<usize> = (0..8).filter(|i| mask & (1 << i) != 0).collect();
        let list = self.dir.join("ndoo.csv");
        let mut text = "nhs_number\n".to_owned();
        for &p in &set {
            text += &format!("{}\n", self.nhs[p]);
        }
        std::fs::write(&list, text).unwrap();
        gpdp::optout::ingest::ingest(
            &list,
            &self.store(),
            &self.key(),
            false,
            // Any subset of eight, the empty one included: the model is
            // about opt-outs, and takes every list (the guards have their
            // own tests).
            true,
            &CollectionPolicy::load(None).unwrap(),
        )
        .unwrap();
        self.ndoo = Some(set);
    }

    fn step(&mut self, op: &Op) {
        self.day += 1;
        match *op {
            Op::Collect(x) => self.collect(x),
            Op::OptOut { patient, request } => {
                let at = self.current_practice(patient);
                self.codes.push((patient, at, self.day, true));
                if request {
                    self.apply(patient);
                }
            }
            Op::Withdraw(patient) => {
                let at = self.current_practice(patient);
                self.codes.push((patient, at, self.day, false));
            }
            Op::Move { patient, to } => {
                if self.current_practice(patient) != to {
                    let day = self.day;
                    for r in self.registrations.iter_mut() {
                        if r.0 == patient && r.3.is_none() {
                            r.3 = Some(day);
                        }
                    }
                    self.registrations.push((patient, to, day, None));
                }
            }
            Op::IngestNdoo(mask) => self.ingest(mask),
        }
    }

    /// The store against the model; `Err` says what differs.
    fn check(&self, rt: &tokio::runtime::Runtime) -> Result<(), String> {
        let store = self.store();
        let id = |p: usize| pseudonym(KEY, &self.nhs[p]);
        let patients = read_table_reachable(&store, "patients");
        let found: BTreeSet<([u8; 32], [u8; 32])> = patient_ids(&patients)
            .into_iter()
            .zip(pseudonym_column(&patients, "practice_id"))
            .collect();
        let expected: BTreeSet<([u8; 32], [u8; 32])> = self
            .batches
            .iter()
            .flat_map(|(x, ps)| {
                ps.iter()
                    .map(move |&p| (id(p), practice_pseudonym(KEY, PRACTICES[*x])))
            })
            .collect();
        if found != expected {
            let name = |s: &BTreeSet<([u8; 32], [u8; 32])>| {
                s.iter()
                    .map(|(p, x)| {
                        let p = (0..8).find(|&i| id(i) == *p).unwrap();
                        let x = (0..3)
                            .find(|&i| practice_pseudonym(KEY, PRACTICES[i]) == *x)
                            .unwrap();
                        format!("patient {p}@{}", PRACTICES[x])
                    })
                    .collect::<Vec<_>>()
            };
            return Err(format!(
                "store {:?}\nmodel {:?}",
                name(&found),
                name(&expected)
            ));
        }
        let blocked: HashSet<[u8; 32]> = self.blocked().into_iter().map(id).collect();
        for table in ["clinical_events", "medications"] {
            let ids: HashSet<[u8; 32]> = patient_ids(&read_table_reachable(&store, table))
                .into_iter()
                .collect();
            if !ids.is_disjoint(&blocked) {
                return Err(format!("an opted-out patient has rows in {table}"));
            }
            if !ids.iter().all(|i| found.iter().any(|(p, _)| p == i)) {
                return Err(format!(
                    "{table} has rows of a patient with no registration"
                ));
            }
        }
        gpdp::audit::verify_log(&store, None).map_err(|e| e.to_string())?;
        // Through the research project's views: stored patients minus the NDOO.
        let policy = TrePolicy::load(None).unwrap();
        let manifest = gpdp::store::read_manifest(&store).unwrap();
        let project = &policy.projects["demo-research"];
        let session = rt.block_on(gpdp::tre::session::open(
            &store, &manifest, &policy, project,
        ));
        match (&self.ndoo, session) {
            (None, Err(gpdp::tre::TreError::Refused(r))) if r.rule == "ndoo_not_ingested" => {}
            (None, _) => {
                return Err("a research project opened before the NDOO was ingested".into());
            }
            (Some(ndoo), Ok(session)) => {
                let visible: BTreeSet<[u8; 32]> = rt
                    .block_on(async {
                        session
                            .ctx
                            .sql("SELECT DISTINCT patient_id FROM patients")
                            .await?
                            .collect()
                            .await
                    })
                    .map(|b| patient_ids(&b).into_iter().collect())
                    .map_err(|e| e.to_string())?;
                let want: BTreeSet<[u8; 32]> = self
                    .batches
                    .values()
                    .flatten()
                    .filter(|p| !ndoo.contains(p))
                    .map(|&p| id(p))
                    .collect();
                if visible != want {
                    return Err(format!(
                        "the research views show {} patients, the model {}",
                        visible.len(),
                        want.len()
                    ));
                }
            }
            (Some(_), Err(e)) => return Err(format!("research session: {e}")),
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn the_store_follows_the_model_through_any_sequence(ops in prop::collection::vec(op(), 1..16)) {
        let dir = tempfile::tempdir().unwrap();
        key_file(dir.path(), KEY);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut world = World::new(dir.path());
        std::fs::create_dir_all(world.extract().join("reference")).unwrap();
        std::fs::write(
            world.extract().join("reference/postcode_lsoa.csv"),
            "postcode,lsoa_code,imd_decile\nQA1 0AA,E01900000,6\n",
        ).unwrap();
        for x in 0..3 {
            world.collect(x);
        }
        prop_assert!(world.check(&rt).is_ok(), "{:?}", world.check(&rt));
        for (i, op) in ops.iter().enumerate() {
            world.step(op);
            if let Err(e) = world.check(&rt) {
                prop_assert!(false, "after step {i} {op:?} of {ops:?}:\n{e}");
            }
        }
    }
}
