//! Helpers shared by the integration tests: run the real `gpdp` binary and
//! read the CSV files it writes.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub fn gpdp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gpdp"))
}

/// Runs gpdp with `args` and returns its output.
pub fn run(args: &[&str]) -> Output {
    gpdp().args(args).output().expect("gpdp runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `gpdp synth` into `dir` and panics with its stderr on failure.
pub fn synth(dir: &Path, practices: u32, patients: u64, seed: u64) {
    let o = run(&[
        "synth",
        "--out",
        dir.to_str().unwrap(),
        "--practices",
        &practices.to_string(),
        "--patients",
        &patients.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    assert!(o.status.success(), "synth failed: {}", stderr(&o));
}

/// Splits a CSV line, honouring double-quoted fields (no escaped quotes).
pub fn fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    out.push(field);
    out
}

/// A CSV file: its header and rows, each row with its 1-based line number.
pub struct Csv {
    pub header: Vec<String>,
    pub rows: Vec<(usize, Vec<String>)>,
}

impl Csv {
    pub fn read(path: &Path) -> Csv {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut lines = text.lines();
        let header = fields(lines.next().expect("a header line"));
        let rows = lines.enumerate().map(|(i, l)| (i + 2, fields(l))).collect();
        Csv { header, rows }
    }

    pub fn col(&self, name: &str) -> usize {
        self.header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", self.header))
    }

    /// Rows as maps from column name to value (only rows with the right arity).
    pub fn records(&self) -> Vec<BTreeMap<String, String>> {
        self.rows
            .iter()
            .filter(|(_, r)| r.len() == self.header.len())
            .map(|(_, r)| self.header.iter().cloned().zip(r.iter().cloned()).collect())
            .collect()
    }
}

/// Independent Modulus 11 check (not the crate's code).
pub fn nhs_valid(s: &str) -> bool {
    let d: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if s.len() != 10 || d.len() != 10 {
        return false;
    }
    let sum: u32 = d[..9].iter().zip((2..=10).rev()).map(|(a, w)| a * w).sum();
    let check = match 11 - sum % 11 {
        11 => 0,
        10 => return false,
        c => c,
    };
    check == d[9]
}

pub fn practice_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(root.join("practices"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs
}

/// Every file under `root` with its bytes, for byte-for-byte comparisons.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(
                    path.strip_prefix(root).unwrap().to_owned(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    out
}

/// Makes a collection key file (mode 0600) with the given bytes.
pub fn key_file(dir: &Path, byte: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("key{byte}"));
    std::fs::write(&path, [byte; 32]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The pseudonym of an NHS number, computed here independently of gpdp.
pub fn pseudonym(key_byte: u8, nhs: &str) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[key_byte; 32]);
    let mut msg = b"gpdp/v1/nhs_number\0".to_vec();
    msg.extend_from_slice(nhs.as_bytes());
    ring::hmac::sign(&key, &msg).as_ref().try_into().unwrap()
}

/// The practice pseudonym of `ods` under the key of 32 bytes `key_byte`,
/// computed independently of gpdp.
pub fn practice_pseudonym(key_byte: u8, ods: &str) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[key_byte; 32]);
    ring::hmac::sign(
        &key,
        &[b"gpdp/v1/practice\0".as_slice(), ods.as_bytes()].concat(),
    )
    .as_ref()
    .try_into()
    .unwrap()
}

pub fn manifest(store: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap()
}

/// Every record batch of `table` in the files the manifest references.
pub fn read_table(store: &Path, table: &str) -> Vec<arrow::array::RecordBatch> {
    let m = manifest(store);
    let mut out = Vec::new();
    for batch in m["batches"].as_object().unwrap().values() {
        out.extend(read_parquet(
            &store.join(batch["files"][table]["path"].as_str().unwrap()),
        ));
    }
    out
}

/// Every record batch of `table` as readers see it: through the store's
/// reader, deletion vectors applied (`read_table` reads the stored bytes).
pub fn read_table_reachable(store: &Path, table: &str) -> Vec<arrow::array::RecordBatch> {
    let m = gpdp::store::read_manifest(store).unwrap();
    let mut out = Vec::new();
    for batch in m.batches.values() {
        let reader = gpdp::store::parquet::open(store, batch, table)
            .unwrap()
            .build()
            .unwrap();
        out.extend(reader.map(|b| b.unwrap()));
    }
    out
}

/// Every pseudonym with a row a reader returns (deletion vectors applied), in any GP table.
pub fn reachable_patients(store: &Path) -> std::collections::HashSet<[u8; 32]> {
    ["patients", "clinical_events", "medications"]
        .iter()
        .flat_map(|t| patient_ids(&read_table_reachable(store, t)))
        .collect()
}

/// Every record batch of one Parquet file.
pub fn read_parquet(path: &Path) -> Vec<arrow::array::RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// Every value of every column of every batch, as text (binary as hex).
pub fn all_values(batches: &[arrow::array::RecordBatch]) -> Vec<(String, String)> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let mut out = Vec::new();
    for b in batches {
        for (field, col) in b.schema().fields().iter().zip(b.columns()) {
            let f = ArrayFormatter::try_new(col.as_ref(), &FormatOptions::default()).unwrap();
            for i in 0..col.len() {
                out.push((field.name().clone(), f.value(i).to_string()));
            }
        }
    }
    out
}

/// The values of a `FixedSizeBinary(32)` column of a set of batches.
pub fn pseudonym_column(batches: &[arrow::array::RecordBatch], name: &str) -> Vec<[u8; 32]> {
    use arrow::array::{Array, FixedSizeBinaryArray};
    let mut out = Vec::new();
    for b in batches {
        let ids = b
            .column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<FixedSizeBinaryArray>()
            .unwrap();
        out.extend((0..ids.len()).map(|i| <[u8; 32]>::try_from(ids.value(i)).unwrap()));
    }
    out
}

/// The `patient_id`s of a set of batches.
pub fn patient_ids(batches: &[arrow::array::RecordBatch]) -> Vec<[u8; 32]> {
    pseudonym_column(batches, "patient_id")
}

/// The arguments of `gpdp collect` for an extract, a store and a key.
pub fn collect_args(extract: &Path, store: &Path, key: &Path) -> Vec<String> {
    [
        "collect",
        "--extract",
        extract.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Runs `gpdp collect`.
pub fn collect(extract: &Path, store: &Path, key: &Path) -> Output {
    gpdp()
        .args(collect_args(extract, store, key))
        .output()
        .unwrap()
}

/// Rows of a table as sorted text lines: a logical snapshot of the store.
pub fn table_rows(store: &Path, table: &str) -> Vec<String> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let mut rows = Vec::new();
    for b in read_table(store, table) {
        let fmts: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default()).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            rows.push(
                fmts.iter()
                    .map(|f| f.value(i).to_string())
                    .collect::<Vec<_>>()
                    .join("|"),
            );
        }
    }
    rows.sort();
    rows
}

/// A generated extract collected into a store, in a temporary directory.
pub struct Collected {
    pub _dir: tempfile::TempDir,
    pub extract: PathBuf,
    pub store: PathBuf,
    pub key: PathBuf,
}

impl Collected {
    /// `--store S --truth T --key K`, for the commands that check against the truth.
    pub fn truth_args(&self) -> Vec<String> {
        [
            "--store",
            self.store.to_str().unwrap(),
            "--truth",
            self.extract.join("truth").to_str().unwrap(),
            "--key",
            self.key.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    }
}

/// `gpdp link` of the provider data in `c`'s extract into its store, with
/// `extra`.
pub fn link(c: &Collected, extra: &[&str]) -> Output {
    gpdp()
        .args(["link", "--extract"])
        .arg(&c.extract)
        .arg("--store")
        .arg(&c.store)
        .arg("--key")
        .arg(&c.key)
        .args(extra)
        .output()
        .unwrap()
}

/// `gpdp report` of `c`'s store against its truth into `out`, with `extra`.
pub fn report(c: &Collected, out: &Path, extra: &[&str]) -> Output {
    gpdp()
        .arg("report")
        .args(c.truth_args())
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// `gpdp optout apply --type1 LIST` on `store` with `key`, ready to run.
pub fn optout_apply(store: &Path, key: &Path, list: &Path) -> Command {
    let mut cmd = gpdp();
    cmd.args(["optout", "apply", "--type1"])
        .arg(list)
        .arg("--store")
        .arg(store)
        .arg("--key")
        .arg(key);
    cmd
}

/// `gpdp optout status --json` for one NHS number, at the practice.
pub fn optout_status(c: &Collected, nhs: &str) -> serde_json::Value {
    let o = run(&[
        "optout",
        "status",
        "--nhs-number",
        nhs,
        "--store",
        c.store.to_str().unwrap(),
        "--key",
        c.key.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// The shipped demo researcher of `project` and their token: one per rule
/// set (alice: demo-opensafely, dana: demo-research, carol:
/// demo-planning-exempt, priya: demo-prescribing-acro); alice for a project
/// the policy does not have.
pub fn researcher_of(project: &str) -> (&'static str, &'static str) {
    gpdp::demo::researcher_for(project).unwrap_or(("alice", "demo-alice-token"))
}

/// The shipped TRE policy with a perturbation key for the cell key method
/// beside it (32 bytes of 5), and each project's budget of released cells
/// lifted: what the rule set alone lets through (the budget is what stops
/// repeated questions; tests/it/ledger.rs tests it).
pub fn ckm_boundary() -> gpdp::tre::Boundary {
    let mut policy = gpdp::policy::tre::TrePolicy::load(None).unwrap();
    for p in policy.projects.values_mut() {
        p.disclosure.cell_budget = None;
    }
    gpdp::tre::Boundary {
        record_keys: Some(gpdp::tre::aggregates::record_keys::RecordKeys::from_bytes(
            &[5; 32],
        )),
        ..gpdp::tre::Boundary::new(policy)
    }
}

/// What each researcher of a TRE policy may rely on, worked out here from
/// the policy's text (read as TOML, not through gpdp's parser): the
/// weakest rule set among their projects, in the order dp (ρ-bounded) >
/// ckm (cell key) > every rule set without noise (deterministic). Per
/// researcher, in the file's order: (user, projects, guarantee code,
/// guarantee in words).
pub fn expected_guarantees(policy: &str) -> Vec<(String, Vec<String>, String, String)> {
    let t: toml::Table = policy.parse().unwrap();
    let method = |project: &str| -> String {
        let rules = t["projects"][project]["disclosure"].as_str().unwrap();
        t["disclosure"][rules]
            .get("method")
            .map_or("threshold", |m| m.as_str().unwrap())
            .to_owned()
    };
    let strength = |m: &str| match m {
        "dp" => 2,
        "ckm" => 1,
        _ => 0,
    };
    t["researchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let projects: Vec<String> = r["projects"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_owned())
                .collect();
            let weakest = projects.iter().map(|p| strength(&method(p))).min();
            let budget = r.get("rho_budget").map_or(0.0, |b| {
                b.as_float().or(b.as_integer().map(|i| i as f64)).unwrap()
            });
            let (code, words) = match weakest {
                None => (
                    "no_project",
                    "no approved project: reaches no data".to_owned(),
                ),
                Some(2) => (
                    "rho_bounded",
                    format!("ρ-bounded (zCDP, ρ budget {budget})"),
                ),
                Some(1) => (
                    "cell_key",
                    "cell key method: not DP, bounded noise".to_owned(),
                ),
                Some(_) => (
                    "deterministic",
                    "deterministic rules: output checking needed".to_owned(),
                ),
            };
            (
                r["user"].as_str().unwrap().to_owned(),
                projects,
                code.to_owned(),
                words,
            )
        })
        .collect()
}

/// `gpdp query --store STORE` as alice in demo-opensafely (deterministic rules, so
/// that answers compare exactly), with `rest` (options, then the SQL).
pub fn query_as_alice(store: &Path, rest: &[&str]) -> Output {
    let mut args = vec![
        "query",
        "--store",
        store.to_str().unwrap(),
        "--project",
        "demo-opensafely",
        "--user",
        "alice",
        "--token",
        "demo-alice-token",
    ];
    args.extend(rest);
    run(&args)
}

/// Generates an extract and collects it with a key made of `key_byte`.
pub fn collected(practices: u32, patients: u64, seed: u64, key_byte: u8) -> Collected {
    let dir = tempfile::tempdir().unwrap();
    let extract = dir.path().join("extract");
    synth(&extract, practices, patients, seed);
    let key = key_file(dir.path(), key_byte);
    let store = dir.path().join("store");
    let o = collect(&extract, &store, &key);
    assert!(o.status.success(), "{}", stderr(&o));
    Collected {
        _dir: dir,
        extract,
        store,
        key,
    }
}

/// [`collected`], then the extract's NDOO list ingested.
pub fn collected_with_ndoo(practices: u32, patients: u64, seed: u64, key_byte: u8) -> Collected {
    let c = collected(practices, patients, seed, key_byte);
    let o = run(&[
        "optout",
        "ingest",
        "--ndoo",
        c.extract.join("national/ndoo.csv").to_str().unwrap(),
        "--store",
        c.store.to_str().unwrap(),
        "--key",
        c.key.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    c
}

/// `gpdp audit --verify-log` passes on `store`.
pub fn assert_log_verifies(store: &Path) {
    let o = run(&["audit", "--store", store.to_str().unwrap(), "--verify-log"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `gpdp serve` on a loopback port of its own, stopped when dropped.
pub struct Server {
    pub child: Child,
    pub addr: std::net::SocketAddr,
}

impl Server {
    pub fn start(store: &std::path::Path) -> Server {
        Server::start_with(store, &[])
    }

    pub fn start_with(store: &std::path::Path, extra: &[&str]) -> Server {
        let mut child = gpdp()
            .args([
                "serve",
                "--store",
                store.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("://")
            .nth(1)
            .and_then(|a| a.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .parse()
            .unwrap();
        Server { child, addr }
    }

    /// SIGTERM, then the exit status and the rest of stdout.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut rest);
        (status, rest)
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The entries of a store's audit log, in order.
pub fn log_events(store: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(store.join("audit/log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["entry"].clone())
        .collect()
}
