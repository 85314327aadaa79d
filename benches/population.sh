# Sourced by the benchmark scripts: the cached synthetic population.
# population PATIENTS PRACTICES: generates bench-data/synth-PATIENTS-PRACTICES
# (seed 1) with $bin unless it is already there, and prints its path.
population() {
  local data="bench-data/synth-$1-$2"
  if [ ! -f "$data/truth/summary.json" ]; then
    rm -rf "$data"; mkdir -p bench-data
    "$bin" synth --quiet --out "$data" --patients "$1" --practices "$2" --seed 1 >/dev/null
  fi
  echo "$data"
}
