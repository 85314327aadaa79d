//! The report as one self-contained HTML page: inline CSS, SVG charts
//! (`crate::page`), no scripts and nothing fetched, so it reads offline and
//! prints. Every number comes from the [`Report`] that is also written as
//! `report.json`; [`write()`] writes the two side by side.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::Report;
use crate::audit::Check;
use crate::page::{Difference, STYLE, bar_chart, difference_chart, esc, kv_table};

/// Writes `report.json` (the [`Report`] serialised) and `report.html` (its
/// page) into `out`; returns their paths.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let page = out.join("report.html");
    std::fs::write(&page, render(report)?)
        .with_context(|| format!("writing {}", page.display()))?;
    Ok((json, page))
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn checks_table(checks: &[Check]) -> String {
    let mut t = String::from("<table><tr><th>check</th><th>result</th><th>figures</th></tr>");
    for c in checks {
        let _ = write!(
            t,
            "<tr><td><code>{}</code></td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(c.name),
            if c.passed { "pass" } else { "fail" },
            if c.passed { "pass" } else { "FAIL" },
            esc(&c.detail)
        );
    }
    t + "</table>"
}

/// The whole page: the verdict, then one section per part of the report.
pub fn render(r: &Report) -> anyhow::Result<String> {
    let mut h = String::new();
    header(r, &mut h);
    collection(r, &mut h)?;
    optouts(r, &mut h)?;
    representativeness(r, &mut h)?;
    reidentification(r, &mut h)?;
    tre(r, &mut h)?;
    throughput(r, &mut h)?;
    h += "</body></html>\n";
    Ok(h)
}

/// The page's head, title and the audit's verdict.
fn header(r: &Report, h: &mut String) {
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>gpdp report</title><style>{STYLE}</style></head><body>"
    );
    let audit = &r.optouts.audit;
    let _ = write!(
        h,
        "<h1>gpdp: the evidence, measured</h1><p class=\"note\">Store <code>{}</code>, generation {}, report made {} in {:.2} s. Every figure here is also in <code>report.json</code> (schema {}).</p>\
         <p class=\"verdict {}\">Audit: {}</p>",
        esc(&r.store),
        r.generation,
        esc(&r.generated_at),
        r.seconds,
        r.schema,
        if audit.passed { "ok" } else { "bad" },
        if audit.passed {
            format!("all {} checks passed", audit.checks.len())
        } else {
            format!(
                "FAILED: {}",
                audit
                    .checks
                    .iter()
                    .filter(|c| !c.passed)
                    .map(|c| c.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
}

/// 1. De-identification on collection.
fn collection(r: &Report, h: &mut String) -> anyhow::Result<()> {
    let c = &r.collection;
    let _ = write!(
        h,
        "<h2>1. De-identification on collection</h2>{}",
        kv_table(&[
            ("practices collected", c.practices.to_string()),
            (
                "rows in (identifiable, practice side)",
                c.rows_in.to_string()
            ),
            (
                "rows stored (de-identified)",
                if c.rows_masked_awaiting_purge > 0 {
                    format!(
                        "{} (and {} rows of later opt-outs, unreachable, awaiting the purge)",
                        c.rows_out, c.rows_masked_awaiting_purge
                    )
                } else {
                    c.rows_out.to_string()
                }
            ),
            ("patients stored", c.patients_out.to_string()),
            (
                "rows quarantined (never left the practice)",
                c.quarantined.values().sum::<u64>().to_string()
            ),
            (
                "rows dropped for excluded codes",
                c.excluded_codes.values().sum::<u64>().to_string()
            ),
            ("collection policy SHA-256", c.policy_sha256.join(", ")),
        ])
    );
    let labels: Vec<String> = c.quarantined.keys().cloned().collect();
    let values: Vec<f64> = c.quarantined.values().map(|v| *v as f64).collect();
    *h += &bar_chart(
        "Rows quarantined, by reason",
        &labels,
        &values,
        "rows",
        None,
    );
    let labels: Vec<String> = c.excluded_codes.keys().cloned().collect();
    let values: Vec<f64> = c.excluded_codes.values().map(|v| *v as f64).collect();
    if !labels.is_empty() {
        *h += &bar_chart(
            "Rows dropped for excluded codes, by category",
            &labels,
            &values,
            "rows",
            None,
        );
    }
    *h += "<p>What the policy does with every column";
    if !c.policy_is_builtin {
        *h += " (the built-in policy's actions; the batches were collected under the policy hashes above)";
    }
    *h += ":</p><table><tr><th>table</th><th>column</th><th>action</th></tr>";
    for col in &c.columns {
        let _ = write!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            esc(&col.table),
            esc(&col.column),
            esc(&col.action)
        );
    }
    *h += "</table><p>Checks that no direct identifier reached the store:</p>";
    *h += &checks_table(&c.identifier_checks);
    if c.held.is_empty() {
        *h += "<p>No input is held by the shrink guards.</p>";
    } else {
        *h += "<p>Inputs held by the shrink guards (the batch or source in force stays until an input that looks whole, or one taken with <code>--accept-shrink</code>):</p><table><tr><th>when</th><th>command</th><th>practice or source</th><th>rule</th><th>why</th></tr>";
        for held in &c.held {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                esc(&held.time),
                esc(&held.command),
                esc(&held.input),
                esc(&held.rule),
                esc(&held.detail)
            );
        }
        *h += "</table>";
    }
    Ok(())
}

/// 2. Opt-outs.
fn optouts(r: &Report, h: &mut String) -> anyhow::Result<()> {
    let audit = &r.optouts.audit;
    let o = &r.optouts;
    let _ = write!(
        h,
        "<h2>2. Opt-outs</h2>{}",
        kv_table(&[
            (
                "Type 1: patients withheld at source",
                o.type1_at_source.to_string()
            ),
            (
                "tombstones in force",
                o.tombstones
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "later Type 1 opt-outs made unreachable (optout apply)",
                format!(
                    "{} patients, {} rows, in {} runs",
                    o.later.patients_deleted, o.later.rows_removed, o.later.runs
                )
            ),
            (
                "of them erased from the bytes (optout purge)",
                format!(
                    "{} patients, {} rows, in {} purges",
                    o.later.patients_erased, o.later.rows_erased, o.later.purges
                )
            ),
            ("backlog: requests pending", o.later.pending.to_string()),
            (
                "request to unreachable (last run median / longest)",
                match (
                    o.later.latency_median_seconds_last_run,
                    o.later.latency_max_seconds
                ) {
                    (Some(m), Some(x)) => format!("{m:.1} s / {x:.1} s"),
                    _ => "no later opt-outs yet".into(),
                },
            ),
            (
                "request to erased (last purge median / longest)",
                match (
                    o.later.latency_erased_median_seconds_last_purge,
                    o.later.latency_erased_max_seconds
                ) {
                    (Some(m), Some(x)) => format!("{m:.1} s / {x:.1} s"),
                    _ => "none erased yet".into(),
                },
            ),
            (
                "National Data Opt-out list",
                o.ndoo_listed.map_or(
                    "not ingested: projects it applies to see nobody".into(),
                    |n| format!("{n} patients")
                ),
            ),
        ])
    );
    let labels: Vec<String> = o.projects.iter().map(|p| p.project.clone()).collect();
    let values: Vec<f64> = o
        .projects
        .iter()
        .map(|p| p.registered_patients.unwrap_or(0) as f64)
        .collect();
    *h += &bar_chart(
        "Registered patients each project's views show (the NDOO filter at work)",
        &labels,
        &values,
        "patients",
        None,
    );
    *h += "<p>The audit:</p>";
    *h += &checks_table(&audit.checks);
    Ok(())
}

/// 3. Representativeness.
fn representativeness(r: &Report, h: &mut String) -> anyhow::Result<()> {
    let rep = &r.representativeness;
    let _ = write!(
        h,
        "<h2>3. Representativeness of the research population</h2><p>The research population (registered patients in <code>{}</code>'s views: after Type 1, the NDOO and later opt-outs) against {}: {} of {} retained ({}). Each bar is a group's retained share minus the overall share, in percentage points: a bar to the left (red) is a group that opt-outs left under-represented.</p>",
        esc(&rep.research_project),
        esc(&rep.baseline),
        rep.research,
        rep.population,
        pct(rep.retained_share)
    );
    for d in &rep.dimensions {
        let groups: Vec<Difference> = d
            .groups
            .iter()
            .map(|g| Difference {
                label: &g.value,
                points: g.difference_pp,
                count: g.population,
            })
            .collect();
        *h += &difference_chart(
            &format!(
                "Retained by {}: difference from the overall {}",
                d.name,
                pct(rep.retained_share)
            ),
            "percentage points (n = the group's population)",
            &groups,
        );
        *h += "<table><tr><th>group</th><th>population</th><th>research</th><th>retained</th><th>difference</th></tr>";
        for g in &d.groups {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:+.1} pp</td></tr>",
                esc(&g.value),
                g.population,
                g.research,
                pct(g.retained_share),
                g.difference_pp
            );
        }
        *h += "</table>";
    }
    Ok(())
}

/// 4. Re-identification risk.
fn reidentification(r: &Report, h: &mut String) -> anyhow::Result<()> {
    let k = &r.reidentification;
    let _ = write!(
        h,
        "<h2>4. Re-identification risk of the stored quasi-identifiers</h2><p>Quasi-identifiers: <code>{}</code>, one record per stored patient and profile (a patient who moved area has two).</p>{}",
        k.quasi_identifiers.join(", "),
        kv_table(&[
            ("records", k.records.to_string()),
            ("equivalence classes", k.classes.to_string()),
            ("k-anonymity (smallest class)", k.k_anonymity.to_string()),
            (
                "records in classes smaller than 5",
                pct(k.share_in_classes_below_5)
            ),
            (
                "records in classes smaller than 10",
                pct(k.share_in_classes_below_10)
            ),
            ("unique records", pct(k.share_unique)),
        ])
    );
    let order = ["1", "2-4", "5-9", "10-19", "20+"];
    let labels: Vec<String> = order.iter().map(|s| s.to_string()).collect();
    let values: Vec<f64> = order
        .iter()
        .map(|b| {
            let n = k.records_by_class_size.get(*b).copied().unwrap_or(0);
            if k.records == 0 {
                0.0
            } else {
                100.0 * n as f64 / k.records as f64
            }
        })
        .collect();
    *h += &bar_chart(
        "Records by the size of their equivalence class",
        &labels,
        &values,
        "% of records",
        None,
    );
    *h += "<p class=\"note\">These records never leave the TRE: researchers get aggregates only, with disclosure control. The figures say how much the boundary has to protect.</p>";
    Ok(())
}

/// 5. The TRE.
fn tre(r: &Report, h: &mut String) -> anyhow::Result<()> {
    let t = &r.tre;
    let _ = write!(
        h,
        "<h2>5. The Trusted Research Environment</h2>{}",
        kv_table(&[
            ("queries", t.queries.to_string()),
            ("released", t.released.to_string()),
            (
                "refused",
                t.refused_by_rule.values().sum::<u64>().to_string()
            ),
            ("failed", t.errors.to_string()),
            (
                "statistics redacted by disclosure control",
                t.cells_suppressed.to_string()
            ),
            (
                "rows withheld (every statistic redacted; not shown to researchers)",
                t.rows_withheld.to_string()
            ),
            (
                "audit chain",
                format!(
                    "{}: {}",
                    if t.chain_intact { "intact" } else { "BROKEN" },
                    t.chain
                )
            ),
        ])
    );
    let mut labels = vec!["released".to_owned(), "failed".to_owned()];
    let mut values = vec![t.released as f64, t.errors as f64];
    for (rule, n) in &t.refused_by_rule {
        labels.push(format!("refused: {rule}"));
        values.push(*n as f64);
    }
    *h += &bar_chart(
        "Queries by outcome (refusals by rule)",
        &labels,
        &values,
        "queries",
        None,
    );
    *h += "<h3>Researchers' effective guarantees</h3><table><tr><th>researcher</th><th>projects (rule set)</th><th>effective guarantee</th></tr>";
    for res in &t.researchers {
        let projects: Vec<String> = res
            .projects
            .iter()
            .zip(&res.rule_sets)
            .map(|(p, rules)| format!("<code>{}</code> ({})", esc(p), esc(rules)))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}{}</td></tr>",
            esc(&res.user),
            projects.join(", "),
            esc(&res.effective_guarantee),
            res.mixed_rules_reason
                .as_ref()
                .map_or(String::new(), |why| format!(
                    "<br>mixed rules approved: {}",
                    esc(why)
                ))
        );
    }
    *h += "</table><p class=\"note\">A researcher's guarantee is the weakest rule set among the projects they reach, since all of them are over the same patients: ρ-bounded (<code>dp</code>) is stronger than the cell key method (<code>ckm</code>: bounded noise, not differential privacy), which is stronger than deterministic rules (<code>acro</code>, <code>opensafely</code>: output checking needed). The policy refuses a <code>dp</code> project beside another rule set without a recorded <code>mixed_rules_reason</code>.</p>";
    if !t.privacy_budgets.is_empty() {
        *h += "<h3>Privacy budgets (differential privacy)</h3><table><tr><th>researcher</th><th>ρ spent</th><th>ρ budget</th><th>ρ left</th><th>statistics charged</th><th>spent as (ε, δ)</th></tr>";
        for b in &t.privacy_budgets {
            let opt = |x: Option<f64>| x.map_or("—".to_owned(), |x| format!("{x:.4}"));
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:.4}</td><td>{}</td><td>{}</td><td>{}</td><td>ε {:.2}, δ {:e}</td></tr>",
                esc(&b.user),
                b.rho_spent,
                opt(b.rho_budget),
                opt(b.rho_remaining),
                b.charges,
                b.epsilon_spent,
                b.delta
            );
        }
        *h += "</table><p class=\"note\">Every charge is a line of the store's hash-chained audit log, written before the query ran; a query that would overspend is refused (<code>budget_exhausted</code>) and costs nothing. zCDP's ρ adds up over queries; ε = ρ + 2√(ρ ln(1/δ)).</p>";
    }
    *h += &super::privacy::render(&r.privacy_attacks)?;
    *h += "<h3>By project and month, as the public register publishes them</h3><p class=\"note\">The same figures, computed by the same code, as <code>gpdp register</code> writes to <code>register.html</code> for the public (with the released SQL, the opt-out figures and the audit log's head).</p>";
    *h += &crate::register::html::activity_table(&t.register_activity);
    *h += "<table><tr><th>project</th><th>purpose</th><th>National Data Opt-out</th><th>disclosure rules</th></tr>";
    for p in &t.projects {
        let _ = write!(
            h,
            "<tr><td><code>{}</code><br>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&p.id),
            esc(&p.title),
            esc(&p.purpose),
            esc(&p.ndoo),
            esc(&p.disclosure)
        );
    }
    *h += "</table>";
    Ok(())
}

/// 6. Throughput and timeliness.
fn throughput(r: &Report, h: &mut String) -> anyhow::Result<()> {
    let tp = &r.throughput;
    let _ = writeln!(
        h,
        "<h2>6. Throughput and timeliness</h2>{}",
        kv_table(&[
            ("rows collected (current batches)", tp.rows_in.to_string()),
            (
                "extract size",
                format!("{:.1} MB", tp.bytes_in as f64 / 1e6)
            ),
            (
                "extract to research-ready data",
                format!("{:.2} s", tp.extract_to_research_ready_seconds)
            ),
            ("rows per second", format!("{:.0}", tp.rows_per_second)),
        ])
    );
    if let Some(l) = &r.linkage {
        *h += &super::linkage::render(l)?;
    }
    Ok(())
}
