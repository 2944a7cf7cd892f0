"""Spark job: one day's DP statistics as an accounted release (ledger) -> gold/dp_stats/dt=D/.

    spark-submit jobs/dp_stats.py --date 2026-01-15 [--lake URI] [--force [true|false]]
        [--epsilon E] [--delta D] [--set key=value ...] [--config-json '{...}'] [--dag-id ID]

Settings are those of privrec_pipeline/dp_stats/params.py (contribution bounds, price clamp,
budget split, public categories). The ledger is $PRIVREC_LEDGER_URL (else the lake's SQLite
file) with the policy of $PRIVREC_BUDGET_EPSILON / _DELTA / _WINDOW_DAYS. Exit code 1 with
PrivacyBudgetExceeded, naming the numbers, when the release would break the policy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    add_settings_arguments,
    base_parser,
    parse_bool,
    parse_settings,
    resolve_lake,
    run,
)
from privrec_pipeline.dp_stats.params import DPStatsParams


def parse_args(argv: list[str] | None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dag-id", default="manual", help="Airflow DAG id, recorded in the ledger")
    parser.add_argument("--force", nargs="?", const="true", default="false", type=parse_bool,
                        help="make a new release even if the day was released before (spends budget again)")
    parser.add_argument("--epsilon", type=float, default=None, help="epsilon of the release")
    parser.add_argument("--delta", type=float, default=None, help="delta of the release")
    add_settings_arguments(parser, "DP statistics setting")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("epsilon", args.epsilon), ("delta", args.delta)) if v is not None}
    args.params = parse_settings(parser, args, DPStatsParams, "DP statistics setting", overrides)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from privrec_pipeline.dp_stats.release import run_dp_stats
    from privrec_pipeline.privacy.ledger import open_ledger
    from privrec_pipeline.spark.session import get_spark

    lake = resolve_lake(args.lake)
    ledger = open_ledger(lake)
    spark = get_spark(f"privrec-dp-stats-{args.date}", args.master)
    result = run_dp_stats(spark, lake, args.date, args.params, ledger, run_id=args.run_id, dag_id=args.dag_id,
                          force=args.force)
    doc = result.release
    print(json.dumps({"step": "dp_stats", "date": doc["date"], "status": result.status,
                      "release_id": doc["release_id"], "epsilon": doc["epsilon"], "delta": doc["delta"],
                      "items": doc["released"]["items"], "report": f"{result.uri}/report.html"}))
    return 0


if __name__ == "__main__":
    run(main)
