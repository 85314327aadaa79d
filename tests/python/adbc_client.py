"""A researcher's Python session against `gpdp serve`, over ADBC Flight SQL.

Usage: adbc_client.py URI SQL...   Prints one JSON object per case:
  {"case": ..., "ok": true, "columns": [...], "rows": [[...], ...]}
  {"case": ..., "ok": false, "error": "..."}
Cases: each SQL with the user@project handshake; the first SQL with a
bearer token and the project header; with no credentials; with a wrong
token; and SELECT * FROM patients.
"""
import json
import sys
import warnings

import adbc_driver_flightsql.dbapi as flightsql

warnings.simplefilter("ignore")  # "Cannot disable autocommit": no transactions here
uri, sqls = sys.argv[1], sys.argv[2:]
LOGIN = {"username": "alice@demo-opensafely", "password": "demo-alice-token"}


def run(case, sql, **kwargs):
    try:
        with flightsql.connect(uri, **kwargs) as conn:
            cur = conn.cursor()
            cur.execute(sql)
            table = cur.fetch_arrow_table()
            rows = [list(r.values()) for r in table.to_pylist()]
            print(json.dumps({"case": case, "ok": True, "columns": table.column_names, "rows": rows}))
    except Exception as e:  # the driver's errors carry the server's status message
        print(json.dumps({"case": case, "ok": False, "error": str(e)}))


for i, sql in enumerate(sqls):
    run(f"sql{i}", sql, db_kwargs=LOGIN)
run("bearer", sqls[0], db_kwargs={
    "adbc.flight.sql.authorization_header": "Bearer demo-alice-token",
    "adbc.flight.sql.rpc.call_header.x-gpdp-project": "demo-opensafely",
})
run("no_token", sqls[0])
run("wrong_token", sqls[0], db_kwargs={"username": "alice@demo-opensafely", "password": "wrong"})
run("select_star", "SELECT * FROM patients", db_kwargs=LOGIN)
