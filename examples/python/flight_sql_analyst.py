"""An analyst's session with the data sandbox over Arrow Flight SQL (ADBC), into pandas.

    python -m venv .venv && .venv/bin/pip install -r examples/python/requirements.txt
    .venv/bin/python examples/python/flight_sql_analyst.py \
        --url grpc://127.0.0.1:50051 --user analyst \
        --token-file sandbox-data/credentials/analyst.token

Over TLS (`sandboxd --tls`), use `grpc+tls://localhost:50051` and `--ca sandbox-data/tls/ca.pem`.
The sandbox answers aggregates only, and a query that could single an enterprise out is refused
with the rule it breaks. On the demo, ad-hoc questions about sensitive (L3 and L4) data are
answered under differential privacy: the numbers carry noise (its 95% interval per column travels
in the release summary, the `app_metadata` of the first result message), and groups of few
enterprises are not shown. Where an owner marks a grant exact, groups of fewer than k enterprises
are withheld instead.
"""

import argparse
import sys
from pathlib import Path

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flight_sql


def connect(url: str, user: str, token: str, ca: str | None = None):
    """A DB-API connection: the handshake sends user and token as basic credentials."""
    db_kwargs = {"username": user, "password": token}
    if ca:
        db_kwargs[adbc_driver_flightsql.DatabaseOptions.TLS_ROOT_CERTS.value] = (
            Path(ca).read_text()
        )
    # The sandbox is read-only and has no transactions: stay in autocommit.
    return flight_sql.connect(url, db_kwargs=db_kwargs, autocommit=True)


def explain_connection_error(error: Exception, url: str, ca: str | None) -> str | None:
    """What a failed connection means and the option that fixes it, or None when the error is
    not about the connection (the driver reports every cause in gRPC's words)."""
    text = str(error)
    tls = url.startswith("grpc+tls://")
    if "connection refused" in text.lower():
        return f"nothing is listening at {url}: start sandboxd, or fix --url (sandboxd --listen sets the address)"
    if "x509" in text or "certificate signed by unknown authority" in text:
        if ca:
            return f"the server's certificate is not signed by the CA in {ca}: use the server's CA (sandbox-data/tls/ca.pem)"
        return "the server's certificate is not trusted: pass --ca sandbox-data/tls/ca.pem (the CA sandboxd --tls wrote)"
    if tls and ("first record does not look like a TLS handshake" in text or "handshake" in text.lower()):
        return f"the server does not speak TLS at this address: use {url.replace('grpc+tls://', 'grpc://', 1)}"
    if not tls and ("server preface" in text or "connection closed" in text.lower() or "EOF" in text):
        return (
            f"the server closed the plaintext connection; it probably expects TLS: use "
            f"{url.replace('grpc://', 'grpc+tls://', 1)} with --ca sandbox-data/tls/ca.pem"
        )
    return None


def tables(conn) -> list[str]:
    """The datasets this principal may query, as the catalog shows them."""
    objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    return sorted(
        table["table_name"]
        for catalog in objects
        for schema in catalog["catalog_db_schemas"] or []
        for table in schema["db_schema_tables"] or []
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="grpc://127.0.0.1:50051")
    parser.add_argument("--user", default="analyst")
    parser.add_argument("--token-file", default="sandbox-data/credentials/analyst.token")
    parser.add_argument("--ca", help="CA certificate (PEM) of a TLS server")
    args = parser.parse_args()
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as error:
        print(f"usage: cannot read the token file: {error} (tokens are under sandbox-data/credentials/)", file=sys.stderr)
        return 2
    try:
        return session(args)
    except flight_sql.Error as error:
        hint = explain_connection_error(error, args.url, args.ca)
        if hint is None:
            raise
        print(f"error: cannot connect to {args.url}: {hint}", file=sys.stderr)
        return 5


def session(args) -> int:
    """The analyst's questions, over one connection."""
    token = Path(args.token_file).read_text().strip()
    with connect(args.url, args.user, token, args.ca) as conn:
        print("datasets:", ", ".join(tables(conn)))
        with conn.cursor() as cur:
            cur.execute(
                "SELECT size_class, COUNT(*) AS enterprises, "
                "SUM(registered_capital) AS capital "
                "FROM enterprises GROUP BY size_class ORDER BY size_class"
            )
            print(cur.fetch_df().to_string(index=False))

            # Ratings held by few enterprises are withheld, not shown as small numbers.
            cur.execute(
                "SELECT tax_credit_rating, COUNT(DISTINCT credit_code) AS enterprises "
                "FROM tax_monthly GROUP BY tax_credit_rating ORDER BY tax_credit_rating"
            )
            print(cur.fetch_df().to_string(index=False))

            # Raw records are never released: the error names the rule.
            try:
                cur.execute("SELECT * FROM enterprises")
                cur.fetchall()
                print("unexpected: raw rows were released", file=sys.stderr)
                return 1
            except flight_sql.Error as error:
                print("refused:", str(error).splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
