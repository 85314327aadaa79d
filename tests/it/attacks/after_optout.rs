//! Differencing against a patient who opted out after collection: can an
//! approved researcher tell that they are still in the files?
//!
//! `gpdp optout apply` leaves the patient's rows in the data files until
//! the purge; what stands between them and a researcher is the deletion
//! vectors applied at scan and the views' tombstone anti-join. The attack
//! is the padding attack of `gpdp::bench::privacy` under the cell key
//! method (which it beats when the target is there: tests/it/
//! differencing.rs): for six padding sets of the other sex, ask
//! `count(DISTINCT patient_id) WHERE <padding>`, then `WHERE <padding> OR
//! (<the target's quasi-identifiers> AND <an attribute they have>)`. If
//! the target is unreachable the two sets are the same patients, so the
//! cell keys and the answers are identical; if any row of theirs is
//! reachable, an answer moves. "Detected" means an answer moved.
//!
//! Worlds, each a copy of one collected store after `gpdp optout apply`
//! of the targets (vectors and tombstones committed): as applied; **with
//! the tombstone list removed from the manifest here, so vectors alone**
//! — in neither may any target be detected. The positive control, built
//! here only: neither vectors nor tombstones (the rows are still in the
//! files) — there the attack must detect most targets.

use super::*;
use gpdp::bench::privacy::{Attacker, PADDINGS, World, any_answer_moved, world};
use gpdp::tre::Boundary;

const KEY: u8 = 17;
const TARGETS: usize = 6;
const PROJECT: &str = "demo-planning-exempt";

/// How many of `w`'s targets the padding attack detects in `store`.
fn detected(store: &Path, tre: &Boundary, w: &World) -> usize {
    let attacker = Attacker {
        store,
        tre,
        project: PROJECT,
    };
    // Every target has the attribute, so a right guess is a detection.
    any_answer_moved(&attacker, w, w.targets.len(), &PADDINGS)
        .unwrap()
        .right
}

#[test]
fn a_patient_opted_out_after_collection_cannot_be_detected_by_differencing() {
    let c = collected_with_ndoo(3, 2000, 37, KEY);
    let mut w = world(&c.store).unwrap();
    w.targets.retain(|t| t.has);
    w.targets.truncate(TARGETS);
    assert_eq!(w.targets.len(), TARGETS, "targets with the attribute");

    // Their NHS numbers, from their pseudonyms (the test's own reading).
    let truth = Csv::read(&c.extract.join("truth/patients.csv")).records();
    let mut numbers = Vec::new();
    for t in &w.targets {
        let q = &t.quasi;
        let ids = rows(
            &direct(
                &c.store,
                PROJECT,
                &format!(
                    "SELECT DISTINCT patient_id FROM patients WHERE sex = '{}' AND age_band = '{}' AND ethnicity = '{}' AND imd_decile = {}",
                    q[0], q[1], q[2], q[3]
                ),
            ),
            &["patient_id"],
        );
        assert_eq!(ids.len(), 1, "a target is alone in their cell");
        let nhs = truth
            .iter()
            .map(|r| r["nhs_number"].clone())
            .find(|n| gpdp::digest::hex(&pseudonym(KEY, n)) == ids[0][0])
            .expect("the target is in the truth");
        numbers.push(nhs);
    }

    let dir = tempfile::tempdir().unwrap();
    let applied = dir.path().join("applied");
    copy_tree(&c.store, &applied);
    let list = dir.path().join("type1.csv");
    std::fs::write(&list, format!("nhs_number\n{}\n", numbers.join("\n"))).unwrap();
    let o = optout_apply(&applied, &c.key, &list).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let m = gpdp::store::read_manifest(&applied).unwrap();
    assert!(m.batches.values().any(|b| !b.vectors.is_empty()));
    assert!(m.tombstones.is_some());

    let world_with = |name: &str, vectors: bool, tombstones: bool| {
        let store = dir.path().join(name);
        copy_tree(&applied, &store);
        crate::tre_vectors::strip(&store, !vectors, !tombstones);
        store
    };
    let vectors_alone = world_with("vectors-alone", true, false);
    let neither = world_with("neither", false, false);

    let tre = ckm_boundary();
    let seen = [
        ("as applied", detected(&applied, &tre, &w)),
        ("vectors alone", detected(&vectors_alone, &tre, &w)),
        ("neither (positive control)", detected(&neither, &tre, &w)),
    ];
    eprintln!("targets detected by the padding attack, of {TARGETS}: {seen:?}");
    assert_eq!(seen[0].1, 0, "an opted-out patient was detected: {seen:?}");
    assert_eq!(
        seen[1].1, 0,
        "with vectors alone an opted-out patient was detected: {seen:?}"
    );
    assert!(
        2 * seen[2].1 > TARGETS,
        "the attack cannot detect patients who are there, so its silence proves nothing: {seen:?}"
    );
}
