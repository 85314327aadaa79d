#!/usr/bin/env bash
# TRE query latency on a 1M-patient store, in one run: through the boundary,
# directly in DataFusion over the same views, and DuckDB on the same files.
# Usage: bash benches/tre.sh [PATIENTS] [PRACTICES] [RUNS]   (defaults: 1000000 100 7)
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-1000000}; practices=${2:-100}; runs=${3:-7}
cargo build --release --quiet --bin gpdp --example tre_bench
bin=target/release/gpdp
. benches/population.sh
data=$(population "$patients" "$practices")
store="bench-data/store-${patients}-${practices}"
if [ ! -f "$store/manifest.json" ]; then
  rm -rf "$store" bench-data/bench.key "$data/quarantine"
  "$bin" keygen --out bench-data/bench.key >/dev/null
  "$bin" collect --quiet --extract "$data" --store "$store" --key bench-data/bench.key >/dev/null
  "$bin" optout ingest --ndoo "$data/national/ndoo.csv" --store "$store" --key bench-data/bench.key >/dev/null
fi
venv=bench-data/peer-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import duckdb" 2>/dev/null || "$venv/bin/pip" install -q duckdb >/dev/null 2>&1 || true
target/release/examples/tre_bench "$store" "$runs" > bench-data/tre_gpdp.jsonl
target/release/examples/tre_bench "$store" "$runs" rule-sets > bench-data/tre_rule_sets.jsonl
target/release/examples/tre_bench "$store" "$runs" verify > bench-data/tre_verify.json
if "$venv/bin/python" -c "import duckdb" 2>/dev/null; then
  "$venv/bin/python" benches/peers/tre_duckdb.py "$store" "$runs" > bench-data/tre_duckdb.jsonl
else
  : > bench-data/tre_duckdb.jsonl
fi
PATIENTS="$patients" PRACTICES="$practices" RUNS="$runs" python3 - <<'PY'
import json, os, sys
g = {r["query"]: r for r in map(json.loads, open("bench-data/tre_gpdp.jsonl"))}
d = {r["query"]: r for r in map(json.loads, open("bench-data/tre_duckdb.jsonl"))}
print(f"{'query':22} {'boundary p50':>13} {'p95':>7} {'direct p50':>11} {'overhead':>9} {'duckdb p50':>11} {'vs duckdb':>10}")
for q, r in g.items():
    if "error" in r:
        print(f"{q:22} boundary: {r['error']}")
        continue
    dd = d.get(q, {}).get("duckdb_p50_ms")
    vs = f"{r['boundary_p50_ms'] / dd:9.2f}x" if dd else "        -"
    print(f"{q:22} {r['boundary_p50_ms']:11.1f}ms {r['boundary_p95_ms']:5.0f}ms {r['direct_p50_ms']:9.1f}ms {100 * r['overhead']:8.0f}% {dd or float('nan'):9.1f}ms {vs}")
print()
print("the same queries under each rule set, interleaved in one run (boundary p50; ratio to OpenSAFELY's rules)")
names = {"demo-opensafely": "opensafely", "demo-planning-exempt": "ckm", "demo-research": "dp"}
print(f"{'query':22} " + " ".join(f"{n:>18}" for n in names.values()))
for r in map(json.loads, open("bench-data/tre_rule_sets.jsonl")):
    cells = []
    for p in names:
        if p in r["p50_ms"]:
            cells.append(f"{r['p50_ms'][p]:8.1f}ms {r['vs_opensafely'][p]:6.2f}x")
        else:
            cells.append(f"{'-':>18}")
    print(f"{r['query']:22} " + " ".join(cells))
v = json.load(open("bench-data/tre_verify.json"))
print()
print(f"store verification ({v['files']} files, {v['bytes'] / 1e6:.0f} MB): hashing every file {v['cold_ms']:.0f} ms (once, after a commit); "
      f"a new process's check {v['warm_p50_ms']:.2f} ms = {100 * v['warm_share_of_fastest_query']:.2f}% of the fastest query ({v['fastest_query_p50_ms']:.1f} ms); "
      f"a server's, per request, {v['in_process_p50_ms']:.2f} ms")

# The same figures as Markdown, for docs/benchmarks.md to include
# (benches/measured.py heads them with the command, date, commit and machine).
n, runs = int(os.environ["PATIENTS"]), os.environ["RUNS"]
md = ["## Through the boundary (OpenSAFELY's rules), directly, and DuckDB", "",
      "| query | boundary p50 | direct DataFusion p50 | boundary overhead | DuckDB p50 | boundary / DuckDB |",
      "| --- | --- | --- | --- | --- | --- |"]
for q, r in g.items():
    if "error" in r:
        md.append(f"| {q} | {r['error']} | | | | |")
        continue
    dd = d.get(q, {}).get("duckdb_p50_ms")
    md.append(f"| {q} | {r['boundary_p50_ms']:.0f} ms | {r['direct_p50_ms']:.0f} ms | {100 * r['overhead']:+.0f}% | "
              + (f"{dd:.0f} ms | {r['boundary_p50_ms'] / dd:.2f}× |" if dd else "- | - |"))
md += ["", "## Each rule set, interleaved (boundary p50; ratio to OpenSAFELY's rules)", "",
       "| query | " + " | ".join(names.values()) + " |", "| --- |" + " --- |" * len(names)]
for r in map(json.loads, open("bench-data/tre_rule_sets.jsonl")):
    md.append(f"| {r['query']} | " + " | ".join(
        f"{r['p50_ms'][p]:.0f} ms ({r['vs_opensafely'][p]:.2f}×)" if p in r["p50_ms"] else "-" for p in names) + " |")
md += ["", "## Verifying the store against its manifest", "",
       f"{v['files']} files, {v['bytes'] / 1e6:.0f} MB. Hashing every file (the first reader after a commit, "
       f"and every `gpdp audit`): {v['cold_ms']:.0f} ms. A new process's check of a verified store (read "
       f"`audit/verified.json`, stat each file; median of {runs}): {v['warm_p50_ms']:.2f} ms, "
       f"{100 * v['warm_share_of_fastest_query']:.2f}% of the fastest query's boundary p50 ({v['fastest_query_p50_ms']:.0f} ms). "
       f"A long-running server's check per request (it remembers what it verified; stat each file): {v['in_process_p50_ms']:.2f} ms, "
       f"{100 * v['in_process_p50_ms'] / v['fastest_query_p50_ms']:.2f}% of the fastest query.", ""]
sys.path.insert(0, "benches")
import measured
measured.write(f"tre-{n}", f"TRE latency, {n:,} patients ({os.environ['PRACTICES']} practices)",
               f"bash benches/tre.sh {n} {os.environ['PRACTICES']} {runs}", f"p50 of {runs} runs", md)
PY
