//! `gpdp bench` on a tiny population: the JSON parses and its figures are
//! honest — rows in and out equal the receipts of an ordinary collection of
//! the same (cached) extract, at every thread count, and the baseline read
//! the same rows; the privacy section's theory is the dp attack's expected
//! accuracy, Φ(√(ρ/4)), computed here by other means.

use crate::common::*;

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
        "--reconstruction-counts",
        "3",
        "--reconstruction-runs",
        "2",
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
    // The reconstruction ran under the cell key method and OpenSAFELY's
    // rules, decoded at each checkpoint below 3 counts and at 3.
    let curves = r["reconstruction"].as_array().unwrap();
    let rule_sets: Vec<&str> = curves
        .iter()
        .map(|c| c["rule_set"].as_str().unwrap())
        .collect();
    assert_eq!(rule_sets, ["ckm", "opensafely"]);
    for c in curves {
        assert_eq!(c["runs"], 2, "{c}");
        let asked: Vec<u64> = c["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["queries"].as_u64().unwrap())
            .collect();
        assert_eq!(asked, [2, 3], "{c}");
    }
    assert_eq!(privacy[0]["rule_set"], "ckm");
    for (m, rho) in privacy[1..].iter().zip([0.02, 0.08, 0.32, 1.28]) {
        assert_eq!(m["targets"], 1);
        assert!(
            (m["rho_per_target"].as_f64().unwrap() - rho).abs() < 1e-9,
            "{m}"
        );
        let theory = m["theory"].as_f64().unwrap();
        let want = normal_cdf_by_simpson((rho / 4.0f64).sqrt());
        assert!(
            (theory - want).abs() < 1e-6,
            "ρ {rho}: theory {theory}, Φ(√(ρ/4)) {want}"
        );
    }
    // At one question per target (ρ = 0.02, σ = 5) the attack is right when
    // the target's noise is at least (with the attribute) or at most
    // (without) the padding's, so with probability (1 + P(e_t = e_b))/2 for
    // two discrete Gaussians: the theory is that figure, not only Φ's value.
    let sigma = 1.0 / (2.0 * 0.02f64).sqrt();
    let mass: Vec<f64> = (-60..=60i32)
        .map(|k| (-f64::from(k * k) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f64 = mass.iter().sum();
    let tie: f64 = mass.iter().map(|w| (w / total).powi(2)).sum();
    let theory = privacy[1]["theory"].as_f64().unwrap();
    assert!(
        (theory - (1.0 + tie) / 2.0).abs() < 1e-3,
        "{theory} vs {}",
        (1.0 + tie) / 2.0
    );

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

/// Φ(x), the standard normal distribution function, as ½ plus the
/// integral of the density from 0 to x by Simpson's rule (independent of
/// the approximation `gpdp bench` uses; 2,000 intervals: error below 1e-12
/// for |x| ≤ 1).
fn normal_cdf_by_simpson(x: f64) -> f64 {
    let density = |t: f64| (-t * t / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let n = 2000;
    let h = x / n as f64;
    let inner: f64 = (1..n)
        .map(|i| density(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 })
        .sum();
    0.5 + h / 3.0 * (density(0.0) + inner + density(x))
}
