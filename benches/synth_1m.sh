#!/usr/bin/env bash
# Wall time, rows/s, bytes written and peak memory of `gpdp synth` (release),
# written to docs/measurements/synth-PATIENTS.md (benches/measured.py).
# Usage: bash benches/synth_1m.sh [PATIENTS] [PRACTICES]
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-1000000}
practices=${2:-100}
cargo build --release --quiet --bin gpdp
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=$work/synth
/usr/bin/time -f '%e %M' -o "$work/time" \
  ./target/release/gpdp synth --quiet --out "$out" --patients "$patients" --practices "$practices" --seed 1
python3 - "$work" "$patients" "$practices" <<'PY'
import json, os, sys
work, patients, practices = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s, kib = open(f"{work}/time").read().split()
s, mib = float(s), int(kib) / 1024
def size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
out = f"{work}/synth"
counts = json.load(open(f"{out}/truth/summary.json"))["counts"]
gp_rows = sum(counts["rows"].values())
gp_bytes, all_bytes = size(f"{out}/practices"), size(out)
print(f"{s:.2f} s wall, {gp_rows / s / 1e6:.2f} M GP rows/s, {gp_bytes / 1e6:.0f} MB of practice CSV "
      f"({all_bytes / 1e6:.0f} MB in all), {mib:.0f} MiB peak")
md = ["| patients | practices | wall s | GP rows | M GP rows/s | practice CSV | everything written | peak memory |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |",
      f"| {patients:,} | {practices} | {s:.2f} | {gp_rows:,} | {gp_rows / s / 1e6:.2f} | {gp_bytes / 1e6:,.0f} MB "
      f"| {all_bytes / 1e6:,.0f} MB | {mib:.0f} MiB |", "",
      "GP rows are the practices' patients, clinical events and medications; everything written adds the "
      "provider files (`linked/`), the truth, the postcode reference and the NDOO list."]
sys.path.insert(0, "benches")
import measured
measured.write(f"synth-{patients}", f"`gpdp synth`, {patients:,} patients ({practices} practices)",
               f"bash benches/synth_1m.sh {patients} {practices}", "one run, seed 1", md)
PY
