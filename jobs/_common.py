"""Argument parsing shared by the Spark entry points (kept tiny: jobs only wire)."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from typing import NoReturn

from privrec_pipeline.config import lake_root


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--date", required=True, type=dt.date.fromisoformat,
                        help="data interval (UTC day) to process, YYYY-MM-DD")
    parser.add_argument("--lake", default=None, help="lake URI (default: $PRIVREC_LAKE or ./lake)")
    parser.add_argument("--run-id", default="manual", help="Airflow run id, recorded in the manifest")
    parser.add_argument("--master", default=None, help="run in a Spark application of its own on this master (default: a client of the engine, PRIVREC_SPARK_REMOTE)")
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


def add_settings_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--set key=value`` (repeatable) and ``--config-json`` for a settings dataclass."""
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a {what}; repeatable")
    parser.add_argument("--config-json", default="{}", help=f"{what}s as one JSON object")


def parse_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, cls: type, what: str,
                   overrides: dict | None = None):
    """``cls.from_settings`` of --config-json, then --set, then ``overrides``; any problem is a
    usage error (exit 2) naming it, before Spark starts."""
    import json

    from privrec_pipeline.errors import ConfigurationError
    from privrec_pipeline.settings import parse_key_values

    try:
        settings = json.loads(args.config_json or "{}")
    except ValueError as exc:
        parser.error(f"--config-json is not JSON: {exc}")
    if not isinstance(settings, dict):
        parser.error("--config-json must be a JSON object")
    try:
        return cls.from_settings({**settings, **parse_key_values(args.settings, what), **(overrides or {})})
    except ConfigurationError as exc:
        parser.error(str(exc))


def run(main: Callable[[], int | None]) -> NoReturn:
    """Run a job's ``main`` and leave with its exit code once the Spark session is stopped and
    the output flushed, skipping the interpreter's teardown: a native library's thread torn
    down at exit can abort the process ("terminate called without an active exception", exit
    134; seen under load after a step had committed its output), which would fail a finished
    step. An exception prints its traceback and exits 1, as an uncaught one does."""
    import logging
    import os
    import signal
    import sys
    import traceback

    # A task's end (timeout, "mark failed") arrives as SIGTERM: leave through SystemExit, so a
    # step's cleanup (its staging folders, its lock) runs before the exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        code = main()
    except SystemExit as stop:  # argparse's usage errors (2) and --help (0)
        code = stop.code if isinstance(stop.code, int) or stop.code is None else 1
        if not (isinstance(stop.code, int) or stop.code is None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        from pyspark.sql import SparkSession

        session = SparkSession.getActiveSession()
        if session is not None:
            session.stop()
    except Exception:
        traceback.print_exc()
        code = code or 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
