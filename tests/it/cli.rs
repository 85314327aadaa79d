//! The command line as a user meets it: help for every command, keygen, demo.

use std::os::unix::fs::PermissionsExt;

use crate::common::*;

#[test]
fn every_command_has_help() {
    for cmd in [
        &["--help"][..],
        &["demo", "--help"],
        &["synth", "--help"],
        &["keygen", "--help"],
    ] {
        let o = run(cmd);
        assert!(o.status.success(), "{cmd:?}");
        assert!(stdout(&o).contains("Usage"), "{cmd:?}");
    }
    let o = run(&["no-such-command"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn keygen_writes_a_private_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("collection.key");
    let o = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let before = std::fs::read(&key).unwrap();
    let o = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already exists"));
    assert_eq!(std::fs::read(&key).unwrap(), before);
    // A second key is different.
    let other = dir.path().join("other.key");
    assert!(
        run(&["keygen", "--out", other.to_str().unwrap()])
            .status
            .success()
    );
    assert_ne!(std::fs::read(&other).unwrap(), before);
}

#[test]
fn demo_runs_without_arguments_and_can_run_again() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let o = gpdp().arg("demo").current_dir(dir.path()).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains("gpdp-demo/extracts"), "{out}");
        // It ends with the audit's verdict, every check passing.
        assert!(out.contains("verdict: every check passed"), "{out}");
        assert!(!out.contains("FAIL"), "{out}");
        assert!(
            dir.path()
                .join("gpdp-demo/extracts/truth/summary.json")
                .exists()
        );
        // One demo researcher per rule set: each project asked as its
        // own researcher, and each researcher's effective guarantee stated.
        for (user, projects, _, words) in expected_guarantees(gpdp::policy::tre::DEFAULT_TRE_POLICY)
        {
            assert!(
                out.lines()
                    .any(|l| l.split_whitespace().next() == Some(user.as_str())
                        && l.ends_with(words.as_str())),
                "no guarantee for {user}: {out}"
            );
            if let [project] = &projects[..] {
                assert!(out.contains(&format!("[{project}, as {user}]")), "{out}");
            }
        }
        // Its differentially private answers state their noise and were
        // charged to dana's budget, which the report shows.
        assert!(out.contains("(noise: patients ±9.8 (95%"), "{out}");
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("gpdp-demo/report/report.json")).unwrap(),
        )
        .unwrap();
        let budgets = &report["tre"]["privacy_budgets"][0];
        assert_eq!(budgets["user"], "dana");
        assert!(budgets["rho_spent"].as_f64().unwrap() > 0.1, "{budgets}");
    }
    // A directory the demo did not make is never replaced.
    let foreign = dir.path().join("mine");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("data"), "x").unwrap();
    let o = gpdp()
        .args(["demo", "--out", "mine"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(foreign.join("data").exists());
}
