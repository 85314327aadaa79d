//! The register as one self-contained HTML page (inline CSS, no scripts,
//! nothing fetched), written for patients first and auditors second. Every
//! figure is also in `register.json`, which [`write()`] writes beside it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::Register;
use crate::page::{STYLE, esc, kv_table};

/// Writes `register.json` (the [`Register`] serialised) and `register.html` (its
/// page) into `out`; returns their paths.
pub fn write(register: &Register, out: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("register.json");
    std::fs::write(&json, serde_json::to_string_pretty(register)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let page = out.join("register.html");
    std::fs::write(&page, render(register))
        .with_context(|| format!("writing {}", page.display()))?;
    Ok((json, page))
}

/// The whole page.
pub fn render(r: &Register) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>GP data for research: who uses it, and how</title><style>{STYLE}</style></head><body>\
         <h1>GP data for research: who uses it, and how</h1>\
         <p class=\"note\">The public data-uses register of this store, made {} at store generation {}. Every figure here is also in <code>register.json</code> ({}).</p>",
        esc(&r.generated_at),
        r.store_generation,
        r.schema
    );
    h += &for_patients(r);

    h += "<h2>Projects</h2><p>Every project approved to ask questions of this data. Researchers never see records: only counts and averages over groups of patients, checked before release.</p>\
          <table><tr><th>project</th><th>purpose</th><th>legal basis</th><th>National Data Opt-out</th><th>tables</th><th>disclosure control</th><th>approved researchers</th></tr>";
    for p in &r.projects {
        let _ = write!(
            h,
            "<tr><td><b>{}</b><br>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            esc(&p.id),
            esc(&p.title),
            esc(&p.purpose),
            esc(&p.legal_basis),
            esc(&p.national_data_opt_out),
            esc(&p.tables.join(", ")),
            esc(&p.disclosure),
            p.approved_researchers
        );
    }
    h += "</table>";

    h += "<h2>Researchers, and what protects patients from each</h2><p>Each approved researcher (not named), the projects they may ask, and their <b>effective guarantee</b>: the weakest rules among their projects, since all of them are over the same patients and an answer under weaker rules can undo what stronger ones protect. From strongest to weakest: <i>ρ-bounded</i> (differential privacy: every answer is noisy and charged to a limited budget, which bounds what any number of questions reveals about one person); <i>cell key method</i> (bounded noise, not differential privacy: many questions together can still reveal people); <i>deterministic rules</i> (small numbers withheld and counts rounded: people checking the outputs are needed).</p>\
          <table><tr><th>researcher</th><th>projects (rules)</th><th>effective guarantee</th></tr>";
    for (i, res) in r.researchers.iter().enumerate() {
        let projects: Vec<String> = res
            .projects
            .iter()
            .zip(&res.rule_sets)
            .map(|(p, rules)| format!("{} (<code>{}</code>)", esc(p), esc(rules)))
            .collect();
        let _ = write!(
            h,
            "<tr><td>researcher {}</td><td>{}</td><td>{}{}</td></tr>",
            i + 1,
            projects.join(", "),
            esc(&res.effective_guarantee),
            if res.mixed_rules_reason_recorded {
                " (approved for mixed rules, with a recorded reason)"
            } else {
                ""
            }
        );
    }
    h += "</table>";

    h += "<h2>Questions asked, by project and month</h2><p>Released: answered. Refused: the rules did not allow the question (nothing was run, or nothing shown). Failed: it could not be answered (too slow, or an error). A statistic is withheld when too few patients are in it; a row is left out when all of its statistics are withheld. Privacy budget: how much of a researcher's limited allowance for noisy answers the project's questions used (zCDP ρ).</p>";
    h += &activity_table(&r.activity);

    let _ = write!(
        h,
        "<h2>Every released question</h2><p>The exact question (SQL, comments removed) and a fingerprint (SHA-256) of the answer released, so that an answer someone publishes can be matched to this register. {} released.</p>",
        r.released_queries.len()
    );
    if !r.released_queries.is_empty() {
        h += "<table><tr><th>time (UTC)</th><th>project</th><th>question (SQL)</th><th>rows</th><th>answer SHA-256</th></tr>";
        for q in &r.released_queries {
            let sql = match (&q.sql, &q.sql_withheld) {
                (Some(sql), _) => format!("<code>{}</code>", esc(sql)),
                (None, Some(why)) => format!("<i>{}</i>", esc(why)),
                (None, None) => String::new(),
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{sql}</td><td>{}</td><td><code class=\"hash\">{}</code></td></tr>",
                esc(&q.time),
                esc(&q.project),
                q.rows,
                esc(&q.result_sha256)
            );
        }
        h += "</table>";
    }

    let o = &r.optouts;
    let _ = write!(
        h,
        "<h2>Opt-outs honoured</h2>{}",
        kv_table(&[
            (
                "patients whose records never left their practice (Type 1 opt-out)",
                o.type1_withheld_at_collection.to_string()
            ),
            (
                "patients whose records were deleted after a later Type 1 opt-out",
                format!(
                    "{} (in {} deletion runs)",
                    o.type1_deleted_later, o.deletion_runs
                )
            ),
            (
                "of them, patients whose records are also erased from the stored bytes",
                format!(
                    "{} (in {} purges; the others no one can read, awaiting the purge)",
                    o.type1_erased_later, o.purge_runs
                )
            ),
            (
                "from a request to records no one can read (last run's median / longest)",
                latency(
                    o.unreachable_latency_median_seconds_last_run,
                    o.unreachable_latency_max_seconds
                )
            ),
            (
                "from a request to records erased (last purge's median / longest)",
                latency(
                    o.erased_latency_median_seconds_last_purge,
                    o.erased_latency_max_seconds
                )
            ),
            (
                "patients on the National Data Opt-out list, removed from every project it applies to",
                o.national_data_opt_out_listed
                    .map_or("no list held".into(), |n| n.to_string())
            ),
        ])
    );

    let head = &r.log_head;
    let _ = write!(
        h,
        "<h2>The audit log's head</h2><p>Everything this store does is written to a log in which each line is sealed with the one before it. This is where the log stood when the register was made:</p>\
         <p><code>{}</code></p>\
         <p class=\"note\">Keep a copy. Anyone can later ask the operator to run <code>gpdp audit --expect-head '…'</code> with it: if the log has been cut short or rewritten since — for example to hide a restore that brought deleted records back — the check fails.</p>",
        esc(&head.to_string())
    );
    h += "</body></html>\n";
    h
}

/// Per project and month: queries by outcome, statistics released and
/// withheld, ρ spent (also in `gpdp report`).
pub(crate) fn activity_table(activity: &[super::Activity]) -> String {
    if activity.is_empty() {
        return "<p>No questions have been asked yet.</p>".into();
    }
    let mut h = String::from(
        "<table><tr><th>project</th><th>month</th><th>released</th><th>refused</th><th>failed</th><th>statistics released</th><th>statistics withheld</th><th>rows left out</th><th>privacy budget spent (ρ)</th></tr>",
    );
    for a in activity {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&a.project),
            esc(&a.month),
            a.released,
            a.refused,
            a.failed,
            a.cells_released,
            a.cells_withheld,
            a.rows_withheld,
            if a.rho_spent > 0.0 {
                format!("{:.3}", a.rho_spent)
            } else {
                "–".into()
            }
        );
    }
    h + "</table>"
}

/// What a patient asks first, in plain English, from the policies in force.
fn for_patients(r: &Register) -> String {
    // "patients: sex, date of birth (month only), …; clinical events: …"
    let of = |wanted: &dyn Fn(&str) -> bool| -> String {
        let mut tables: Vec<(String, Vec<String>)> = Vec::new();
        for c in r.collected.iter().filter(|c| wanted(&c.action)) {
            let column = c.column.replace('_', " ");
            let column = match c.action.as_str() {
                "generalise (month)" => format!("{column} (month only)"),
                "generalise (year)" => format!("{column} (year only)"),
                "generalise (lsoa)" => {
                    format!("{column} (only its small area and how deprived that is)")
                }
                _ => column,
            };
            let table = c.table.replace('_', " ");
            match tables.last_mut() {
                Some((t, cols)) if *t == table => cols.push(column),
                _ => tables.push((table, vec![column])),
            }
        }
        let parts: Vec<String> = tables
            .into_iter()
            .map(|(t, cols)| format!("{t}: {}", cols.join(", ")))
            .collect();
        esc(&parts.join("; "))
    };
    let codes: Vec<String> = r
        .never_collected_codes
        .iter()
        .map(|c| match c.as_str() {
            "hiv" => "HIV".to_owned(),
            "ivf" => "IVF".to_owned(),
            "type1_opt_out" => "the opt-out codes themselves".to_owned(),
            c => c.replace('_', " "),
        })
        .collect();
    format!(
        "<h2>For patients</h2>\
         <p><b>What is collected.</b> From each GP practice's records: your year and month of birth (not the day), sex, ethnicity, the small area you live in (an area of about 1,500 people, and how deprived it is, not your address), when you registered, and your diagnoses, test results and prescriptions as codes and dates. In full, what leaves the practice, table by table: {}.</p>\
         <p><b>What is not.</b> Your name, address, postcode, date of birth and anything you or your GP wrote in free text never leave the practice (in full: {}). Your NHS number is replaced at the practice by a code made with a secret key that stays at the practice, so the data cannot be joined back to you by anyone without that key. Records about these never leave the practice at all: {}.</p>\
         <p><b>Who sees it.</b> Nobody downloads the data. Approved researchers, on the projects listed below, send questions to a secure environment and get back only counts and averages over groups of patients; answers about too few people are withheld, and some projects add deliberate noise so that no answer depends on one person. Every question, answered or refused, is listed in this register.</p>\
         <p><b>Hospital and death records.</b> Your hospital admissions (diagnoses and procedures as codes, dates) and, after death, the registered causes of death may be linked to your GP record, on the same code that replaces your NHS number; the hospital's own record number and the exact date of death are not kept.</p>\
         <p><b>Type 1 opt-out (at your GP practice).</b> Tell your practice you do not want your records shared for purposes other than your care. Then your GP records are not collected from the practice at all; if they had been collected before, they are deleted from every table (at once no one can read them; a later purge erases them from the stored files), and both steps are recorded with proof. It covers what leaves your practice, not hospital or death records.</p>\
         <p><b>National Data Opt-out (through the NHS).</b> Register at nhs.uk/your-nhs-data-matters or through the NHS App. Your records may still be collected, but no research or planning project sees them — GP, hospital or death records — unless it has a specific legal exemption, which this register shows project by project.</p>\
         <p><b>Asking about your own records.</b> Your GP practice can check, with its key, whether your records are held here, whether an opt-out applies to you, and which projects' data could include you.</p>",
        of(&|a| a == "keep" || a.starts_with("generalise")),
        of(&|a| a == "drop"),
        esc(&codes.join(", ")),
    )
}

/// "1.2 s / 3.4 s", or "none yet".
fn latency(median: Option<f64>, max: Option<f64>) -> String {
    match (median, max) {
        (Some(m), Some(x)) => format!("{m:.1} s / {x:.1} s"),
        _ => "none yet".into(),
    }
}
