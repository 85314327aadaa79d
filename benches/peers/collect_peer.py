#!/usr/bin/env python3
"""Benchmark peer for `gpdp collect`: the same de-identification, in Python + polars.

This is the script a competent data engineer would write instead of gpdp:
vectorised polars for parsing, validation, joins and Parquet output, and
Python's `hmac` (one pre-keyed object, copied per message) for the keyed
pseudonyms, computed once per distinct NHS number per practice.

    python3 benches/peers/collect_peer.py --extract DIR --out OUT --key KEYFILE

Per practice (DIR/practices/<ODS>/):
  1. quarantine bad rows (wrong_column_count, missing_nhs_number,
     malformed_nhs_number, invalid_nhs_number, malformed_date) to
     OUT/quarantine/<ODS>.csv; they never reach the tables;
  2. Type 1 opt-out at source: latest-dated dissent / dissent-withdrawn code
     wins, a same-day tie counts as dissent; dissenters' rows of all three
     tables are dropped and only their pseudonyms are written, to
     OUT/tombstones/<ODS>.parquet;
  3. patient_id = HMAC-SHA256(key, b"gpdp/v1/nhs_number\\0" + 10 digits);
  4. date_of_birth -> birth_month, date_of_death -> month (policy), postcode
     -> lsoa_code + imd_decile, practice -> practice_id = HMAC-SHA256(key,
     b"gpdp/v1/practice\\0" + ODS);
  5. names, postcode, free text and NHS number dropped; sensitive codes and
     the Type 1 codes excluded from clinical events;
  6. Parquet (zstd level 1) to OUT/tables/<table>/<ODS>.parquet.
Prints one JSON summary line on stdout.

It never reads DIR/truth/ (the ground truth); see check_peer.py for that.
"""

import argparse
import hashlib
import hmac
import json
import os
import sys
import time

import polars as pl

DISSENT = "827241000000103"
WITHDRAWN = "827261000000102"

PATIENT_DOMAIN = b"gpdp/v1/nhs_number\x00"
PRACTICE_DOMAIN = b"gpdp/v1/practice\x00"

COLUMNS = {
    "patients": [
        "nhs_number", "given_name", "family_name", "date_of_birth", "sex",
        "postcode", "ethnicity", "registration_start", "registration_end",
        "date_of_death",
    ],
    "clinical_events": ["nhs_number", "date", "snomedct_code", "numeric_value", "free_text"],
    "medications": ["nhs_number", "date", "dmd_code", "quantity", "free_text"],
}
# The one date column whose malformation quarantines a row.
CHECKED_DATE = {"patients": "date_of_birth", "clinical_events": "date", "medications": "date"}
TABLES = list(COLUMNS)

REASONS = [
    "wrong_column_count",
    "missing_nhs_number",
    # Not ten ASCII digits. gpdp's NhsNumberError::reason() names this
    # "malformed_nhs_number"; the synthetic extracts never contain one.
    "malformed_nhs_number",
    "invalid_nhs_number",
    "malformed_date",
]

PARQUET = dict(compression="zstd", compression_level=1)


def die(msg):
    print(f"collect_peer: {msg}", file=sys.stderr)
    sys.exit(2)


def read_key(path):
    with open(path, "rb") as f:
        key = f.read()
    if len(key) != 32:
        die(f"key file {path} holds {len(key)} bytes; a collection key is exactly 32 bytes")
    return key


def read_lines(path, table):
    """One row per data line: its raw text and its 1-based line number (header = 1).

    Reading lines rather than letting a CSV reader split fields is what lets
    us see a row with a missing last field: a CSV reader pads it with null,
    indistinguishable from an empty field.
    """
    with open(path, "rb") as f:
        header = f.readline().rstrip(b"\r\n").decode()
    if header.split(",") != COLUMNS[table]:
        die(f"{path}: unexpected header {header!r}")
    df = pl.read_csv(
        path,
        has_header=False,
        skip_rows=1,
        separator="\x1f",  # never in the data: every line is one field
        quote_char=None,
        new_columns=["line"],
        schema={"line": pl.String},
        raise_if_empty=False,
    )
    return df.with_row_index("line_no", offset=2)


def split_fields(df, table):
    """Adds `n_fields` (quote-aware) and one column per field (the last takes the rest)."""
    cols = COLUMNS[table]
    n = len(cols)
    line = pl.col("line")
    # Quoted fields (free text) may hold commas: drop quoted spans before counting.
    unquoted = (
        pl.when(line.str.contains('"', literal=True))
        .then(line.str.replace_all(r'"[^"]*"', ""))
        .otherwise(line)
    )
    return df.with_columns(
        n_fields=unquoted.str.count_matches(",", literal=True) + 1,
        f=line.str.splitn(",", n).struct.rename_fields(cols),
    ).unnest("f")


def nhs_status(nhs):
    """Quarantine reason for each NHS number (null when valid), vectorised."""
    digits = [nhs.str.slice(i, 1).cast(pl.Int32, strict=False) for i in range(10)]
    total = sum(d * (10 - i) for i, d in enumerate(digits[:9]))
    check = 11 - total % 11
    check = pl.when(check == 11).then(0).otherwise(check)  # 10 stays 10: never a digit
    return (
        pl.when(nhs == "").then(pl.lit("missing_nhs_number"))
        .when(~nhs.str.contains(r"^[0-9]{10}$")).then(pl.lit("malformed_nhs_number"))
        .when(check != digits[9]).then(pl.lit("invalid_nhs_number"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def valid_date(col):
    c = pl.col(col)
    return (c.str.len_bytes() == 10) & c.str.to_date("%Y-%m-%d", strict=False).is_not_null()


def collect_practice(ods, pdir, key_base, practice_base, lookup, excluded_codes, out):
    rows_in = 0
    tables = {}
    for t in TABLES:
        df = split_fields(read_lines(os.path.join(pdir, f"{t}.csv"), t), t)
        rows_in += df.height
        tables[t] = df

    # Every distinct NHS number in the practice: validated, and (if valid)
    # pseudonymised once.
    uniq = (
        pl.concat([tables[t].select("nhs_number") for t in TABLES])
        .unique()
        .with_columns(nhs_reason=nhs_status(pl.col("nhs_number")))
    )
    valid = uniq.filter(pl.col("nhs_reason").is_null())["nhs_number"].to_list()

    def pseudonym(digits):
        h = key_base.copy()
        h.update(digits.encode())
        return h.digest()

    ids = pl.DataFrame(
        {"nhs_number": valid, "patient_id": [pseudonym(n) for n in valid]},
        schema={"nhs_number": pl.String, "patient_id": pl.Binary},
    )
    uniq = uniq.join(ids, on="nhs_number", how="left")
    # (uniq is small; the per-table joins below keep the extract's row order)

    quarantined = []
    good = {}
    for t in TABLES:
        df = tables[t].join(uniq, on="nhs_number", how="left", maintain_order="left")
        reason = (
            pl.when(pl.col("n_fields") != len(COLUMNS[t])).then(pl.lit("wrong_column_count"))
            .when(pl.col("nhs_reason").is_not_null()).then(pl.col("nhs_reason"))
            .when(~valid_date(CHECKED_DATE[t])).then(pl.lit("malformed_date"))
            .otherwise(pl.lit(None, dtype=pl.String))
        )
        df = df.with_columns(reason=reason)
        quarantined.append(
            df.filter(pl.col("reason").is_not_null()).select(
                pl.lit(t).alias("table"), "line_no", "reason", "line"
            )
        )
        good[t] = df.filter(pl.col("reason").is_null())

    q = pl.concat(quarantined).sort("table", "line_no")
    q.write_csv(os.path.join(out, "quarantine", f"{ods}.csv"))
    by_reason = dict(q.group_by("reason").len().iter_rows())

    # Type 1 at source: latest-dated code wins; a same-day tie is dissent.
    ev = good["clinical_events"]
    t1 = (
        ev.filter(pl.col("snomedct_code").is_in([DISSENT, WITHDRAWN]))
        .select("patient_id", "date", dissent=pl.col("snomedct_code") == DISSENT)
        .filter(pl.col("date") == pl.col("date").max().over("patient_id"))
        .group_by("patient_id")
        .agg(pl.col("dissent").any())
        .filter("dissent")
        .select("patient_id")
    )
    t1.write_parquet(os.path.join(out, "tombstones", f"{ods}.parquet"), **PARQUET)
    dissenters = t1["patient_id"].implode()

    practice_id = practice_base.copy()
    practice_id.update(ods.encode())
    practice_id = practice_id.digest()

    def month(col):
        return pl.col(col).str.to_date("%Y-%m-%d", strict=False).dt.month_start()

    def day(col):
        return pl.col(col).str.to_date("%Y-%m-%d", strict=False)

    patients = (
        good["patients"]
        .filter(~pl.col("patient_id").is_in(dissenters))
        .join(lookup, on="postcode", how="left", maintain_order="left")
        .select(
            "patient_id",
            pl.lit(practice_id, dtype=pl.Binary).alias("practice_id"),
            month("date_of_birth").alias("birth_month"),
            "sex",
            "ethnicity",
            "lsoa_code",
            "imd_decile",
            day("registration_start").alias("registration_start"),
            day("registration_end").alias("registration_end"),
            month("date_of_death").alias("date_of_death"),
        )
    )
    events = (
        ev.filter(~pl.col("snomedct_code").is_in(excluded_codes))
        .filter(~pl.col("patient_id").is_in(dissenters))
        .select(
            "patient_id",
            day("date").alias("date"),
            "snomedct_code",
            pl.col("numeric_value").cast(pl.Float64, strict=False),
        )
    )
    meds = (
        good["medications"]
        .filter(~pl.col("patient_id").is_in(dissenters))
        .select(
            "patient_id",
            day("date").alias("date"),
            "dmd_code",
            pl.col("quantity").cast(pl.Int64, strict=False),
        )
    )
    rows_out = {}
    for t, df in (("patients", patients), ("clinical_events", events), ("medications", meds)):
        df.write_parquet(os.path.join(out, "tables", t, f"{ods}.parquet"), **PARQUET)
        rows_out[t] = df.height
    return rows_in, rows_out, by_reason, t1.height


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extract", required=True, help="extract directory made by `gpdp synth`")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--key", required=True, help="32-byte collection key file")
    ap.add_argument(
        "--sensitive",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "..", "..", "synthetic-data", "codelists", "sensitive.csv"),
        help="code list to exclude (column snomedct_code); default: the repo's sensitive.csv",
    )
    ap.add_argument("--engine", choices=["polars"], default="polars",
                    help="only polars is implemented")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    key = read_key(args.key)
    key_base = hmac.new(key, PATIENT_DOMAIN, hashlib.sha256)
    practice_base = hmac.new(key, PRACTICE_DOMAIN, hashlib.sha256)

    excluded = pl.read_csv(args.sensitive, schema_overrides={"snomedct_code": pl.String})
    excluded_codes = excluded["snomedct_code"].to_list() + [DISSENT, WITHDRAWN]
    lookup = pl.read_csv(
        os.path.join(args.extract, "reference", "postcode_lsoa.csv"),
        schema={"postcode": pl.String, "lsoa_code": pl.String, "imd_decile": pl.Int8},
    ).unique("postcode", keep="first")

    pdirs = os.path.join(args.extract, "practices")
    practices = sorted(p for p in os.listdir(pdirs) if os.path.isdir(os.path.join(pdirs, p)))
    for sub in ["quarantine", "tombstones"] + [f"tables/{t}" for t in TABLES]:
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)

    rows_in = 0
    rows_out = dict.fromkeys(TABLES, 0)
    quarantined = dict.fromkeys(REASONS, 0)
    type1 = 0
    for ods in practices:
        n_in, n_out, by_reason, n_t1 = collect_practice(
            ods, os.path.join(pdirs, ods), key_base, practice_base, lookup, excluded_codes, args.out
        )
        rows_in += n_in
        for t, n in n_out.items():
            rows_out[t] += n
        for r, n in by_reason.items():
            quarantined[r] += n
        type1 += n_t1

    seconds = time.perf_counter() - started
    print(json.dumps({
        "practices": len(practices),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "quarantined": quarantined,
        "type1_excluded_patients": type1,
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows_in / seconds) if seconds > 0 else None,
    }))


if __name__ == "__main__":
    main()
