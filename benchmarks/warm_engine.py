"""Warm engine benchmark: a small day through the whole nightly DAG, cold and on the warm engine.

Measured in one run, on the embedded default (``privrec run``, ``airflow dags test``):

- ``cold_start``: one ``spark-submit`` of an application that only starts and stops (the
  ingest benchmark's ``noop``): the unit of the fixed cost;
- ``cold_day``: ``privrec run`` of a generated day of ``--engine-events`` events, every Spark
  step its own ``spark-submit`` (no engine);
- ``engine_start``: ``privrec engine start`` (once per deployment, not per day);
- ``warm_day``: ``privrec run`` of the next day (same size) on the engine;
- ``warm_rerun``: ``privrec run`` of that day again (every release reused).

Targets (issue 20): warm_day <= 4 x cold_start; warm_rerun < warm_day.
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

from benchmarks.ingest import ROOT, machine, shown_path, submit_args, write_result

if TYPE_CHECKING:
    from rich.console import Console

NAME = "warm_engine"
SECTION = ("<!-- bench:warm_engine:start -->", "<!-- bench:warm_engine:end -->")
TARGET_DAY_OVER_COLD_START = 4.0
FIRST_DAY = dt.date(2026, 1, 15)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--engine-events", type=int, default=1000,
                       help="events of each generated day (default: 1,000)")


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
    days = [FIRST_DAY, FIRST_DAY + dt.timedelta(days=1)]
    steps: dict[str, float] = {}
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
        console.print(f"cold_day: privrec run {days[0]} (a spark-submit per step) ...")
        steps["cold_day"] = _timed([*run_day, days[0].isoformat()], env, log)
        console.print("engine_start: privrec engine start ...")
        steps["engine_start"] = _timed([privrec, "engine", "start"], env, log)
        console.print(f"warm_day: privrec run {days[1]} on the engine ...")
        steps["warm_day"] = _timed([*run_day, days[1].isoformat()], env, log)
        console.print(f"warm_rerun: privrec run {days[1]} again ...")
        steps["warm_rerun"] = _timed([*run_day, days[1].isoformat()], env, log)
    finally:
        subprocess.run([privrec, "engine", "stop"], env=env, capture_output=True)
    cold = steps["cold_start"]
    result: dict[str, Any] = {
        "benchmark": NAME, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command,
        "events": args.engine_events, "machine": machine(), "steps": steps,
        "summary": {
            "cold_day_over_cold_start": round(steps["cold_day"] / cold, 2),
            "warm_day_over_cold_start": round(steps["warm_day"] / cold, 2),
            "warm_rerun_over_warm_day": round(steps["warm_rerun"] / steps["warm_day"], 2),
            "cold_day_over_warm_day": round(steps["cold_day"] / steps["warm_day"], 2),
        },
    }
    result["summary"]["meets_day_target"] = result["summary"]["warm_day_over_cold_start"] <= TARGET_DAY_OVER_COLD_START
    result["summary"]["meets_rerun_target"] = steps["warm_rerun"] < steps["warm_day"]
    json_path = args.out / "bench-warm-engine.json"
    result["json"] = shown_path(json_path)
    write_result(result, json_path, markdown(result), SECTION, console, args.no_markdown)
    return 0


def markdown(result: dict[str, Any]) -> str:
    s, steps, m = result["summary"], result["steps"], result["machine"]
    verdict = {True: "met", False: "NOT met"}
    rows = [("cold_start (spark-submit that only starts and stops)", steps["cold_start"], ""),
            (f"cold_day (privrec run, {result['events']:,} events, spark-submit per step)", steps["cold_day"],
             f"{s['cold_day_over_cold_start']:.1f}x cold_start"),
            ("engine_start (privrec engine start, once)", steps["engine_start"], ""),
            ("warm_day (privrec run of the next day on the engine)", steps["warm_day"],
             f"{s['warm_day_over_cold_start']:.1f}x cold_start"),
            ("warm_rerun (the same day again, releases reused)", steps["warm_rerun"],
             f"{s['warm_rerun_over_warm_day']:.2f}x warm_day")]
    return "\n".join([
        SECTION[0],
        "## Warm engine: a small day through the whole DAG, cold and on the Spark Connect server",
        "",
        f"- Date: {result['date']}",
        (f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM; load average at start "
         f"{m['load_avg_start']}; Spark {m['spark']}, Java {m['java']}"),
        f"- Command: `{result['command']}`",
        "- Each run: `privrec run --date D -p train_window_days=1` on the embedded default (SQLite Airflow, "
        "`airflow dags test`), a generated day; the engine: `privrec engine start` (local[2], 4g)",
        "",
        "| step | wall s | ratio |",
        "|---|---:|---:|",
        *[f"| {name} | {seconds:.1f} | {ratio} |" for name, seconds, ratio in rows],
        "",
        (f"**warm_day / cold_start = {s['warm_day_over_cold_start']:.1f}x (target <= {TARGET_DAY_OVER_COLD_START}: "
         f"{verdict[s['meets_day_target']]}); cold_day / warm_day = {s['cold_day_over_warm_day']:.2f}x; "
         f"warm_rerun / warm_day = {s['warm_rerun_over_warm_day']:.2f} (target < 1: "
         f"{verdict[s['meets_rerun_target']]})**"),
        "",
        f"Raw numbers: `{result['json']}`.",
        SECTION[1],
    ])
