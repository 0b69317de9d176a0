"""Drives the sandbox through the real ADBC Flight SQL driver and prints what it saw as JSON,
for `flight.rs` to check against raw DataFusion. Arguments: url, user, token, and a JSON object
of queries (`aggregate`, `suppressed`, `denied`)."""

import json
import sys

import adbc_driver_flightsql.dbapi as flight_sql

sys.path.insert(0, sys.argv[5])
from flight_sql_analyst import connect, tables  # noqa: E402  (the example's own functions)


def error_of(run) -> str | None:
    try:
        run()
    except flight_sql.Error as error:
        return str(error)
    return None


def main() -> None:
    url, user, token, queries = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    seen = {}
    with connect(url, user, token) as conn:
        seen["tables"] = tables(conn)
        with conn.cursor() as cur:
            cur.execute(queries["aggregate"])
            seen["aggregate"] = json.loads(cur.fetch_df().to_json(orient="records"))
            cur.execute(queries["suppressed"])
            seen["suppressed"] = cur.fetch_arrow_table().to_pylist()

            def denied():
                cur.execute(queries["denied"])
                cur.fetchall()

            seen["denied"] = error_of(denied)

    def bad_password():
        with connect(url, user, "not-the-token") as conn, conn.cursor() as cur:
            cur.execute(queries["aggregate"])

    seen["bad_password"] = error_of(bad_password)
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
