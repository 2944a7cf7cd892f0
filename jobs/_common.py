"""Argument parsing shared by the Spark entry points (kept tiny: jobs only wire)."""

from __future__ import annotations

import argparse
import datetime as dt

from privrec_pipeline.config import lake_root


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--date", required=True, type=dt.date.fromisoformat,
                        help="data interval (UTC day) to process, YYYY-MM-DD")
    parser.add_argument("--lake", default=None, help="lake URI (default: $PRIVREC_LAKE or ./lake)")
    parser.add_argument("--run-id", default="manual", help="Airflow run id, recorded in the manifest")
    parser.add_argument("--master", default=None, help="Spark master when not started by spark-submit")
    return parser


def resolve_lake(value: str | None) -> str:
    return value or lake_root()


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")
