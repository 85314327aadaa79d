//! The hash-chained audit log, `STORE/audit/log.jsonl`.
//!
//! One JSON object per line: `{"seq":N,"prev":H(N-1),"entry":{…},"hash":H(N)}`
//! with `H(N) = SHA-256("{seq}\n{prev}\n{entry}")` over the entry's exact
//! bytes. Editing any byte of a line breaks its own hash; removing or
//! reordering lines breaks the chain of `prev`; and every store commit
//! carries a generation number, so a log cut short after a commit is caught
//! against the manifest. Appends take an exclusive file lock, so the TRE
//! (many readers) and collection can write to it concurrently.
//!
//! Entries hold counts, rule names and checksums — never an NHS number, a
//! name, a postcode or a key.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::digest::sha256_hex;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log {}: line {line}: {problem}", path.display())]
    Broken {
        path: PathBuf,
        line: u64,
        problem: String,
    },
}

#[derive(Deserialize)]
struct Line<'a> {
    seq: u64,
    prev: String,
    #[serde(borrow)]
    entry: &'a RawValue,
    hash: String,
}

fn line_hash(seq: u64, prev: &str, entry: &str) -> String {
    sha256_hex(format!("{seq}\n{prev}\n{entry}").as_bytes())
}

/// What a verified log holds.
#[derive(Debug, Default, Clone)]
pub struct Verified {
    pub lines: u64,
    pub head: String,
    /// The highest store generation any entry records.
    pub last_generation: u64,
    pub entries: Vec<Value>,
    /// Each line's hash, in order (`hashes[seq - 1]`).
    pub hashes: Vec<String>,
}

/// The head of the log, as an operator publishes it outside the TRE:
/// `seq=57 hash=<64 hex> generation=3 time=2026-12-02T10:00:00.000Z`.
/// Whoever holds an older head can later check that the log still extends
/// it (`gpdp audit --expect-head`), so a log and store rolled back together
/// are caught.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
    pub generation: u64,
    pub time: String,
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seq={} hash={} generation={} time={}",
            self.seq, self.hash, self.generation, self.time
        )
    }
}

impl std::str::FromStr for Head {
    type Err = String;

    /// Reads the published line; `seq` and `hash` are required (they are
    /// what is checked), `generation` and `time` are informative.
    fn from_str(s: &str) -> Result<Head, String> {
        let mut head = Head {
            seq: 0,
            hash: String::new(),
            generation: 0,
            time: String::new(),
        };
        let (mut seq, mut hash) = (false, false);
        for part in s.split_whitespace() {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not key=value"))?;
            match k {
                "seq" => {
                    head.seq = v
                        .parse()
                        .map_err(|_| format!("seq `{v}` is not a number"))?;
                    seq = true;
                }
                "hash" => {
                    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!("hash `{v}` is not 64 hex digits"));
                    }
                    head.hash = v.to_ascii_lowercase();
                    hash = true;
                }
                "generation" => {
                    head.generation = v
                        .parse()
                        .map_err(|_| format!("generation `{v}` is not a number"))?;
                }
                "time" => head.time = v.to_owned(),
                _ => return Err(format!("unknown field `{k}`")),
            }
        }
        if !(seq && hash) {
            return Err("a head needs seq=N and hash=H (as `gpdp audit --head` prints)".into());
        }
        Ok(head)
    }
}

impl Verified {
    /// The head of this log (`seq=0` and the genesis hash when empty).
    pub fn head(&self) -> Head {
        Head {
            seq: self.lines,
            hash: self.head.clone(),
            generation: self.last_generation,
            time: self
                .entries
                .iter()
                .rev()
                .find_map(|e| e.get("time").and_then(Value::as_str))
                .unwrap_or("")
                .to_owned(),
        }
    }

    /// Whether this log extends `earlier`: it has a line `earlier.seq` with
    /// `earlier.hash` (the chain makes every line before it follow).
    pub fn extends(&self, earlier: &Head) -> Result<(), String> {
        if earlier.seq == 0 {
            return Ok(());
        }
        match self.hashes.get(earlier.seq as usize - 1) {
            None => Err(format!(
                "the log has {} lines but the published head is line {}: the log was cut short or rolled back",
                self.lines, earlier.seq
            )),
            Some(h) if *h != earlier.hash => Err(format!(
                "line {} has hash {} but the published head says {}: the log was rewritten from there",
                earlier.seq,
                &h[..12],
                &earlier.hash[..12]
            )),
            Some(_) => Ok(()),
        }
    }
}

pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    pub fn at(store: &Path) -> AuditLog {
        AuditLog {
            path: store.join("audit").join("log.jsonl"),
        }
    }

    /// A log of the same form at `path` (a population's privacy ledger).
    pub fn file(path: PathBuf) -> AuditLog {
        AuditLog { path }
    }

    /// Folds every entry that holds one of `relevant`, read-only (no lock:
    /// the log is only ever appended to). A missing log folds nothing.
    pub fn fold<S: Default>(
        &self,
        relevant: &[&str],
        fold: impl Fn(&mut S, &Value),
    ) -> Result<S, AuditError> {
        let mut state = S::default();
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(state),
            Err(e) => return Err(self.io()(e)),
        };
        self.fold_all(&mut file, relevant, &mut state, &fold)?;
        Ok(state)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
        move |source| AuditError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends entries (each a JSON object), chained to the current last line.
    pub fn append(&self, entries: &[Value]) -> Result<(), AuditError> {
        let mut file = self.open_locked()?;
        self.write_locked(&mut file, entries)
    }

    /// The log file, created if need be, under this process's exclusive lock
    /// (released when the file is closed).
    fn open_locked(&self) -> Result<File, AuditError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(self.io())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(self.io())?;
        file.lock().map_err(self.io())?;
        Ok(file)
    }

    /// Appends what `decide` returns from a state folded over every entry
    /// already in the log, under the log's exclusive lock, so that a
    /// decision that depends on the log (a privacy-budget charge) cannot
    /// race another process's. `decide` may refuse (`Err`), and then nothing
    /// is written.
    ///
    /// The state is folded from the log itself, every time. A cache of it
    /// beside the log (an earlier version kept one) is a file anyone who
    /// can write the store can edit without breaking the log's chain — a
    /// ledger read from it was reset by setting a researcher's spend to 0.
    /// To keep the fold cheap on a long log, every line is checked to be a
    /// log line (its entry left as raw JSON), and only the entries that
    /// hold one of `relevant` (a charge, a commit's generation) are read
    /// into values and folded. A line that cannot be read folds as `null`,
    /// for `fold` to fail closed on: a ledger must not skip what it cannot
    /// read.
    pub fn append_folded<S, E>(
        &self,
        relevant: &[&str],
        fold: impl Fn(&mut S, &Value),
        decide: impl FnOnce(&S) -> Result<Vec<Value>, E>,
    ) -> Result<Result<(), E>, AuditError>
    where
        S: Default,
    {
        let mut file = self.open_locked()?;
        let mut state = S::default();
        self.fold_all(&mut file, relevant, &mut state, &fold)?;
        let entries = match decide(&state) {
            Ok(e) => e,
            Err(refused) => return Ok(Err(refused)),
        };
        self.write_locked(&mut file, &entries)?;
        Ok(Ok(()))
    }

    /// Folds every entry of the log that holds one of `relevant`.
    fn fold_all<S>(
        &self,
        file: &mut File,
        relevant: &[&str],
        state: &mut S,
        fold: &impl Fn(&mut S, &Value),
    ) -> Result<(), AuditError> {
        file.seek(SeekFrom::Start(0)).map_err(self.io())?;
        let finders: Vec<memchr::memmem::Finder> = relevant
            .iter()
            .map(|r| memchr::memmem::Finder::new(r.as_bytes()))
            .collect();
        let mut reader = BufReader::with_capacity(1 << 20, &*file);
        let mut bytes = Vec::new();
        loop {
            bytes.clear();
            let n = reader.read_until(b'\n', &mut bytes).map_err(self.io())?;
            if n == 0 {
                break;
            }
            let line = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| serde_json::from_str::<Line>(t.trim_end()).ok());
            let entry = match line {
                None => Value::Null,
                Some(l)
                    if finders
                        .iter()
                        .any(|f| f.find(l.entry.get().as_bytes()).is_some()) =>
                {
                    serde_json::from_str::<Value>(l.entry.get()).unwrap_or(Value::Null)
                }
                Some(_) => continue,
            };
            fold(state, &entry);
        }
        Ok(())
    }

    /// Writes entries chained to the last line of a file this process holds locked.
    fn write_locked(&self, file: &mut File, entries: &[Value]) -> Result<(), AuditError> {
        let (mut seq, mut prev) = last_line(file).map_err(self.io())?;
        let mut out = String::new();
        for entry in entries {
            seq += 1;
            let body = serde_json::to_string(entry).unwrap_or_else(|_| "{}".into());
            let hash = line_hash(seq, &prev, &body);
            out.push_str(&format!(
                "{{\"seq\":{seq},\"prev\":\"{prev}\",\"entry\":{body},\"hash\":\"{hash}\"}}\n"
            ));
            prev = hash;
        }
        file.write_all(out.as_bytes()).map_err(self.io())?;
        file.sync_data().map_err(self.io())?;
        Ok(())
    }

    /// Checks every line; the first problem names its line number.
    pub fn verify(&self) -> Result<Verified, AuditError> {
        let mut v = Verified {
            head: GENESIS.into(),
            ..Verified::default()
        };
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
            Err(e) => return Err(self.io()(e)),
        };
        for (i, text) in BufReader::new(file).lines().enumerate() {
            let n = i as u64 + 1;
            let broken = |problem: String| AuditError::Broken {
                path: self.path.clone(),
                line: n,
                problem,
            };
            let text = text.map_err(self.io())?;
            let line: Line =
                serde_json::from_str(&text).map_err(|e| broken(format!("not a log line ({e})")))?;
            if line.seq != n {
                return Err(broken(format!(
                    "sequence number {} where {n} was expected (a line was removed or moved)",
                    line.seq
                )));
            }
            if line.prev != v.head {
                return Err(broken(
                    "does not follow the line before it (a line was removed, moved or edited)"
                        .into(),
                ));
            }
            if line_hash(line.seq, &line.prev, line.entry.get()) != line.hash {
                return Err(broken(
                    "its hash does not match its content (the line was edited)".into(),
                ));
            }
            let entry: Value =
                serde_json::from_str(line.entry.get()).map_err(|e| broken(e.to_string()))?;
            if let Some(g) = entry.get("generation").and_then(Value::as_u64) {
                v.last_generation = v.last_generation.max(g);
            }
            v.entries.push(entry);
            v.hashes.push(line.hash.clone());
            v.head = line.hash;
            v.lines = n;
        }
        Ok(v)
    }
}

/// The sequence number and hash of the last line (0 and the genesis hash if empty).
fn last_line(file: &mut File) -> std::io::Result<(u64, String)> {
    let len = file.seek(SeekFrom::End(0))?;
    line_before(file, len)
}

/// The sequence number and hash of the line that ends at byte `len` (0 and
/// the genesis hash at 0); an error if no line ends there.
fn line_before(file: &mut File, len: u64) -> std::io::Result<(u64, String)> {
    if len > file.metadata()?.len() {
        return Err(std::io::Error::other("past the end of the log"));
    }
    if len == 0 {
        return Ok((0, GENESIS.into()));
    }
    // Read back far enough to hold the last line (entries are small).
    let mut back = 4096u64.min(len);
    loop {
        file.seek(SeekFrom::Start(len - back))?;
        let mut tail = Vec::with_capacity(back as usize);
        std::io::Read::by_ref(file)
            .take(back)
            .read_to_end(&mut tail)?;
        let trimmed = tail.strip_suffix(b"\n").unwrap_or(&tail);
        if let Some(pos) = trimmed
            .iter()
            .rposition(|b| *b == b'\n')
            .or((back == len).then_some(usize::MAX))
        {
            let start = if pos == usize::MAX { 0 } else { pos + 1 };
            let last: Line =
                serde_json::from_slice(&trimmed[start..]).map_err(std::io::Error::other)?;
            return Ok((last.seq, last.hash));
        }
        back = (back * 4).min(len);
    }
}

use std::io::Read as _;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn any_edit_removal_or_reorder_is_caught_and_located() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::at(dir.path());
        for i in 0..5 {
            log.append(&[json!({"event": "query", "i": i, "generation": i})])
                .unwrap();
        }
        let ok = log.verify().unwrap();
        assert_eq!((ok.lines, ok.last_generation), (5, 4));
        let original = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<&str> = original.lines().collect();

        let check = |text: String, line: u64| {
            std::fs::write(log.path(), text).unwrap();
            match log.verify() {
                Err(AuditError::Broken { line: l, .. }) => assert_eq!(l, line),
                other => panic!("expected a break at line {line}, got {other:?}"),
            }
        };
        check(original.replacen("\"i\":2", "\"i\":7", 1), 3);
        check(original.replacen("\"i\":4", "\"i\":5", 1), 5);
        check(
            [lines[0], lines[2], lines[3], lines[4]].join("\n") + "\n",
            2,
        );
        check(
            [lines[1], lines[0], lines[2], lines[3], lines[4]].join("\n") + "\n",
            1,
        );
        // Every single-byte change anywhere in the file is caught.
        for pos in (0..original.len()).step_by(37) {
            let mut bytes = original.clone().into_bytes();
            bytes[pos] = if bytes[pos] == b'7' { b'8' } else { b'7' };
            if bytes[pos] == original.as_bytes()[pos] {
                continue;
            }
            std::fs::write(log.path(), &bytes).unwrap();
            assert!(log.verify().is_err(), "byte {pos} edited without detection");
        }
        std::fs::write(log.path(), &original).unwrap();
        log.append(&[json!({"event": "more"})]).unwrap();
        assert_eq!(log.verify().unwrap().lines, 6);
    }
}
