#!/usr/bin/env bash
# Wall time, rows/s and peak memory of `gpdp synth` at 1M patients (release).
# Usage: bash benches/synth_1m.sh [PATIENTS] [PRACTICES]
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-1000000}
practices=${2:-100}
cargo build --release --quiet
out=$(mktemp -d)/synth
trap 'rm -rf "$(dirname "$out")"' EXIT
/usr/bin/time -f '%e s wall, %M KiB peak RSS, %P CPU' \
  ./target/release/gpdp synth --quiet --out "$out" --patients "$patients" --practices "$practices" --seed 1
du -sh "$out" | awk '{print $1 " written"}'
