"""SmartNoise SQL on the same data, query and privacy parameters as `benches/dp.rs`: the outside
reference for the sandbox's DP path. Prints `smartnoise_median_seconds <s>` (execution only; the
Parquet files are loaded into pandas once, before timing).

    python3 benches/smartnoise_dp.py <tax_monthly parquet dir> [rounds]
"""

import statistics
import sys
import time

import pandas as pd
import snsql
from snsql import Privacy

# Revenue is left out: with its bounds (up to 5 million, 12 rows per enterprise) SmartNoise
# refuses the noise scale as too large.
QUERY = (
    "SELECT tax_credit_rating, COUNT(*) AS n, SUM(vat_paid) AS vat "
    "FROM tax.tax_monthly GROUP BY tax_credit_rating"
)

# The policy's bounds and contribution limits (tax_bureau.toml): 12 rows per enterprise.
METADATA = {
    "Database": {
        "tax": {
            "tax_monthly": {
                "row_privacy": False,
                "max_ids": 12,
                "credit_code": {"type": "string", "private_id": True},
                "tax_credit_rating": {"type": "string"},
                "vat_paid": {"type": "float", "lower": 0, "upper": 200000},
                "revenue_declared": {"type": "float", "lower": 0, "upper": 5000000},
            }
        }
    }
}


def main():
    path = sys.argv[1]
    rounds = min(int(sys.argv[2]) if len(sys.argv) > 2 else 5, 5)
    frame = pd.read_parquet(path, columns=["credit_code", "tax_credit_rating", "vat_paid",
                                           "revenue_declared"])
    print(f"smartnoise rows {len(frame)}")
    reader = snsql.from_df(frame, privacy=Privacy(epsilon=1.0, delta=1e-7), metadata=METADATA)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = reader.execute(QUERY)
        times.append(time.perf_counter() - start)
    print(f"smartnoise result {result}")
    print(f"smartnoise_median_seconds {statistics.median(times):.4f}")


if __name__ == "__main__":
    main()
