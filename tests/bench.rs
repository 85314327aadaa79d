//! `gpdp bench` on a tiny population: the JSON parses and its figures are
//! honest — rows in and out equal the receipts of an ordinary collection of
//! the same (cached) extract, at every thread count, and the baseline read
//! the same rows.

mod common;

use common::*;

#[test]
fn bench_figures_equal_the_receipts_of_the_same_collection() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bench-data");
    let o = run(&[
        "bench",
        "--patients",
        "400",
        "--practices",
        "2",
        "--tre-runs",
        "1",
        "--privacy-targets",
        "1",
        "--threads",
        "2,1",
        "--json",
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let run0 = &r["runs"][0];
    // Every rule set answered the same queries, and the privacy section
    // measured the attack under ckm and under dp at four budgets.
    for q in r["tre_rule_sets"].as_array().unwrap() {
        assert!(
            q["vs_opensafely"]["demo-research"].as_f64().unwrap() > 0.0,
            "{q}"
        );
    }
    let privacy = r["privacy"].as_array().unwrap();
    assert_eq!(privacy.len(), 5, "{privacy:?}");
    assert_eq!(privacy[0]["rule_set"], "ckm");
    for (m, rho) in privacy[1..].iter().zip([0.02, 0.08, 0.32, 1.28]) {
        assert_eq!(m["targets"], 1);
        assert!(
            (m["rho_per_target"].as_f64().unwrap() - rho).abs() < 1e-9,
            "{m}"
        );
        assert!(m["theory"].as_f64().unwrap() > 0.5);
    }

    // The same extract, collected the ordinary way.
    let extract = data.join("synth-400-2-seed1");
    assert!(
        extract.join("truth/summary.json").exists(),
        "the population is cached"
    );
    let store = dir.path().join("store");
    let key = key_file(dir.path(), 3);
    let o = collect(&extract, &store, &key);
    assert!(o.status.success(), "{}", stderr(&o));
    let (mut rows_in, mut rows_out) = (0u64, 0u64);
    for batch in manifest(&store)["batches"].as_object().unwrap().values() {
        let receipt: serde_json::Value = serde_json::from_slice(
            &std::fs::read(store.join(batch["receipt"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        rows_in += receipt["rows_in"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>();
        rows_out += receipt["rows_out"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>();
    }
    assert_eq!(run0["collect"]["rows_in"], rows_in);
    assert_eq!(run0["collect"]["rows_out"], rows_out);
    assert_eq!(
        run0["baseline"]["rows_in"], rows_in,
        "the baseline read the same rows"
    );
    let extract_bytes: u64 = std::fs::read_dir(extract.join("practices"))
        .unwrap()
        .flat_map(|practice| std::fs::read_dir(practice.unwrap().path()).unwrap())
        .map(|file| file.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(run0["collect"]["bytes_in"], extract_bytes);
    assert_eq!(run0["baseline"]["bytes_in"], extract_bytes);
    let shares: f64 = run0["stage_shares"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((shares - 1.0).abs() < 1e-9, "{shares}");
    let stages: Vec<&String> = run0["stage_seconds"].as_object().unwrap().keys().collect();
    assert_eq!(
        stages,
        [
            "commit",
            "hash_inputs",
            "parquet_write",
            "pseudonymise",
            "read_parse",
            "type1",
            "validate_generalise"
        ]
    );
    // Every thread count collected the same rows; the scale runs used the most.
    assert_eq!(r["threads"], 2);
    let sweep = r["thread_scaling"].as_array().unwrap();
    assert_eq!(sweep.len(), 2);
    for (run, threads) in sweep.iter().zip([1, 2]) {
        assert_eq!(run["threads"], threads);
        assert_eq!(run["collect"]["rows_in"], rows_in);
        assert_eq!(run["collect"]["rows_out"], rows_out);
    }
    assert_eq!(sweep[0]["speedup"], 1.0);
    for m in ["collect", "baseline"] {
        for f in ["wall_seconds", "rows_per_second", "peak_memory_mib"] {
            assert!(run0[m][f].as_f64().unwrap() > 0.0, "{m}.{f}");
        }
    }
    assert_eq!(r["tre"].as_array().unwrap().len(), 4);
    // The scratch store is gone; the cache stays.
    assert!(!data.join("bench-scratch").exists());
}
