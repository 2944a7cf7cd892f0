"""Backfill benchmark: days per hour of a backfill through the Airflow REST API, side by side.

A backfill is how a shop loads its history. Measured in one run, on ``privrec airflow``
(``airflow standalone``: API server, scheduler, DAG processor, LocalExecutor) with its
metadata on PostgreSQL, each side on a copy of the same generated lake:

- ``baseline``: the code of ``--backfill-baseline-ref`` (default: the last commit whose Spark
  steps were each a ``spark-submit`` of their own), checked out in a git worktree and run
  with this venv (``PYTHONPATH`` puts the worktree first);
- ``engine``: this checkout, every Spark step a client of the warm engine.

Each side: ``POST /api/v2/backfills`` of ``--backfill-days`` demo-size days (200,000 events,
50,000 users, 1,000 items each; one run at a time), timed from the request to the backfill's
``completed_at``; every run must succeed. Target (issue 20): engine days/hour >= 3x baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.ingest import (
    ROOT,
    machine,
    run_lines,
    shown_path,
    source_digest,
    source_hashes,
    write_result,
)

if TYPE_CHECKING:
    from rich.console import Console

NAME = "backfill"
SECTION = ("<!-- bench:backfill:start -->", "<!-- bench:backfill:end -->")
BASELINE_REF = "4301ff5"  # the last commit with a spark-submit per Spark step
FIRST_DAY = dt.date(2026, 1, 5)
DAG = "privrec_nightly"
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"
CONF = {"train_window_days": 1, "train_epsilon": 4}
TARGET = 3.0


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--backfill-days", type=int, default=7, help="days of the backfill (default: 7)")
    group.add_argument("--backfill-events", type=int, default=200_000, help="events per day (default: 200,000)")
    group.add_argument("--backfill-baseline-ref", default=BASELINE_REF,
                       help=f"git commit of the baseline side (default: {BASELINE_REF})")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _database(name: str, drop_only: bool = False) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            if not drop_only:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()


class Airflow:
    """``privrec airflow`` of one side, reached through its REST API."""

    def __init__(self, env: dict[str, str], root: Path) -> None:
        import requests

        self.session = requests.Session()
        self.root = root
        password = secrets.token_urlsafe(16)
        (root / "passwords.json").write_text(json.dumps({"admin": password}))
        api, worker_logs, trigger_logs = _free_ports(3)
        self.base = f"http://127.0.0.1:{api}"
        self.env = {**env, "AIRFLOW__API__PORT": str(api), "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(worker_logs),
                    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(trigger_logs),
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "passwords.json")}
        self.log = root / "airflow.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([str(Path(sys.executable).parent / "privrec"), "airflow"], env=self.env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Airflow did not start (log {self.log})")
            try:
                reply = self.session.post(f"{self.base}/auth/token", json={"username": "admin", "password": password},
                                          timeout=10)
                if reply.ok:
                    self.session.headers["Authorization"] = f"Bearer {reply.json()['access_token']}"
                    if self.session.get(f"{self.base}/api/v2/dags/{DAG}", timeout=10).status_code == 200:
                        break
            except requests.ConnectionError:
                pass
            time.sleep(1)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        reply = self.session.request(method, f"{self.base}/api/v2{path}", timeout=60, **kwargs)
        if not reply.ok:
            raise RuntimeError(f"{method} {path}: {reply.status_code} {reply.text}")
        return reply.json()

    def backfill(self, first: dt.date, last: dt.date) -> tuple[float, list[dict[str, Any]]]:
        """Seconds from the request to the backfill's completion, and its runs."""
        self.api("PATCH", f"/dags/{DAG}", json={"is_paused": False})
        start = time.perf_counter()
        backfill = self.api("POST", "/backfills", json={
            "dag_id": DAG, "from_date": f"{first}T00:00:00Z", "to_date": f"{last}T23:59:00Z",
            "reprocess_behavior": "none", "max_active_runs": 1, "dag_run_conf": CONF})
        while self.api("GET", f"/backfills/{backfill['id']}")["completed_at"] is None:
            time.sleep(2)
        seconds = time.perf_counter() - start
        runs = self.api("GET", f"/dags/{DAG}/dagRuns", params={"limit": 100, "order_by": "logical_date"})["dag_runs"]
        return seconds, [r for r in runs if r["run_type"] == "backfill"]

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 90), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.process.pid, 0)
                except ProcessLookupError:
                    return
                self.process.poll()
                time.sleep(0.5)


def _side(name: str, code: Path | None, lake: Path, out: Path, days: list[dt.date], key_file: Path,
          console: Console) -> dict[str, Any]:
    root = out / name
    root.mkdir()
    shutil.copytree(lake, root / "lake")
    database = f"privrec_bench_backfill_{name}_{os.getpid()}"
    _database(database)
    url = f"{PG}/{database}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PRIVREC", "SPARK_CONNECT"))}
    env.update({"PRIVREC_HOME": str(root / "home"), "PRIVREC_LAKE": str(root / "lake"), "PRIVREC_KEY_FILE": str(key_file),
                "PRIVREC_LEDGER_URL": url, "PRIVREC_BUDGET_EPSILON": "1000", "PRIVREC_TASK_RETRIES": "0",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url, "PYSPARK_PYTHON": sys.executable,
                "PYSPARK_DRIVER_PYTHON": sys.executable})
    if code is not None:
        env["PYTHONPATH"] = str(code)
    airflow = None
    try:
        console.print(f"backfill: {name}: starting privrec airflow ...")
        airflow = Airflow(env, root)
        console.print(f"backfill: {name}: {len(days)} days through POST /api/v2/backfills ...")
        seconds, runs = airflow.backfill(days[0], days[-1])
    finally:
        if airflow is not None:
            airflow.stop()
        _database(database, drop_only=True)
    states = {r["logical_date"][:10]: r["state"] for r in runs}
    if sorted(states) != [d.isoformat() for d in days] or set(states.values()) != {"success"}:
        raise RuntimeError(f"the {name} backfill did not succeed for every day: {states} (logs in {root})")
    console.print(f"  {seconds:.0f} s, {len(days) / (seconds / 3600):.1f} days/hour")
    return {"seconds": round(seconds, 1), "days_per_hour": round(len(days) / (seconds / 3600), 2), "runs": states}


def run(args: argparse.Namespace, console: Console, command: str) -> int:
    from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

    out: Path = args.out / "backfill"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    days = [FIRST_DAY + dt.timedelta(days=i) for i in range(args.backfill_days)]
    key_file = out / "keys.json"
    subprocess.run([str(Path(sys.executable).parent / "privrec"), "keys", "init"], check=True, capture_output=True,
                   env={**os.environ, "PRIVREC_KEY_FILE": str(key_file)})
    lake = out / "lake"
    console.print(f"backfill: generating {len(days)} days of {args.backfill_events:,} events ...")
    for n, day in enumerate(days):
        generate_day(GeneratorConfig(date=day, events=args.backfill_events, users=args.backfill_events // 4, items=1000,
                                     bad_rate=0.002, seed=100 + n), str(lake))
    worktree = out / "baseline-code"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=True)  # a removed worktree's record
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.backfill_baseline_ref],
                   check=True, capture_output=True)
    baseline_commit = subprocess.run(["git", "-C", str(worktree), "rev-parse", "--short", "HEAD"], check=True,
                                     capture_output=True, text=True).stdout.strip()
    hashes = source_hashes()
    try:
        sides = {"baseline": _side("baseline", worktree, lake, out, days, key_file, console),
                 "engine": _side("engine", None, lake, out, days, key_file, console)}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    changed = sorted(f for f, h in source_hashes().items() if hashes.get(f) != h)
    ratio = round(sides["engine"]["days_per_hour"] / sides["baseline"]["days_per_hour"], 2)
    result: dict[str, Any] = {
        "benchmark": NAME, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command,
        "machine": machine(), "code": source_digest(hashes), "source_changed": changed,
        "baseline_commit": baseline_commit, "days": len(days), "events_per_day": args.backfill_events,
        "sides": sides, "speedup": ratio, "meets_target": ratio >= TARGET,
    }
    json_path = args.out / "bench-backfill.json"
    result["json"] = shown_path(json_path)
    write_result(result, json_path, markdown(result), SECTION, console, args.no_markdown)
    return 0


def markdown(result: dict[str, Any]) -> str:
    sides = result["sides"]
    return "\n".join([
        SECTION[0],
        "## Backfill: days per hour through the Airflow REST API, spark-submit per step against the warm engine",
        "",
        *run_lines(result),
        (f"- Each side: `privrec airflow` (airflow standalone, LocalExecutor, metadata and ledger on PostgreSQL), "
         f"`POST /api/v2/backfills` of {result['days']} days of {result['events_per_day']:,} events "
         f"(conf {json.dumps(CONF)}, one run at a time), timed to the backfill's completion; every run succeeded"),
        f"- baseline: commit `{result['baseline_commit']}` (a spark-submit per Spark step), from a git worktree",
        "",
        "| side | seconds | days/hour |",
        "|---|---:|---:|",
        *[f"| {name} | {side['seconds']:.0f} | {side['days_per_hour']:.1f} |" for name, side in sides.items()],
        "",
        (f"**engine / baseline = {result['speedup']:.2f}x days/hour (target >= {TARGET}x: "
         f"{'met' if result['meets_target'] else 'NOT met'})**"),
        "",
        f"Raw numbers: `{result['json']}`.",
        SECTION[1],
    ])
