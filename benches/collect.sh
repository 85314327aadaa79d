#!/usr/bin/env bash
# Collection throughput against its peers, in one run on the same extract:
#   (a) baseline: plain CSV -> Parquet with the same crates, no de-identification
#   (b) gpdp collect
#   (c) the Python peer in benches/peers/ (polars + hmac), if it can be installed
# Reports rows/s, the ratios, and peak memory (max RSS) of each.
#
# Usage: bash benches/collect.sh [PATIENTS] [PRACTICES]   (defaults: 1000000 100)
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-1000000}
practices=${2:-100}
threads=$(nproc)
cargo build --release --quiet --bin gpdp --example csv_to_parquet
bin=target/release/gpdp
. benches/population.sh
data=$(population "$patients" "$practices")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" keygen --out "$work/key" >/dev/null
rows_in=$(python3 -c "import json,sys; c=json.load(open('$data/truth/summary.json'))['counts']['rows']; print(sum(c.values()))")
mb_in=$(du -sm "$data/practices" | cut -f1)
echo "extract: $patients patients, $practices practices, $rows_in rows, ${mb_in} MB of CSV; $threads threads"

measure() { # name, command...: prints seconds and peak RSS (KiB)
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/$name.time" "$@" > "$work/$name.out" 2>"$work/$name.err" || { cat "$work/$name.err"; return 1; }
}
measure baseline target/release/examples/csv_to_parquet "$data" "$work/baseline" "$threads"
rm -rf "$data/quarantine"
measure gpdp "$bin" collect --quiet --extract "$data" --store "$work/store" --key "$work/key" --threads "$threads"

peer=skip
venv=bench-data/peer-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >/dev/null 2>&1 && "$venv/bin/pip" install -q -r benches/peers/requirements.txt >/dev/null 2>&1 || true
fi
if "$venv/bin/python" -c "import polars" >/dev/null 2>&1; then
  measure peer "$venv/bin/python" benches/peers/collect_peer.py --extract "$data" --out "$work/peer" --key "$work/key" && peer=ok
fi

python3 - "$work" "$rows_in" "$mb_in" "$peer" "$patients" "$practices" "$threads" <<'PY'
import sys
work, rows, mb, peer = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
patients, practices, threads = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
def t(name):
    s, kib = open(f"{work}/{name}.time").read().split()
    return float(s), int(kib) / 1024
runs = [("baseline (CSV->Parquet, no de-id)", "baseline"), ("gpdp collect", "gpdp")]
labels = {"baseline": "baseline: plain CSV → Parquet, same crates, no de-identification",
          "gpdp": "**gpdp collect**", "peer": "Python peer (polars + hmac, `benches/peers/`)"}
if peer == "ok":
    runs.append(("python peer (polars + hmac)", "peer"))
g, _ = t("gpdp")
print(f"{'run':38} {'wall s':>7} {'M rows/s':>9} {'MB/s':>7} {'peak MiB':>9} {'gpdp vs this':>13}")
for label, name in runs:
    s, mib = t(name)
    print(f"{label:38} {s:7.2f} {rows/s/1e6:9.2f} {mb/s:7.0f} {mib:9.0f} {s/g:12.2f}x")
# The same figures as Markdown, for docs/benchmarks.md to include
# (benches/measured.py heads them with the command, date, commit and machine).
md = [f"{patients:,} patients, {practices} practices: {rows:,} rows, {mb:,.0f} MB of CSV (`practices/`), {threads} threads.", "",
      "| run | wall s | M rows/s | MB/s | peak memory | gpdp collect's time ÷ this |", "| --- | --- | --- | --- | --- | --- |"]
for _, name in runs:
    s, mib = t(name)
    md.append(f"| {labels[name]} | {s:.2f} | {rows / s / 1e6:.2f} | {mb / s:.0f} | {mib:.0f} MiB | {g / s:.2f}× |")
if peer != "ok":
    md += ["", "The Python peer did not run (its requirements could not be installed)."]
sys.path.insert(0, "benches")
import measured
measured.write(f"collect-{patients}", f"Collection against its peers, {patients:,} patients ({practices} practices)",
               f"bash benches/collect.sh {patients} {practices}", "one run of each, on one extract", md)
PY
