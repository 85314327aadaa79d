#!/usr/bin/env bash
# Deletion on a later Type 1 opt-out against a full re-collection, in one run
# on the same 1M-patient extract and store:
#   (a) gpdp collect of the whole extract into a new store (what deleting by
#       re-collecting would cost)
#   (b) gpdp optout apply of 1,000 patients spread at random over the whole
#       population (100 of them movers, whose data sits in two practices'
#       batches): nearly every practice's batch holds one of them — the
#       patients made unreachable (deletion vectors, no file rewritten) —
#       then gpdp optout purge of the same: the files rewritten, the bytes
#       erased (the worst case for "rewrite only the affected files")
#   (c) the same two of 1,000 patients from 5 practices (opt-outs that
#       cluster, e.g. after a local campaign), on a fresh copy of the store
# Reports the times, the ratios, vectors written, files rewritten and peak memory.
#
# Usage: bash benches/optout.sh [PATIENTS] [PRACTICES] [OPTOUTS]   (defaults: 1000000 100 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-1000000}; practices=${2:-100}; optouts=${3:-1000}
cargo build --release --quiet --bin gpdp
bin=target/release/gpdp
. benches/population.sh
data=$(population "$patients" "$practices")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" keygen --out "$work/key" >/dev/null
rm -rf "$data/quarantine"
/usr/bin/time -f "%e %M" -o "$work/collect.time" \
  "$bin" collect --quiet --extract "$data" --store "$work/store" --key "$work/key" >/dev/null
python3 - "$data/truth/patients.csv" "$optouts" "$work" <<'PY'
import csv, sys, collections, random
rows = list(csv.DictReader(open(sys.argv[1])))
n, work = int(sys.argv[2]), sys.argv[3]
regs = collections.Counter(r["nhs_number"] for r in rows)
t1 = {r["nhs_number"] for r in rows if r["type1_anywhere"] == "true"}
movers = [k for k, c in regs.items() if c > 1 and k not in t1][: n // 10]
single = [r for r in rows if regs[r["nhs_number"]] == 1 and r["nhs_number"] not in t1]
# Spread: at random over the whole population.
spread = movers + random.Random(1).sample([r["nhs_number"] for r in single], n - len(movers))
# Clustered: from the first 5 practices only.
first = sorted({r["practice"] for r in rows})[:5]
clustered = random.Random(1).sample([r["nhs_number"] for r in single if r["practice"] in first], n)
for name, numbers in (("spread", spread), ("clustered", clustered)):
    with open(f"{work}/{name}.csv", "w") as f:
        f.write("nhs_number\n" + "\n".join(numbers) + "\n")
PY
cp -r "$work/store" "$work/store-clustered"
/usr/bin/time -f "%e %M" -o "$work/spread.time" \
  "$bin" optout apply --type1 "$work/spread.csv" --store "$work/store" --key "$work/key" --json > "$work/spread.json"
/usr/bin/time -f "%e %M" -o "$work/spread-purge.time" \
  "$bin" optout purge --store "$work/store" --json > "$work/spread-purge.json"
/usr/bin/time -f "%e %M" -o "$work/clustered.time" \
  "$bin" optout apply --type1 "$work/clustered.csv" --store "$work/store-clustered" --key "$work/key" --json > "$work/clustered.json"
/usr/bin/time -f "%e %M" -o "$work/clustered-purge.time" \
  "$bin" optout purge --store "$work/store-clustered" --json > "$work/clustered-purge.json"
PATIENTS="$patients" PRACTICES="$practices" \
python3 - "$work" "$optouts" <<'PY'
import json, os, sys
work, n = sys.argv[1], int(sys.argv[2])
rows = []
c_s, c_kb = open(f"{work}/collect.time").read().split()
print(f"{'run':66} {'wall s':>7} {'peak':>8} {'vs re-collection':>17}  written")
print(f"{'full re-collection':66} {float(c_s):7.2f} {int(c_kb) // 1024:5d} MiB {1:16.2f}x")
rows.append(("full re-collection (`gpdp collect` of the whole extract)", float(c_s), int(c_kb) // 1024, 1.0, "everything"))
for name in ("spread", "clustered"):
    a_s, a_kb = open(f"{work}/{name}.time").read().split()
    r = json.load(open(f"{work}/{name}.json"))
    label = f"optout apply (unreachable), {n} {name} ({r['registrations_deleted']} registrations)"
    print(f"{label:66} {float(a_s):7.2f} {int(a_kb) // 1024:5d} MiB {float(a_s) / float(c_s):16.2f}x  "
          f"{r['files_masked']} vectors in {r['batches_masked']} batches, {sum(r['rows_removed'].values())} rows masked")
    rows.append((f"`optout apply` (unreachable), {n:,} {name} ({r['registrations_deleted']:,} registrations)",
                 float(a_s), int(a_kb) // 1024, float(a_s) / float(c_s),
                 f"{r['files_masked']} vectors in {r['batches_masked']} batches, {sum(r['rows_removed'].values()):,} rows masked; no data file"))
    p_s, p_kb = open(f"{work}/{name}-purge.time").read().split()
    p = json.load(open(f"{work}/{name}-purge.json"))
    label = f"optout purge (erased), the same {n} {name}"
    print(f"{label:66} {float(p_s):7.2f} {int(p_kb) // 1024:5d} MiB {float(p_s) / float(c_s):16.2f}x  "
          f"{p['files_rewritten']} files in {p['batches_rewritten']} batches, {sum(p['rows_erased'].values())} rows erased")
    rows.append((f"`optout purge` (erased), the same {n:,} {name}", float(p_s), int(p_kb) // 1024, float(p_s) / float(c_s),
                 f"{p['files_rewritten']} files in {p['batches_rewritten']} batches rewritten, {sum(p['rows_erased'].values()):,} rows erased"))
# The same figures as Markdown, for docs/benchmarks.md to include
# (benches/measured.py heads them with the command, date, commit and machine).
patients, practices = int(os.environ["PATIENTS"]), os.environ["PRACTICES"]
md = ["| run | wall s | peak memory | vs full re-collection | written |", "| --- | --- | --- | --- | --- |"]
md += [f"| {label} | {s:.2f} | {mib} MiB | {ratio:.2f}× | {what} |" for label, s, mib, ratio, what in rows]
# The latencies the audit log records for these requests (dated when
# `optout apply` read them, as a list without `requested_at` is; the purge
# runs straight after).
md += ["", "| requests | request → unreachable (median, longest) | request → erased (median, longest) |", "| --- | --- | --- |"]
for name in ("spread", "clustered"):
    r = json.load(open(f"{work}/{name}.json"))
    p = json.load(open(f"{work}/{name}-purge.json"))
    md.append(f"| {n:,} {name} | {r['latency_median_seconds']:.2f} s, {r['latency_max_seconds']:.2f} s "
              f"| {p['latency_erased_median_seconds']:.2f} s, {p['latency_erased_max_seconds']:.2f} s |")
sys.path.insert(0, "benches")
import measured
measured.write(f"optout-{patients}", f"Later opt-outs against a re-collection, {patients:,} patients ({practices} practices)",
               f"bash benches/optout.sh {patients} {practices} {n}", "one run of each", md)
PY
