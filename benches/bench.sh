#!/usr/bin/env bash
# `gpdp bench` (release) — collection against the plain CSV → Parquet
# baseline by scale and threads, linking, the stages' shares — written to
# docs/measurements/bench-PATIENTS.md (benches/measured.py). The TRE and
# privacy figures it also prints are measured at scale by benches/tre.sh and
# shipped as docs/measurements/privacy.json.
#
# Usage: bash benches/bench.sh [PATIENTS] [SCALES] [THREADS]
#        (defaults: 200000 1,2,4 1,2)
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-200000}
scales=${2:-1,2,4}
threads=${3:-1,2}
cargo build --release --quiet --bin gpdp
json=$(mktemp)
trap 'rm -f "$json"' EXIT
./target/release/gpdp bench --quiet --patients "$patients" --scale "$scales" --threads "$threads" \
  --tre-runs 1 --privacy-targets 10 --reconstruction-runs 1 --json > "$json"
python3 - "$json" "$patients" "$scales" "$threads" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
patients, scales, threads = int(sys.argv[2]), sys.argv[3], sys.argv[4]
mib = lambda m: f"{m['peak_memory_mib']:.0f} MiB"
md = [f"Collection at {r['threads']} threads by scale, against the baseline (plain CSV → Parquet with the same "
      "crates, no de-identification) in the same run:", "",
      "| scale | patients | gpdp wall s | gpdp M rows/s | gpdp peak | baseline M rows/s | baseline peak | gpdp / baseline |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for run in r["runs"]:
    c, b = run["collect"], run["baseline"]
    md.append(f"| {run['scale']} | {run['patients']:,} | {c['wall_seconds']:.2f} | {c['rows_per_second'] / 1e6:.2f} | {mib(c)} "
              f"| {b['rows_per_second'] / 1e6:.2f} | {mib(b)} | {run['ratio_to_baseline']:.2f} |")
md += ["", "`gpdp link` of the same populations' provider files into the collected store:", "",
       "| scale | rows | MB | wall s | M rows/s | MB/s | peak |", "| --- | --- | --- | --- | --- | --- | --- |"]
for run in r["runs"]:
    l = run["link"]
    md.append(f"| {run['scale']} | {l['rows_in']:,} | {l['bytes_in'] / 1e6:.0f} | {l['wall_seconds']:.2f} "
              f"| {l['rows_per_second'] / 1e6:.2f} | {l['mb_per_second']:.0f} | {mib(l)} |")
if len(r.get("thread_scaling", [])) > 1:
    md += ["", "Threads, at the first scale:", "", "| threads | wall s | M rows/s | speedup |", "| --- | --- | --- | --- |"]
    for t in r["thread_scaling"]:
        c = t["collect"]
        md.append(f"| {t['threads']} | {c['wall_seconds']:.2f} | {c['rows_per_second'] / 1e6:.2f} | {t['speedup']:.2f}× |")
shares = r["runs"][-1]["stage_shares"]
md += ["", f"Where collection's time goes at scale {r['runs'][-1]['scale']} (each stage's share of the worker time "
       "summed over practices):", "", "| stage | share |", "| --- | --- |"]
md += [f"| `{k}` | {100 * v:.0f}% |" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])]
sys.path.insert(0, "benches")
import measured
measured.write(f"bench-{patients}", f"`gpdp bench`, {patients:,} patients a scale",
               f"bash benches/bench.sh {patients} {scales} {threads}", "one run", md)
PY
