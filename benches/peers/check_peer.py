#!/usr/bin/env python3
"""Checks collect_peer.py's output against the extract's ground truth.

    python3 benches/peers/check_peer.py --extract DIR --out OUT --key KEYFILE

Unlike the peer, this script reads DIR/truth/. It rebuilds the expected
output row by row with the `csv` module (slow, simple, independent of the
peer's vectorised code) and compares:

  1. quarantine: the set of (practice, table, line, reason) in OUT/quarantine
     equals truth/bad_rows.csv exactly;
  2. Type 1: per practice, the patient_ids in OUT/tables/patients are exactly
     the HMACs of truth/patients.csv rows with type1_at_extract=false, and
     the tombstones exactly those with type1_at_extract=true (a truth row
     whose Type 1 codes live at another practice counts at that practice
     only);
  3. every output table equals, as a multiset of rows, the expected rows
     (good rows, Type 1 dissenters removed, excluded codes removed,
     generalised, pseudonymised with a fresh hmac.new per number);
  4. output schemas hold only the permitted columns.
Exits 1 on the first mismatching check (after printing all results).
"""

import argparse
import csv
import datetime as dt
import hashlib
import hmac
import os
import sys
from collections import Counter

import polars as pl

DISSENT, WITHDRAWN = "827241000000103", "827261000000102"
SCHEMAS = {
    "patients": ["patient_id", "practice_id", "birth_month", "sex", "ethnicity", "lsoa_code",
                 "imd_decile", "registration_start", "registration_end", "date_of_death"],
    "clinical_events": ["patient_id", "date", "snomedct_code", "numeric_value"],
    "medications": ["patient_id", "date", "dmd_code", "quantity"],
}


def pid(key, domain, value):
    return hmac.new(key, domain + value.encode(), hashlib.sha256).digest()


def d(s):
    return dt.date.fromisoformat(s) if s else None


def m(s):
    return d(s).replace(day=1) if s else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--extract", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--sensitive", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "synthetic-data", "codelists",
        "sensitive.csv"))
    a = ap.parse_args()
    key = open(a.key, "rb").read()
    failures = []

    def check(name, ok, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail and not ok else ''}")
        if not ok:
            failures.append(name)

    with open(os.path.join(a.extract, "truth", "bad_rows.csv")) as f:
        bad = {(r["practice"], r["table"], int(r["line"]), r["reason"]) for r in csv.DictReader(f)}
    with open(os.path.join(a.extract, "truth", "patients.csv")) as f:
        truth = list(csv.DictReader(f))
    with open(a.sensitive) as f:
        excluded = {r["snomedct_code"] for r in csv.DictReader(f)} | {DISSENT, WITHDRAWN}
    with open(os.path.join(a.extract, "reference", "postcode_lsoa.csv")) as f:
        lookup = {r["postcode"]: (r["lsoa_code"], int(r["imd_decile"])) for r in csv.DictReader(f)}

    practices = sorted(os.listdir(os.path.join(a.extract, "practices")))
    got_bad = set()
    for ods in practices:
        with open(os.path.join(a.out, "quarantine", f"{ods}.csv")) as f:
            got_bad |= {(ods, r["table"], int(r["line_no"]), r["reason"]) for r in csv.DictReader(f)}
    check(f"quarantine = truth/bad_rows.csv ({len(bad)} rows)", got_bad == bad,
          f"missing {sorted(bad - got_bad)[:5]}, extra {sorted(got_bad - bad)[:5]}")

    for t, cols in SCHEMAS.items():
        names = {tuple(pl.read_parquet_schema(os.path.join(a.out, "tables", t, f"{ods}.parquet")))
                 for ods in practices}
        check(f"{t} columns", names == {tuple(cols)}, str(names))

    for ods in practices:
        bad_lines = {(t, line) for (p, t, line, _) in bad if p == ods}
        dissent = {r["nhs_number"] for r in truth
                   if r["practice"] == ods and r["type1_at_extract"] == "true"}
        stay = {r["nhs_number"] for r in truth
                if r["practice"] == ods and r["type1_at_extract"] == "false"}
        ppid = pid(key, b"gpdp/v1/practice\x00", ods)

        def good_rows(t):
            with open(os.path.join(a.extract, "practices", ods, f"{t}.csv"), newline="") as f:
                rd = csv.reader(f)
                next(rd)
                for line, row in enumerate(rd, start=2):
                    if (t, line) not in bad_lines and row[0] not in dissent:
                        yield row

        def nid(n):
            return pid(key, b"gpdp/v1/nhs_number\x00", n)

        exp = {
            "patients": Counter(
                (nid(r[0]), ppid, m(r[3]), r[4], r[6], *lookup.get(r[5], (None, None)),
                 d(r[7]), d(r[8]), m(r[9]))
                for r in good_rows("patients")),
            "clinical_events": Counter(
                (nid(r[0]), d(r[1]), r[2], float(r[3]) if r[3] else None)
                for r in good_rows("clinical_events") if r[2] not in excluded),
            "medications": Counter(
                (nid(r[0]), d(r[1]), r[2], int(r[3]) if r[3] else None)
                for r in good_rows("medications")),
        }
        for t in SCHEMAS:
            got = Counter(pl.read_parquet(os.path.join(a.out, "tables", t, f"{ods}.parquet")).iter_rows())
            check(f"{ods} {t}: {sum(got.values())} rows equal expected", got == exp[t],
                  f"expected {sum(exp[t].values())}; {len(exp[t] - got)} missing, "
                  f"{len(got - exp[t])} unexpected")
        got_p = set(pl.read_parquet(os.path.join(a.out, "tables", "patients", f"{ods}.parquet"))
                    ["patient_id"].to_list())
        check(f"{ods} patients = truth type1_at_extract=false ({len(stay)})",
              got_p == {nid(n) for n in stay})
        tomb = set(pl.read_parquet(os.path.join(a.out, "tombstones", f"{ods}.parquet"))
                   ["patient_id"].to_list())
        check(f"{ods} tombstones = truth type1_at_extract=true ({len(dissent)})",
              tomb == {nid(n) for n in dissent})

    print(f"{len(failures)} failed" if failures else "all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
