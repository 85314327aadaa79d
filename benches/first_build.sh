#!/usr/bin/env bash
# What a newcomer waits for: the first `cargo run --release -- demo` on a
# clean clone — the release build of every dependency, then the demo — and
# the binary's size, with the crates that took longest to compile (from
# `cargo build --timings`). Writes docs/measurements/first-build.md
# (benches/measured.py).
#
# Usage: bash benches/first_build.sh
# Needs the machine to itself for the build (about 20 minutes on 2 cores);
# fetches nothing new if the crates are already in ~/.cargo (a first fetch
# would be timed too, as a newcomer's is).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone --quiet "$repo" "$work/gpdp"
cd "$work/gpdp"
export CARGO_TARGET_DIR="$work/target"
start=$(date +%s.%N)
cargo build --release --locked --timings --quiet
built=$(date +%s.%N)
mkdir "$work/run" && (cd "$work/run" && "$CARGO_TARGET_DIR/release/gpdp" demo > demo.out)
done_=$(date +%s.%N)
cd "$repo"
python3 - "$work" "$start" "$built" "$done_" <<'PY'
import glob, json, os, re, sys
work, start, built, done = sys.argv[1], *map(float, sys.argv[2:5])
binary = f"{work}/target/release/gpdp"
html = open(sorted(glob.glob(f"{work}/target/cargo-timings/cargo-timing-*.html"))[-1]).read()
units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\]);\n", html, re.S).group(1))
by_crate = {}
for u in units:
    by_crate[u["name"]] = by_crate.get(u["name"], 0) + u["duration"]
total = sum(by_crate.values())
top = sorted(by_crate.items(), key=lambda kv: -kv[1])[:10]
fmt = lambda s: f"{int(s // 60)}m{s % 60:04.1f}s"
print(f"first build {fmt(built - start)}, demo {done - built:.1f} s, binary {os.path.getsize(binary) / 1e6:.0f} MB")
md = ["| step | time |", "| --- | --- |",
      f"| `cargo build --release` from a clean clone, empty target directory | **{fmt(built - start)}** |",
      f"| then `gpdp demo` | {done - built:.1f} s |",
      f"| the first `cargo run --release -- demo`, in all | **{fmt(done - start)}** |", "",
      f"The release binary is {os.path.getsize(binary) / 1e6:.0f} MB. {len(units)} compilation units took "
      f"{total / 60:.1f} CPU-minutes in all; the ten crates that took longest (compile time summed over "
      "their units, which run in parallel with others):", "",
      "| crate | seconds | share |", "| --- | --- | --- |"]
md += [f"| `{name}` | {secs:.0f} | {100 * secs / total:.0f}% |" for name, secs in top]
sys.path.insert(0, "benches")
import measured
measured.write("first-build", "The first build and demo, from a clean clone",
               "bash benches/first_build.sh", "one run, the machine otherwise idle", md)
PY
