"""Spark job: validate one day's silver and collect manifest (Great Expectations), write the report, gate the run.

    spark-submit jobs/validate.py --date 2026-01-15 [--lake URI] [--set key=value ...]
        [--config-json '{"price_max": 5000}'] [--allow-empty [true|false]]

Exit code 1 with the failed critical expectations when the gate fails (the report is written first).
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
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
from privrec_pipeline.quality.config import QualityConfig
from privrec_pipeline.quality.validate import report_index_uri, run_validate
from privrec_pipeline.spark.session import get_spark


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    add_settings_arguments(parser, "quality setting")
    parser.add_argument("--allow-empty", nargs="?", const="true", default="false", type=parse_bool,
                        help="a day without traffic: an empty silver partition passes the row-count check")
    args = parser.parse_args(argv)
    config = parse_settings(parser, args, QualityConfig, "quality setting")
    lake = resolve_lake(args.lake)
    print(f"quality report: {report_index_uri(lake, args.date)}", flush=True)
    # Importing Great Expectations takes seconds; do it while the JVM starts.
    warm = threading.Thread(target=importlib.import_module, args=("great_expectations",), daemon=True)
    warm.start()
    spark = get_spark(f"privrec-validate-{args.date}", args.master)
    warm.join()
    summary = run_validate(spark, lake, args.date, config, run_id=args.run_id, allow_empty=args.allow_empty)
    print(json.dumps({"step": "validate", "date": summary.date, "gate": summary.gate, "rows": summary.rows,
                      "warnings": summary.failed_warning, "report": summary.report}))
    return 0


if __name__ == "__main__":
    run(main)
