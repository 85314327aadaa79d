//! The docs cannot go stale: what README.md and docs/*.md show is checked.
//!
//! - **Links**: every relative link resolves to a file of the repository
//!   (and an anchor to a heading), and nothing sends the reader outside it.
//! - **Examples**: every ```` ```console ```` block is a transcript that is
//!   run, in order, and must print what it shows:
//!   - `$ command` starts an example (a line ending in `\` continues it);
//!     `gpdp …` and `cargo run --release -- …` both run the binary under
//!     test, anything else runs in `sh`;
//!   - `? N` on the line after the command expects exit status N (else 0);
//!   - the lines after that are what it prints, stdout and stderr as a
//!     terminal interleaves them, with snapbox's wildcards for what differs
//!     from run to run (timings, noise, hashes, ports): `[..]` for any text
//!     within a line and `...` on a line of its own for any lines.
//!
//!   Each page runs in its own empty directory, in which the repository's
//!   `policies/` and `synthetic-data/` are linked (examples read them); its
//!   examples share that directory, so the guide's first example (the
//!   demo) makes the store its later examples use.
//!   `GPDP_DOCS=complete cargo test --test it -- docs::` writes in the output
//!   of every example that shows none (review it, and elide what varies).
//! - **Measurements**: a figure in a table is written by the script that
//!   measured it. The bench scripts write `docs/measurements/<name>.md`
//!   (`benches/measured.py`: the command, date, commit and machine above the
//!   tables); a page includes one between `<!-- measured: measurements/<name>.md -->`
//!   and `<!-- end measured -->`, and the copy must be the file as written
//!   (`GPDP_DOCS=complete` copies the files in).

use std::path::{Path, PathBuf};
use std::process::Command;

use snapbox::IntoData;

use crate::common::{gpdp, stdout};

/// The pages whose examples and links are checked: README.md and docs/*.md.
fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    pages.sort();
    pages
}

/// One `$ command` of a console block and what it must print.
#[derive(Debug)]
struct Example {
    /// The line of the `$`, 1-based.
    line: usize,
    command: String,
    status: i32,
    expected: String,
    /// The index (0-based) of the line after the command (and its `? N`),
    /// where `complete` writes the output in.
    output_at: usize,
}

/// The examples of a page's console blocks, in order.
fn examples(text: &str) -> Vec<Example> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "```console" {
            i += 1;
            continue;
        }
        i += 1;
        while i < lines.len() && !lines[i].starts_with("```") {
            let Some(first) = lines[i].strip_prefix("$ ") else {
                panic!(
                    "line {}: a console block's text must follow a `$ ` command",
                    i + 1
                );
            };
            let line = i + 1;
            let mut command = first.to_string();
            while command.ends_with('\\') {
                i += 1;
                command.push('\n');
                command.push_str(lines[i]);
            }
            i += 1;
            let mut status = 0;
            if let Some(s) = lines.get(i).and_then(|l| l.strip_prefix("? ")) {
                status = s
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("line {}: `? N`", i + 1));
                i += 1;
            }
            let output_at = i;
            let mut expected = String::new();
            while i < lines.len() && !lines[i].starts_with("$ ") && !lines[i].starts_with("```") {
                expected.push_str(lines[i]);
                expected.push('\n');
                i += 1;
            }
            out.push(Example {
                line,
                command,
                status,
                expected,
                output_at,
            });
        }
        i += 1;
    }
    out
}

/// A directory holding `gpdp`, the binary under test, to put first in `PATH`.
fn bin_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_gpdp"), dir.join("gpdp")).unwrap();
    dir
}

/// Runs `example` in `cwd`: its exit status and what it printed.
fn run(example: &Example, cwd: &Path, bin: &Path) -> (i32, String) {
    let command = example.command.replace("cargo run --release -- ", "gpdp ");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 2>&1\n{command}"))
        .current_dir(cwd)
        .env("PATH", path)
        .env_remove("GPDP_TOKEN")
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// Every console example of README.md and docs/*.md prints what it shows.
#[test]
fn the_docs_examples_print_what_they_show() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let complete = std::env::var("GPDP_DOCS").is_ok_and(|v| v == "complete");
    let tmp = tempfile::tempdir().unwrap();
    let bin = bin_dir(tmp.path());
    let mut failures = Vec::new();
    let mut ran = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let examples = examples(&text);
        if examples.is_empty() {
            continue;
        }
        let name = page.strip_prefix(root).unwrap().display().to_string();
        let cwd = tmp.path().join(name.replace('/', "_"));
        std::fs::create_dir_all(&cwd).unwrap();
        for linked in ["policies", "synthetic-data"] {
            std::os::unix::fs::symlink(root.join(linked), cwd.join(linked)).unwrap();
        }
        let mut fills = Vec::new();
        for example in &examples {
            let (status, actual) = run(example, &cwd, &bin);
            ran += 1;
            let at = format!("{name}:{}: $ {}", example.line, example.command);
            if status != example.status {
                failures.push(format!(
                    "{at}\nexited {status}, the page says {}; it printed:\n{actual}",
                    example.status
                ));
                continue;
            }
            if complete && example.expected.is_empty() {
                fills.push((example.output_at, actual));
                continue;
            }
            if let Err(e) = snapbox::Assert::new().try_eq(
                Some(&at),
                actual.into_data(),
                example.expected.clone().into_data(),
            ) {
                failures.push(e.to_string());
            }
        }
        if !fills.is_empty() {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            for (at, actual) in fills.into_iter().rev() {
                lines.splice(at..at, actual.lines().map(str::to_string));
            }
            std::fs::write(&page, lines.join("\n") + "\n").unwrap();
        }
    }
    assert!(ran > 0, "no console examples found in README.md or docs/");
    assert!(
        failures.is_empty(),
        "{} of {ran} examples differ:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Where a page includes a measurement file: `(start, end, file)`, the
/// lines (0-based) of the opening and closing markers and the file named.
fn includes(text: &str) -> Vec<(usize, usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in lines.iter().enumerate() {
        if let Some(rest) = line.strip_prefix("<!-- measured: ") {
            assert!(
                open.is_none(),
                "line {}: a measured block inside another",
                i + 1
            );
            let file = rest
                .strip_suffix(" -->")
                .unwrap_or_else(|| panic!("line {}: `<!-- measured: FILE -->`", i + 1));
            open = Some((i, file.to_string()));
        } else if line.trim_end() == "<!-- end measured -->" {
            let (start, file) = open
                .take()
                .unwrap_or_else(|| panic!("line {}: an end without a start", i + 1));
            out.push((start, i, file));
        }
    }
    assert!(open.is_none(), "a measured block is not closed");
    out
}

/// What a page shows of a measurement file: all of it but its title.
fn included(file: &str) -> String {
    let body = match file.split_once('\n') {
        Some((first, rest)) if first.starts_with("# ") => rest.trim_start_matches('\n'),
        _ => file,
    };
    body.trim_end().to_string()
}

/// Every measurement a page includes is the file its script wrote, unedited;
/// and every measurement file is included somewhere or linked, so none is
/// left behind as the docs move on.
#[test]
fn the_docs_include_the_measurements_as_written() {
    let complete = std::env::var("GPDP_DOCS").is_ok_and(|v| v == "complete");
    let mut stale = Vec::new();
    let mut shown = std::collections::BTreeSet::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let dir = page.parent().unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let mut changed = false;
        for (start, end, file) in includes(&text).into_iter().rev() {
            let path = dir.join(&file);
            let written = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {file}: {e}", page.display()));
            shown.insert(path.canonicalize().unwrap());
            let copy = lines[start + 1..end].join("\n").trim().to_string();
            if copy != included(&written) {
                if complete {
                    lines.splice(
                        start + 1..end,
                        ["".to_string(), included(&written), "".to_string()],
                    );
                    changed = true;
                } else {
                    stale.push(format!("{} line {}: {file}", page.display(), start + 1));
                }
            }
        }
        for target in markdown_links(&text) {
            let file = target.split('#').next().unwrap();
            if file.contains("measurements/")
                && !file.contains("://")
                && let Ok(p) = dir.join(file).canonicalize()
            {
                shown.insert(p);
            }
        }
        if changed {
            std::fs::write(&page, lines.join("\n") + "\n").unwrap();
        }
    }
    assert!(
        stale.is_empty(),
        "a page's copy of a measurement differs from the file its script wrote (GPDP_DOCS=complete copies them in):\n{}",
        stale.join("\n")
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for e in std::fs::read_dir(root.join("docs/measurements")).unwrap() {
        let p = e.unwrap().path().canonicalize().unwrap();
        assert!(
            shown.contains(&p),
            "{} is neither included nor linked by any page",
            p.display()
        );
    }
}

#[test]
fn measured_blocks_are_found_and_their_titles_left_out() {
    let page = "a\n<!-- measured: measurements/x.md -->\nold\n<!-- end measured -->\nb\n";
    assert_eq!(
        includes(page),
        vec![(1, 3, "measurements/x.md".to_string())]
    );
    assert_eq!(
        included("# Title\n\nWritten by x.\n\n| a |\n"),
        "Written by x.\n\n| a |"
    );
    assert!(std::panic::catch_unwind(|| includes("<!-- measured: x.md -->\n")).is_err());
}

/// The `--flag`s of a text, in order, once each.
fn flags(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        if word.len() > 2
            && word.starts_with("--")
            && word.as_bytes()[2].is_ascii_lowercase()
            && !out.iter().any(|f| f == word)
        {
            out.push(word.to_string());
        }
    }
    out
}

/// Each command's synopsis in the guide (a plain block starting `gpdp
/// <command>`) names exactly the flags its `--help` lists, so a flag added,
/// renamed or removed shows up in the guide too (`--help`, `--quiet` and
/// `--version` apply to every command and are said once, above them).
#[test]
fn the_guides_synopses_name_every_flag_and_no_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/guide.md")).unwrap();
    let lines: Vec<&str> = guide.lines().collect();
    let mut checked = Vec::new();
    let mut wrong = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i] != "```" || !lines.get(i + 1).is_some_and(|l| l.starts_with("gpdp ")) {
            i += 1;
            continue;
        }
        let start = i + 1;
        i = start;
        while !lines[i].starts_with("```") {
            i += 1;
        }
        let block = lines[start..i].join("\n");
        i += 1;
        // A synopsis shows placeholders (`FILE`, `[--json]`); an example
        // names real paths and is run by the examples' test instead.
        if !block.contains('[') && !block.chars().any(|c| c.is_ascii_uppercase()) {
            continue;
        }
        let command: Vec<&str> = block
            .split_whitespace()
            .skip(1)
            .take_while(|w| {
                w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-')
            })
            .collect();
        let help = gpdp().args(&command).arg("--help").output().unwrap();
        assert!(help.status.success(), "gpdp {} --help", command.join(" "));
        // The options clap lists: lines that start with a flag, indented as
        // an option is (a description's wrapped lines are indented further).
        let options: String = stdout(&help)
            .lines()
            .filter(|l| l.trim_start().starts_with('-') && l.len() - l.trim_start().len() <= 6)
            .map(|l| l.trim_start().split("  ").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let listed: Vec<String> = flags(&options)
            .into_iter()
            .filter(|f| !["--help", "--quiet", "--version"].contains(&f.as_str()))
            .collect();
        let shown = flags(&block);
        let missing: Vec<&String> = listed.iter().filter(|f| !shown.contains(f)).collect();
        let unknown: Vec<&String> = shown.iter().filter(|f| !listed.contains(f)).collect();
        if !missing.is_empty() || !unknown.is_empty() {
            wrong.push(format!(
                "docs/guide.md line {}: gpdp {}: not in the synopsis {missing:?}; not a flag of the command {unknown:?}",
                start + 1,
                command.join(" ")
            ));
        }
        checked.push(command.join(" "));
    }
    assert!(checked.len() >= 15, "only {checked:?} synopses found");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The parser reads commands, continuations, statuses and outputs, and a
/// block's stray text is an error rather than skipped.
#[test]
fn console_blocks_are_read_as_transcripts() {
    let page =
        "text\n```console\n$ gpdp a \\\n  --b\nout 1\n\n$ false\n? 1\n```\n```\n$ not run\n```\n";
    let e = examples(page);
    assert_eq!(e.len(), 2);
    assert_eq!(
        (e[0].line, e[0].command.as_str(), e[0].status),
        (3, "gpdp a \\\n  --b", 0)
    );
    assert_eq!(e[0].expected, "out 1\n\n");
    assert_eq!(
        (e[1].command.as_str(), e[1].status, e[1].expected.as_str()),
        ("false", 1, "")
    );
    assert_eq!(e[1].output_at, 8);
    let stray = std::panic::catch_unwind(|| examples("```console\nno prompt\n```\n"));
    assert!(stray.is_err());
}

/// The README routes into docs/, and the docs point at files and at each
/// other: every relative link in README.md and docs/*.md — `[text](path)`
/// and `[text](path#anchor)` — must name a file or directory of the
/// repository, and an anchor into a Markdown page must be one of its
/// headings or `<a id="…">`s. And no file of the repository may send the
/// reader to the design notes outside it (a parent directory's `shared`).
#[test]
fn the_docs_links_resolve_and_nothing_points_outside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pages = pages();
    for must in [
        "guide.md",
        "boundary.md",
        "benchmarks.md",
        "testing.md",
        "design.md",
        "layout.md",
    ] {
        assert!(
            pages
                .iter()
                .any(|p| p.ends_with(Path::new("docs").join(must))),
            "docs/{must} is missing"
        );
    }
    let mut checked = 0;
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        let dir = page.parent().unwrap();
        for target in markdown_links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                page.clone()
            } else {
                dir.join(path)
            };
            checked += 1;
            let inside = std::fs::canonicalize(&file)
                .is_ok_and(|f| f.starts_with(std::fs::canonicalize(root).unwrap()));
            if !inside {
                broken.push(format!("{}: {target} (no such file)", page.display()));
                continue;
            }
            if let Some(anchor) = anchor
                && file.extension().is_some_and(|x| x == "md")
                && !anchors(&std::fs::read_to_string(&file).unwrap()).contains(anchor)
            {
                broken.push(format!("{}: {target} (no such anchor)", page.display()));
            }
        }
    }
    assert!(checked >= 30, "only {checked} relative links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));

    // Built here, so that this file does not name what it looks for.
    let outside = ["..", "shared"].join("/");
    let design = ["shared", "DESIGN.md"].join("/");
    let mut files = vec![root.join("README.md"), root.join("Cargo.toml")];
    let mut stack: Vec<_> = [
        "src", "tests", "docs", "benches", "scripts", "examples", "policies", "mutants", ".ci",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| {
            let bytes = std::fs::read(f).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            text.contains(&outside) || text.contains(&design)
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(files.len() > 100, "only {} files scanned", files.len());
    assert!(
        offenders.is_empty(),
        "files that point outside the repository for its design: {offenders:?}"
    );
}

/// The targets of `[text](target)` links outside fenced code blocks.
fn markdown_links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            if !target.is_empty() {
                out.push(target.to_owned());
            }
            rest = &rest[end..];
        }
    }
    out
}

/// The anchors a Markdown page offers: explicit `id="…"`s, and each
/// heading as GitHub names it (lower case; letters, digits, `-` and `_`
/// kept, spaces made `-`, everything else dropped; a repeated name gets
/// `-1`, `-2`, …).
fn anchors(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("id=\"") {
        rest = &rest[at + 4..];
        if let Some(end) = rest.find('"') {
            out.insert(rest[..end].to_owned());
        }
    }
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let slug: String = line
            .trim_start_matches('#')
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_default();
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}
