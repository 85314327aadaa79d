"""DuckDB on the same Parquet files as the TRE: the peer a researcher might
use instead. Same four queries as examples/tre_bench.rs, over the same
views (same age bands, same NDOO and tombstone filters), timed in process.

Usage: python benches/peers/tre_duckdb.py STORE [RUNS]   (prints JSON lines)
"""
import json
import sys
import time

import duckdb

store, runs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 7
manifest = json.load(open(f"{store}/manifest.json"))
files = lambda t: [f"{store}/{b['files'][t]['path']}" for b in manifest["batches"].values()]
con = duckdb.connect()
con.execute("SET threads = 2")
optouts = []
for name in ("tombstones", "ndoo"):
    if manifest.get(name):
        con.execute(f"CREATE VIEW raw_{name} AS SELECT * FROM read_parquet('{store}/{manifest[name]['path']}')")
        optouts.append(f"patient_key NOT IN (SELECT patient_key FROM raw_{name})")
where = " AND ".join(optouts) or "TRUE"
con.execute(f"""CREATE VIEW patients AS SELECT patient_id,
    CASE WHEN age < 16 THEN '0-15' WHEN age < 30 THEN '16-29' WHEN age < 40 THEN '30-39' WHEN age < 50 THEN '40-49'
         WHEN age < 60 THEN '50-59' WHEN age < 70 THEN '60-69' WHEN age < 80 THEN '70-79' ELSE '80+' END AS age_band,
    sex, ethnicity, imd_decile
    FROM (SELECT *, CAST(((2026 * 12 + 3) - (year(birth_month) * 12 + month(birth_month))) // 12 AS BIGINT) AS age
          FROM read_parquet({files('patients')})) WHERE {where}""")
con.execute(f"""CREATE VIEW clinical_events AS SELECT patient_id, date, year(date) AS event_year, snomedct_code, numeric_value
    FROM read_parquet({files('clinical_events')}) WHERE {where}""")
queries = {
    "patients_by_sex_age": "SELECT sex, age_band, count(*) AS n FROM patients GROUP BY sex, age_band",
    "diabetes_by_imd": "SELECT imd_decile, count(DISTINCT patient_id) AS n FROM patients WHERE patient_id IN (SELECT patient_id FROM clinical_events WHERE snomedct_code IN ('73211009', '46635009', '44054006')) GROUP BY imd_decile",
    "hba1c_by_age": "SELECT p.age_band, count(*) AS tests, avg(c.numeric_value) AS mean FROM clinical_events c JOIN patients p ON c.patient_id = p.patient_id WHERE c.snomedct_code = '999791000000106' GROUP BY p.age_band",
    "events_by_year": "SELECT event_year, count(*) AS n FROM clinical_events GROUP BY event_year",
}
for name, sql in queries.items():
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        con.execute(sql).fetchall()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    print(json.dumps({"query": name, "duckdb_p50_ms": round(times[len(times) // 2], 1), "duckdb_p95_ms": round(times[min(len(times) - 1, round((len(times) - 1) * 0.95))], 1)}))
