"""Scaling benchmark: one day of growing size from landing to published model, per stage.

For each size of ``--scaling-events`` (default 0.2M, 1M, 5M, 10M events) a day is generated
into a lake of its own (not timed), then ``privrec run --date D -p train_window_days=1`` runs
the whole nightly DAG on the warm engine (``privrec engine start --driver-memory 4g``,
started once before the first size, as a deployment runs it). Reported per size: seconds per
stage (from the DAG's task start and end lines), events/s of the whole day, the peak memory
of the engine (its process tree: the JVM and its Python workers) and of the run (Airflow, the
job clients, the training tasks), and whether the model was published.

The growth is fitted as seconds = c * events^k over the sizes (least squares on the logs):
cost grows at most linearly when k <= 1. Fixed costs (Airflow, client start) make k < 1 at
small sizes; the exponent between the two largest sizes shows the growth that remains.
Moonshot: a 10M-event day from landing to published model in < 15 minutes on 2 cores with a
4 GB driver.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.ingest import (
    machine,
    run_lines,
    shown_path,
    source_digest,
    source_hashes,
    write_result,
)

if TYPE_CHECKING:
    from rich.console import Console

NAME = "scaling"
SECTION = ("<!-- bench:scaling:start -->", "<!-- bench:scaling:end -->")
DAY = dt.date(2026, 1, 15)
MOONSHOT_EVENTS, MOONSHOT_SECONDS = 10_000_000, 15 * 60
STAGES = ("erasure", "retention", "collect", "pseudonymize", "validate", "dp_stats", "build_partitions", "training",
          "evaluate_and_publish")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--scaling-events", default="200000,1000000,5000000,10000000",
                       help="comma-separated day sizes in events (default: 0.2M, 1M, 5M, 10M)")
    group.add_argument("--scaling-users-per-event", type=float, default=0.05,
                       help="users per event of each generated day (default: 0.05, 500,000 users at 10M)")


def _stage(task_id: str) -> str:
    if task_id in STAGES:
        return task_id
    if task_id.startswith(("prepare_training", "publish_keys", "seal_keys", "train_round", "aggregate_round",
                           "training_due")):
        return "training"
    return "other"


def task_seconds(log_text: str) -> dict[str, float]:
    """Seconds per stage from an ``airflow dags test`` log (each task's start and end line)."""
    started: dict[str, dt.datetime] = {}
    stages: dict[str, float] = {}
    for line in log_text.splitlines():
        found = re.match(r"^(\S+Z) .*\[DAG TEST\] (starting|end task) task_id=(\S+)", line)
        if not found:
            continue
        at = dt.datetime.fromisoformat(found.group(1).replace("Z", "+00:00"))
        if found.group(2) == "starting":
            started[found.group(3)] = at
        elif found.group(3) in started:
            stage = _stage(found.group(3))
            stages[stage] = stages.get(stage, 0.0) + (at - started.pop(found.group(3))).total_seconds()
    return {k: round(v, 1) for k, v in stages.items()}


class PeakRss:
    """The largest RSS sum of the process trees under each root pid, sampled every 0.5 s."""

    def __init__(self) -> None:
        self.roots: dict[str, int] = {}
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            for name, pid in list(self.roots.items()):
                try:
                    root = psutil.Process(pid)
                    total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0.0), total / 2**20)


def fitted_exponent(points: list[tuple[float, float]]) -> float | None:
    """k of seconds = c * events^k, least squares on (log events, log seconds)."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(e) for e, _ in points], [math.log(s) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den, 3) if den else None


def _run(command: list[str], env: dict[str, str], log: Path, peak: PeakRss | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=out)
        if peak is not None:
            peak.roots["run"] = process.pid
        output = process.communicate()[0].decode(errors="replace")
        out.write(output.encode())
    if peak is not None:
        peak.roots.pop("run", None)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed (exit {process.returncode}); log: {log}")
    return round(time.perf_counter() - start, 2), output


def run(args: argparse.Namespace, console: Console, command: str) -> int:
    from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

    sizes = [int(x) for x in str(args.scaling_events).split(",") if x.strip()]
    out: Path = args.out / "scaling"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    privrec = str(Path(sys.executable).parent / "privrec")
    env = {k: v for k, v in os.environ.items() if k not in ("PRIVREC_SPARK_REMOTE", "SPARK_CONNECT_AUTHENTICATE_TOKEN",
                                                            "PRIVREC_LEDGER_URL", "PRIVREC_DATA_KEYS_URL")}
    env.update({"PRIVREC_HOME": str(out / "home"), "PRIVREC_KEY_FILE": str(out / "keys.json"),
                "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable})
    log = out / "bench.log"
    hashes = source_hashes()
    rows: list[dict[str, Any]] = []
    with PeakRss() as peak:
        try:
            _run([privrec, "keys", "init"], env, log)
            _run([privrec, "engine", "start", "--driver-memory", "4g"], env, log)
            peak.roots["engine"] = json.loads((out / "home" / "engine" / "server.json").read_text())["pid"]
            for events in sizes:
                lake = out / f"lake-{events}"
                users = max(100, int(events * args.scaling_users_per_event))
                console.print(f"scaling: generating {events:,} events, {users:,} users ...")
                start = time.perf_counter()
                generate_day(GeneratorConfig(date=DAY, events=events, users=users, items=1000, bad_rate=0.002),
                             str(lake))
                generated = round(time.perf_counter() - start, 1)
                console.print(f"scaling: privrec run of {events:,} events on the warm engine ...")
                peak.peaks.pop("run", None)
                engine_before = peak.peaks.get("engine", 0.0)
                seconds, output = _run([privrec, "run", "--date", DAY.isoformat(), "-p", "train_window_days=1",
                                        "-p", "train_epsilon=4"], {**env, "PRIVREC_LAKE": str(lake)}, log, peak)
                day_log = out / "home" / "runs" / f"privrec_nightly-{DAY}.log"
                stages = task_seconds(day_log.read_text(errors="replace"))
                (out / f"dags-test-{events}.log").write_bytes(day_log.read_bytes())
                rows.append({"events": events, "users": users, "generate_s": generated, "run_s": seconds,
                             "events_per_s": round(events / seconds), "stages": stages,
                             "engine_peak_mib": round(max(peak.peaks.get("engine", 0.0), engine_before)),
                             "run_peak_mib": round(peak.peaks.get("run", 0.0)),
                             "published": "published model" in output and "not published" not in output})
                console.print(f"  {seconds:.1f} s, {rows[-1]['events_per_s']:,} events/s, stages {stages}")
        finally:
            subprocess.run([privrec, "engine", "stop"], env=env, capture_output=True)
    changed = sorted(f for f, h in source_hashes().items() if hashes.get(f) != h)
    result: dict[str, Any] = {
        "benchmark": NAME, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command,
        "machine": machine(), "code": source_digest(hashes), "source_changed": changed, "sizes": rows,
        "exponent": fitted_exponent([(r["events"], r["run_s"]) for r in rows]),
        "exponent_largest_two": fitted_exponent([(r["events"], r["run_s"]) for r in rows[-2:]]),
        "stage_exponents": {stage: fitted_exponent([(r["events"], r["stages"][stage]) for r in rows
                                                    if r["stages"].get(stage)])
                            for stage in ("collect", "pseudonymize", "validate", "dp_stats", "build_partitions",
                                          "training")},
    }
    moon = next((r for r in rows if r["events"] == MOONSHOT_EVENTS), None)
    result["moonshot"] = None if moon is None else {
        "seconds": moon["run_s"], "published": moon["published"],
        "met": moon["run_s"] < MOONSHOT_SECONDS and moon["published"]}
    json_path = args.out / "bench-scaling.json"
    result["json"] = shown_path(json_path)
    write_result(result, json_path, markdown(result), SECTION, console, args.no_markdown)
    return 0


def markdown(result: dict[str, Any]) -> str:
    rows = result["sizes"]
    shown = ("collect", "pseudonymize", "validate", "dp_stats", "build_partitions", "training",
             "evaluate_and_publish")
    lines = [
        SECTION[0],
        "## Scaling: one day from landing to published model, by size",
        "",
        *run_lines(result),
        "- Each size: a generated day (1,000 items, 0.2% bad lines) in a lake of its own, then "
        "`privrec run --date D -p train_window_days=1 -p train_epsilon=4` on the warm engine "
        "(`privrec engine start --driver-memory 4g`, local[2], started once before the first size)",
        "",
        "| events | users | day s | events/s | " + " | ".join(shown) + " | engine peak MiB | run peak MiB | published |",
        "|---:|---:|---:|---:|" + "---:|" * len(shown) + "---:|---:|---|",
        *[f"| {r['events']:,} | {r['users']:,} | {r['run_s']:.1f} | {r['events_per_s']:,} | "
          + " | ".join(f"{r['stages'].get(s, 0):.1f}" for s in shown)
          + f" | {r['engine_peak_mib']:,} | {r['run_peak_mib']:,} | {'yes' if r['published'] else 'no'} |"
          for r in rows],
        "",
        (f"**Fitted exponent of the day's seconds over events: {result['exponent']} over all sizes, "
         f"{result['exponent_largest_two']} between the two largest (<= 1: at most linear).** Per stage: "
         + ", ".join(f"{k} {v}" for k, v in result["stage_exponents"].items()) + "."),
    ]
    if result["moonshot"] is not None:
        moon = result["moonshot"]
        lines += ["", (f"Moonshot (10M events, landing to published model, < 15 min): {moon['seconds'] / 60:.1f} min, "
                       f"{'published' if moon['published'] else 'not published'}: "
                       f"{'met' if moon['met'] else 'NOT met'}.")]
    lines += ["", f"Raw numbers: `{result['json']}`; the DAG logs in `bench-out/scaling/`.", SECTION[1]]
    return "\n".join(lines)
