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

from _common import base_parser, parse_bool, resolve_lake
from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.quality.config import QualityConfig
from privrec_pipeline.quality.validate import report_index_uri, run_validate
from privrec_pipeline.settings import parse_key_values
from privrec_pipeline.spark.session import get_spark


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a quality setting (privrec_pipeline/quality/config.py); repeatable")
    parser.add_argument("--config-json", default="{}", help="quality settings as one JSON object")
    parser.add_argument("--allow-empty", nargs="?", const="true", default="false", type=parse_bool,
                        help="a day without traffic: an empty silver partition passes the row-count check")
    args = parser.parse_args(argv)
    try:
        settings = json.loads(args.config_json or "{}")
    except ValueError as exc:
        parser.error(f"--config-json is not JSON: {exc}")
    if not isinstance(settings, dict):
        parser.error("--config-json must be a JSON object")
    try:
        config = QualityConfig.from_settings({**settings, **parse_key_values(args.settings, "quality setting")})
    except ConfigurationError as exc:
        parser.error(str(exc))
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
    sys.exit(main())
