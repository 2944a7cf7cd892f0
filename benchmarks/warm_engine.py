"""Warm engine benchmark: a small day through the whole nightly DAG, and its fixed cost.

Measured in one run, on the embedded default (``privrec run``, ``airflow dags test``), days of
``--engine-events`` events:

- ``cold_start``: one ``spark-submit`` of an application that only starts and stops (the
  ingest benchmark's ``noop``): the unit of the fixed cost;
- ``baseline_day``: ``privrec run`` of a day with the code of ``--engine-baseline-ref`` (every
  Spark step a ``spark-submit`` of its own), from a git worktree: today's cost before the engine;
- ``first_day``: ``privrec run`` of the next day with no engine running: the run starts the
  engine (while Airflow starts) and stops it at the end;
- ``engine_start``: ``privrec engine start`` (once per deployment, not per day);
- ``warm_day_1``, ``warm_day_2``: ``privrec run`` of two more days on that engine (the first
  on a fresh JVM; the second is the steady state of a backfill);
- ``warm_rerun``: ``privrec run`` of the last day again (every release reused).

Targets (issue 20): warm_day_2 <= 4 x cold_start; warm_rerun < warm_day_2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.ingest import ROOT, machine, run_lines, shown_path, submit_args, write_result

if TYPE_CHECKING:
    from rich.console import Console

NAME = "warm_engine"
SECTION = ("<!-- bench:warm_engine:start -->", "<!-- bench:warm_engine:end -->")
TARGET_DAY_OVER_COLD_START = 4.0
FIRST_DAY = dt.date(2026, 1, 15)
BASELINE_REF = "4301ff5"  # the last commit with a spark-submit per Spark step


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--engine-events", type=int, default=1000,
                       help="events of each generated day (default: 1,000)")
    group.add_argument("--engine-baseline-ref", default=BASELINE_REF,
                       help=f"git commit of the baseline day (default: {BASELINE_REF})")


def _timed(command: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("ab") as out:
        code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed (exit {code}); log: {log}")
    return round(seconds, 2)


def run(args: argparse.Namespace, console: "Console", command: str) -> int:
    out: Path = args.out / "warm-engine"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    env = {**os.environ, "PRIVREC_HOME": str(out / "home"), "PRIVREC_LAKE": str(out / "lake"),
           "PRIVREC_KEY_FILE": str(out / "keys.json"), "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable}
    for var in ("PRIVREC_SPARK_REMOTE", "SPARK_CONNECT_AUTHENTICATE_TOKEN", "PRIVREC_LEDGER_URL"):
        env.pop(var, None)
    privrec = str(Path(sys.executable).parent / "privrec")
    log = out / "bench.log"
    days = [FIRST_DAY + dt.timedelta(days=i) for i in range(4)]
    steps: dict[str, float] = {}
    worktree = out / "baseline-code"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=True)  # a removed worktree's record
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.engine_baseline_ref],
                   check=True, capture_output=True)
    try:
        _timed([privrec, "keys", "init"], env, log)
        for day in days:
            _timed([privrec, "generate", "--date", day.isoformat(), "--events", str(args.engine_events),
                    "--users", str(max(10, args.engine_events // 5)), "--items", "100"], env, log)
        me = str(ROOT / "benchmarks" / "ingest.py")
        from privrec_pipeline.spark.standalone import spark_class

        submit = str(spark_class().parent / "spark-submit")
        console.print("cold_start: spark-submit noop ...")
        steps["cold_start"] = _timed([submit, *submit_args(""), me, "noop"], env, log)
        run_day = [privrec, "run", "-p", "train_window_days=1", "--date"]
        console.print(f"baseline_day: privrec run {days[0]} at {args.engine_baseline_ref} (a spark-submit per step) ...")
        steps["baseline_day"] = _timed([*run_day, days[0].isoformat()], {**env, "PYTHONPATH": str(worktree)}, log)
        console.print(f"first_day: privrec run {days[1]} (starts and stops the engine) ...")
        steps["first_day"] = _timed([*run_day, days[1].isoformat()], env, log)
        console.print("engine_start: privrec engine start ...")
        steps["engine_start"] = _timed([privrec, "engine", "start"], env, log)
        for n, day in enumerate(days[2:], 1):
            console.print(f"warm_day_{n}: privrec run {day} on the engine ...")
            steps[f"warm_day_{n}"] = _timed([*run_day, day.isoformat()], env, log)
        console.print(f"warm_rerun: privrec run {days[-1]} again ...")
        steps["warm_rerun"] = _timed([*run_day, days[-1].isoformat()], env, log)
    finally:
        subprocess.run([privrec, "engine", "stop"], env=env, capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    cold = steps["cold_start"]
    result: dict[str, Any] = {
        "benchmark": NAME, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command,
        "events": args.engine_events, "machine": machine(), "baseline_ref": args.engine_baseline_ref, "steps": steps,
        "summary": {
            "baseline_day_over_cold_start": round(steps["baseline_day"] / cold, 2),
            "first_day_over_cold_start": round(steps["first_day"] / cold, 2),
            "warm_day_over_cold_start": round(steps["warm_day_2"] / cold, 2),
            "warm_rerun_over_warm_day": round(steps["warm_rerun"] / steps["warm_day_2"], 2),
            "baseline_day_over_warm_day": round(steps["baseline_day"] / steps["warm_day_2"], 2),
        },
    }
    result["summary"]["meets_day_target"] = result["summary"]["warm_day_over_cold_start"] <= TARGET_DAY_OVER_COLD_START
    result["summary"]["meets_rerun_target"] = steps["warm_rerun"] < steps["warm_day_2"]
    json_path = args.out / "bench-warm-engine.json"
    result["json"] = shown_path(json_path)
    write_result(result, json_path, markdown(result), SECTION, console, args.no_markdown)
    return 0


def markdown(result: dict[str, Any]) -> str:
    s, steps = result["summary"], result["steps"]
    verdict = {True: "met", False: "NOT met"}
    rows = [("cold_start (spark-submit that only starts and stops)", steps["cold_start"], ""),
            (f"baseline_day (privrec run at {result['baseline_ref']}, {result['events']:,} events, spark-submit per "
             "step)", steps["baseline_day"], f"{s['baseline_day_over_cold_start']:.1f}x cold_start"),
            ("first_day (privrec run with no engine: starts it, stops it)", steps["first_day"],
             f"{s['first_day_over_cold_start']:.1f}x cold_start"),
            ("engine_start (privrec engine start, once)", steps["engine_start"], ""),
            ("warm_day_1 (the next day on the fresh engine)", steps["warm_day_1"], ""),
            ("warm_day_2 (the next day: a backfill's steady state)", steps["warm_day_2"],
             f"{s['warm_day_over_cold_start']:.1f}x cold_start"),
            ("warm_rerun (the same day again, releases reused)", steps["warm_rerun"],
             f"{s['warm_rerun_over_warm_day']:.2f}x warm_day_2")]
    return "\n".join([
        SECTION[0],
        "## Warm engine: a small day through the whole DAG, its fixed cost",
        "",
        *run_lines(result),
        "- Each run: `privrec run --date D -p train_window_days=1` on the embedded default (SQLite Airflow, "
        "`airflow dags test`), a generated day; the engine: local[*], 4g",
        "",
        "| step | wall s | ratio |",
        "|---|---:|---:|",
        *[f"| {name} | {seconds:.1f} | {ratio} |" for name, seconds, ratio in rows],
        "",
        (f"**warm_day_2 / cold_start = {s['warm_day_over_cold_start']:.1f}x (target <= {TARGET_DAY_OVER_COLD_START}: "
         f"{verdict[s['meets_day_target']]}); baseline_day / warm_day_2 = {s['baseline_day_over_warm_day']:.2f}x; "
         f"warm_rerun / warm_day_2 = {s['warm_rerun_over_warm_day']:.2f} (target < 1: "
         f"{verdict[s['meets_rerun_target']]})**"),
        "",
        f"Raw numbers: `{result['json']}`.",
        SECTION[1],
    ])
