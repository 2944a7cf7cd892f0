"""Run privrec's benchmarks: ``python -m benchmarks.run [--only NAME ...] [options]``.

``make bench BENCH_ARGS="--only ingest --events 500000"`` passes the options through.
Each benchmark is a module with ``NAME``, ``add_arguments(group)`` and
``run(args, console, command) -> int`` (exit code); add new ones to ``BENCHMARKS``.
Results go to ``--out`` (git-ignored ``bench-out/``) and to a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from types import ModuleType

from benchmarks import (
    audit,
    backfill,
    content_prior,
    dp_stats,
    ingest,
    movielens_pipeline,
    scaling,
    training,
    warm_engine,
)

BENCHMARKS: dict[str, ModuleType] = {m.NAME: m for m in (ingest, dp_stats, training, movielens_pipeline, content_prior,
                                                        audit, warm_engine, scaling, backfill)}


def invocation(argv: list[str]) -> str:
    """The command as the user typed it (``make bench ...`` when started by make)."""
    if os.environ.get("MAKELEVEL"):
        return "make bench" + (f" BENCH_ARGS={shlex.quote(shlex.join(argv))}" if argv else "")
    return shlex.join([".venv/bin/python", "-m", "benchmarks.run", *argv])


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                        help=f"run only this benchmark (repeatable; one of: {', '.join(BENCHMARKS)})")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="working and result folder (default: ./bench-out)")
    parser.add_argument("--no-markdown", action="store_true",
                        help="do not update BENCHMARKS.md (results still go to --out)")
    for module in BENCHMARKS.values():
        module.add_arguments(parser.add_argument_group(module.NAME))
    args = parser.parse_args(argv)
    args.out = args.out.expanduser().resolve()
    console = Console(width=None if sys.stdout.isatty() else 120)  # wide tables in log files
    status = 0
    for name in args.only or list(BENCHMARKS):
        status = BENCHMARKS[name].run(args, console, invocation(argv)) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
