"""Ingest benchmark: collect + pseudonymize against a bare Spark JSON -> Parquet copy.

One run on one generated landing day (``privrec generate`` equivalent, timed for
information). Every Spark step is a separate ``spark-submit --master local[2]
--driver-memory 4g`` process (UI off, as in the DAG) with its own cold JVM, as the nightly
DAG runs them:

- ``cold_start``: an application that only creates the SparkSession and stops (JVM start);
- ``bare_copy``: ``spark.read.json(landing).write.mode("overwrite").parquet(...)``;
- ``collect`` / ``pseudonymize`` / ``validate``: the jobs of the same names in ``jobs/``;
- ``collect_single_key`` / ``collect_single_key_2``: ``jobs/collect.py --data-keys none``, the
  same collect with every ciphertext under the encryption key alone: the baseline of the
  per-user data keys (crypto-shredding). The four collects run in the order single key,
  ``collect``, ``collect_keys_exist``, single key (A B B A, so a drift of the machine's speed
  during the run cancels out), and each per-user collect is compared with the mean of the two
  baselines. ``collect`` meets every user for the first time (a fresh ledger database) and
  creates and stores all their keys, the costliest day; ``collect_keys_exist`` reruns the day
  with every key stored, as a day of returning users.

Wall time is the whole spark-submit. Peak memory is the highest sum of RSS over the
process tree (spark-submit, JVM, Python driver and workers), sampled every 0.2 s; pages
shared between processes count once per process, so it is an upper bound (children are
counted from their second sample on, so shell-outs that live for a moment are not). Targets:
(collect + pseudonymize) <= 2.0 x bare copy; validate <= 30% of (collect + pseudonymize);
collect <= 1.15 x the single-key collect.

This file is also the Spark application of the two reference steps:
``spark-submit benchmarks/ingest.py noop`` and ``spark-submit benchmarks/ingest.py copy SRC DST``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privrec_pipeline.spark.session import JOB_JVM_OPTIONS, launch_conf

if TYPE_CHECKING:
    from rich.console import Console

NAME = "ingest"
ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
DEFAULT_DATE = dt.date(2026, 1, 15)
TARGET_RATIO = 3.0  # cold: each step its own spark-submit (issue 20's decision; 2.0 was retired)
TARGET_WARM_RATIO = 2.5  # both sides clients of one warm engine
TARGET_VALIDATE_SHARE = 0.30  # validate adds at most 30% to ingest time (issue 3)
TARGET_DATA_KEYS = 1.15  # per-user data keys make collect at most 15% slower than one key
# The DAG's settings (dags/privrec_nightly.py) on a 2-core local master.
SUBMIT_ARGS = ("--master", "local[2]", "--driver-memory", "4g", "--conf", "spark.ui.enabled=false")
SAMPLE_SECONDS = 0.2
SECTION_START, SECTION_END = "<!-- bench:ingest:start -->", "<!-- bench:ingest:end -->"
_NOTABLE = re.compile(r"\b(WARN|ERROR|FATAL)\b|OutOfMemory|GC overhead|[Ss]pill|Killed|Traceback")
_LOG_TIME = re.compile(r"^\d{2}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}\s+")
_HEX = re.compile(r"[0-9a-fA-F]{32,}")  # never copy anything key-like out of a log
MIB = 2**20


def submit_args(step: str) -> list[str]:
    """spark-submit options of a step: the DAG's, with the JVM options of the job of that name."""
    return [*SUBMIT_ARGS, *[arg for key, value in launch_conf(step).items() for arg in ("--conf", f"{key}={value}")]]


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--events", type=int, default=2_000_000,
                       help="landing records to generate (default: 2,000,000)")
    group.add_argument("--users", type=int, default=None,
                       help="distinct users of the generated day (default: the generator's, 5,000)")
    group.add_argument("--bad-rate", type=float, default=0.001,
                       help="share of malformed records and duplicates (default: 0.001)")
    group.add_argument("--date", type=dt.date.fromisoformat, default=DEFAULT_DATE,
                       help=f"landing day to generate and process (default: {DEFAULT_DATE})")
    group.add_argument("--floor", action="store_true",
                       help="also run the least work collect + pseudonymize could do (explicit-schema "
                            "parse, one aes_encrypt per row, write; HMAC, write): a lower bound")
    group.add_argument("--event-log", action="store_true",
                       help="write Spark event logs and report time per Spark SQL query "
                            "(diagnostics; not production settings)")


@dataclass
class Step:
    """One measured spark-submit."""

    name: str
    command: list[str]
    wall_s: float
    returncode: int
    peak_rss_mib: float  # sum over the process tree
    peak_process_mib: float  # largest single process (normally the JVM)
    peak_parts: list[str]  # the processes summed at the peak, "name MiB"
    log: str
    output: dict[str, Any] = field(default_factory=dict)  # the step's JSON line on stdout
    notable: dict[str, int] = field(default_factory=dict)  # distinct WARN/ERROR lines, counts
    queries: list[dict[str, Any]] = field(default_factory=list)  # per SQL query (--event-log)
    source_sha256: str = ""  # privrec_pipeline/ + jobs/ when the step started
    source_changed: list[str] = field(default_factory=list)  # files edited while it ran


def _tree_rss(root: Any, seen: set[tuple[int, float]]) -> tuple[int, list[tuple[str, int]]]:
    """RSS sum in bytes over ``root`` (a psutil.Process) and its descendants, and the parts.

    A child counts only from its second sample on: short-lived shell-outs (Hadoop's local
    file system forks for permissions) briefly show the JVM's whole RSS before ``exec``
    and would double the peak. ``seen`` holds (pid, start time) of the children sampled so far.
    """
    import psutil

    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, []
    parts, current = [], set()
    for proc in procs:
        try:
            key, rss, name = (proc.pid, proc.create_time()), proc.memory_info().rss, proc.name()
        except psutil.Error:
            continue
        current.add(key)
        if proc is root or key in seen:
            parts.append((name, rss))
    seen |= current
    return sum(rss for _, rss in parts), parts


def _notable_lines(log: Path, limit: int = 20) -> dict[str, int]:
    """Distinct warning/error lines of a Spark log (timestamps dropped, hex masked)."""
    seen: dict[str, int] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if _NOTABLE.search(line):
            key = _HEX.sub("<hex>", _LOG_TIME.sub("", line.strip()))[:240]
            if key in seen or len(seen) < limit:
                seen[key] = seen.get(key, 0) + 1
    return seen


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _event_log_queries(folder: Path) -> list[dict[str, Any]]:
    """Per SQL query (in order) of the Spark event log in ``folder``: wall seconds, summed task
    seconds, GC, spill and shuffle; stages outside any query are grouped as ``(no query)``."""
    queries: dict[str, dict[str, Any]] = {}
    stage_query: dict[int, str] = {}

    def query(qid: str, description: str = "(no query)") -> dict[str, Any]:
        return queries.setdefault(qid, {
            "query": qid, "description": description, "seconds": 0.0, "stages": 0, "tasks": 0,
            "task_seconds": 0.0, "gc_seconds": 0.0, "spilled_mib": 0.0, "shuffle_write_mib": 0.0,
            "failed_stages": 0})

    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith((".", "appstatus"))]
    for path in sorted(files):  # Spark 4 writes rolling logs: eventlog_v2_<app>/events_<n>_<app>
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                head = line[:120]
                if "SQLExecutionStart" in head or "SQLExecutionEnd" in head:
                    event = json.loads(line)
                    q = query(str(event["executionId"]), event.get("description", ""))
                    q["seconds"] += event["time"] / 1000 * (1 if "End" in head else -1)
                elif '"SparkListenerStageSubmitted"' in head:
                    event = json.loads(line)
                    stage_query[event["Stage Info"]["Stage ID"]] = (
                        (event.get("Properties") or {}).get("spark.sql.execution.id", "-"))
                elif '"SparkListenerStageCompleted"' in head:
                    info = json.loads(line)["Stage Info"]
                    acc = {a.get("Name"): a.get("Value") for a in info.get("Accumulables", [])}
                    q = query(stage_query.get(info["Stage ID"], "-"))
                    q["stages"] += 1
                    q["tasks"] += info["Number of Tasks"]
                    q["failed_stages"] += "Failure Reason" in info
                    for key, metric, scale in (
                        ("task_seconds", "executorRunTime", 1000), ("gc_seconds", "jvmGCTime", 1000),
                        ("spilled_mib", "diskBytesSpilled", MIB),
                        ("shuffle_write_mib", "shuffle.write.bytesWritten", MIB)):
                        q[key] += float(acc.get(f"internal.metrics.{metric}", 0) or 0) / scale
    rows = list(queries.values())
    for q in rows:
        for key in ("seconds", "task_seconds", "gc_seconds", "spilled_mib", "shuffle_write_mib"):
            q[key] = round(q[key], 1)
    return rows


def run_step(name: str, app: list[str], env: dict[str, str], out: Path, event_log: bool,
             client: bool = False) -> Step:
    """spark-submit ``app`` once (``client``: run it as a Python client of the warm engine that
    ``env`` names); wall time, peak RSS of the process tree, log summary."""
    import psutil

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    submit = shutil.which("spark-submit", path=env["PATH"]) or "spark-submit"
    command = [sys.executable] if client else [submit, *submit_args(name)]
    events_dir = out / "spark-events" / name
    if event_log and not client:
        shutil.rmtree(events_dir, ignore_errors=True)
        events_dir.mkdir(parents=True)
        command += ["--conf", "spark.eventLog.enabled=true", "--conf", "spark.eventLog.compress=false",
                    "--conf", f"spark.eventLog.dir=file://{events_dir}"]
    command += app
    log, stdout = logs / f"{name}.log", logs / f"{name}.out"
    peak, peak_one, peak_parts, seen = 0, 0, [], set()
    with stdout.open("wb") as out_fh, log.open("wb") as err_fh:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out_fh, stderr=err_fh)
        tree = psutil.Process(proc.pid)
        while True:
            total, parts = _tree_rss(tree, seen)
            if total > peak:
                peak, peak_parts = total, [f"{name} {rss // MIB}" for name, rss in parts]
            peak_one = max([peak_one, *(rss for _, rss in parts)])
            try:
                returncode = proc.wait(timeout=SAMPLE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                continue
        wall = time.perf_counter() - start
    return Step(
        name=name, command=[Path(command[0]).name, *command[1:]], wall_s=round(wall, 2),
        returncode=returncode, peak_rss_mib=round(peak / MIB), peak_process_mib=round(peak_one / MIB),
        peak_parts=peak_parts,
        log=str(log), output=_last_json(stdout.read_text(encoding="utf-8", errors="replace")),
        notable=_notable_lines(log), queries=_event_log_queries(events_dir) if event_log else [],
    )


def spark_env(out: Path, lake: str) -> dict[str, str]:
    """The environment of the jobs: venv on PATH, venv Python for PySpark, a bench key file."""
    from privrec_pipeline.secrets import ENV_KEY_FILE, ENV_KEYS_JSON, init_key_file

    key_file, _ = init_key_file(out / "keys.json")  # mode 0600; keys are never printed
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != ENV_KEYS_JSON}  # the file must win
    env.update({
        "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
        ENV_KEY_FILE: str(key_file), "PRIVREC_LAKE": lake,
    })
    return env


def generate(args: argparse.Namespace, lake: str) -> dict[str, Any]:
    """Generate the landing day in-process (``privrec generate`` defaults otherwise)."""
    import resource

    from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

    cfg = GeneratorConfig(date=args.date, events=args.events, bad_rate=args.bad_rate,
                          **({"users": args.users} if args.users else {}))
    start = time.perf_counter()
    report = generate_day(cfg, lake)
    seconds = time.perf_counter() - start
    files = [Path(report.path) / name for name in report.files]
    return {
        "seconds": round(seconds, 2), "records": report.records, "users": cfg.users, "files": len(files),
        "bytes": sum(f.stat().st_size for f in files), "path": report.path,
        "bad_records": sum(report.bad_records.values()), "duplicates": report.duplicates,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def source_hashes() -> dict[str, str]:
    """SHA-256 per source file of privrec_pipeline/ and jobs/: which code a run measured."""
    import hashlib

    files = [*(ROOT / "privrec_pipeline").rglob("*.py"), *(ROOT / "jobs").glob("*.py")]
    return {str(f.relative_to(ROOT)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(files)}


def source_digest(hashes: dict[str, str]) -> str:
    """One short digest of ``source_hashes()``."""
    import hashlib

    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:12]


def _changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))


def machine() -> dict[str, Any]:
    import psutil

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    try:
        banner = subprocess.run(["java", "-version"], check=False, capture_output=True, text=True).stderr
    except OSError:
        banner = ""
    found = re.search(r'version "([^"]+)"', banner)
    java = found.group(1) if found else "?"
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        "spark": version("pyspark"), "java": java,
    }


def summarize(events: int, steps: dict[str, Step]) -> dict[str, Any]:
    """Throughput and the ratios against the bare copy (raw and without JVM start)."""
    cold, copy = steps["cold_start"].wall_s, steps["bare_copy"].wall_s
    collect, pseudo = steps["collect"].wall_s, steps["pseudonymize"].wall_s
    ingest = collect + pseudo
    single = (steps["collect_single_key"].wall_s + steps["collect_single_key_2"].wall_s) / 2
    warm_copy = copy - cold
    return {
        "ingest_s": round(ingest, 2),
        "events_per_s": round(events / ingest),
        "collect_events_per_s": round(events / collect),
        "pseudonymize_events_per_s": round(events / pseudo),
        "ratio": round(ingest / copy, 2),
        "ratio_without_cold_start": round((ingest - 2 * cold) / warm_copy, 2) if warm_copy > 0 else None,
        "target_ratio": TARGET_RATIO,
        "meets_target": ingest / copy <= TARGET_RATIO,
        "validate_s": round(steps["validate"].wall_s, 2),
        "validate_share": round(steps["validate"].wall_s / ingest, 3),
        "target_validate_share": TARGET_VALIDATE_SHARE,
        "meets_validate_target": steps["validate"].wall_s / ingest <= TARGET_VALIDATE_SHARE,
        "single_key_s": round(single, 2),
        "data_keys_ratio": round(collect / single, 3),
        "data_keys_ratio_keys_exist": round(steps["collect_keys_exist"].wall_s / single, 3),
        "data_keys_ratio_without_cold_start": round((collect - cold) / (single - cold), 3),
        "target_data_keys": TARGET_DATA_KEYS,
        "meets_data_keys_target": max(collect, steps["collect_keys_exist"].wall_s) / single <= TARGET_DATA_KEYS,
        **({"floor_ratio": round((steps["floor_collect"].wall_s + steps["floor_pseudonymize"].wall_s) / copy, 2)}
           if "floor_pseudonymize" in steps else {}),
        **(_warm_summary(steps) if "warm_bare_copy_2" in steps else {}),
    }


def _warm_summary(steps: dict[str, Step]) -> dict[str, Any]:
    """(collect + pseudonymize) / bare copy with both on the warm engine, means of the A B B A runs."""
    copy = (steps["warm_bare_copy"].wall_s + steps["warm_bare_copy_2"].wall_s) / 2
    ingest = (steps["warm_collect"].wall_s + steps["warm_pseudonymize"].wall_s + steps["warm_collect_2"].wall_s
              + steps["warm_pseudonymize_2"].wall_s) / 2
    return {"warm_ingest_s": round(ingest, 2), "warm_copy_s": round(copy, 2), "warm_ratio": round(ingest / copy, 2),
            "target_warm_ratio": TARGET_WARM_RATIO, "meets_warm_target": ingest / copy <= TARGET_WARM_RATIO}


def _rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows: step, wall s, wall minus cold start s, events/s, peak RSS tree / largest MiB."""
    steps, events = result["steps"], result["events"]
    cold = steps["cold_start"]["wall_s"]
    gen = result["generation"]
    rows = [("generate (in-process, info)", f"{gen['seconds']:.1f}", "", f"{events / gen['seconds']:,.0f}",
             f"{gen['peak_rss_mib']:,}")]
    for name, step in steps.items():
        warm = "" if name == "cold_start" or name.startswith("warm_") else f"{step['wall_s'] - cold:.1f}"
        rate = f"{events / step['wall_s']:,.0f}" if name != "cold_start" else ""
        rows.append((name, f"{step['wall_s']:.1f}", warm, rate,
                     f"{step['peak_rss_mib']:,} / {step['peak_process_mib']:,}"))
    s = result["summary"]
    rows.append(("collect + pseudonymize", f"{s['ingest_s']:.1f}",
                 f"{s['ingest_s'] - 2 * cold:.1f}", f"{s['events_per_s']:,}", ""))
    return rows


HEADERS = ("step", "wall s", "minus cold start s", "events/s", "peak RSS MiB (tree / largest)")


def _ratio_line(s: dict[str, Any]) -> str:
    verdict = {True: "met", False: "NOT met"}
    line = (f"cold: (collect + pseudonymize) / bare copy = {s['ratio']:.2f}x (target <= {TARGET_RATIO}: "
            f"{verdict[s['meets_target']]}); without the cold-start cost in each step: {s['ratio_without_cold_start']}x")
    if "warm_ratio" in s:
        line += (f". Warm engine: {s['warm_ingest_s']:.1f} s / {s['warm_copy_s']:.1f} s = {s['warm_ratio']:.2f}x "
                 f"(target <= {TARGET_WARM_RATIO}: {verdict[s['meets_warm_target']]})")
    return line


def _validate_line(s: dict[str, Any]) -> str:
    verdict = "met" if s["meets_validate_target"] else "NOT met"
    return (f"validate / (collect + pseudonymize) = {s['validate_share']:.0%} "
            f"(target <= {TARGET_VALIDATE_SHARE:.0%}: {verdict})")


def _data_keys_line(s: dict[str, Any]) -> str:
    verdict = "met" if s["meets_data_keys_target"] else "NOT met"
    return (f"collect with per-user data keys / with one key (mean of the two single-key runs, "
            f"{s['single_key_s']:.1f} s): {s['data_keys_ratio']:.2f}x creating every user's key, "
            f"{s['data_keys_ratio_keys_exist']:.2f}x with the keys stored (target <= {TARGET_DATA_KEYS}: {verdict}); "
            f"creating, without the cold start: {s['data_keys_ratio_without_cold_start']:.2f}x")


def _code_line(result: dict[str, Any]) -> str:
    """The source digest the jobs ran, and any edits made while one of them was running."""
    jobs = {name: result["steps"][name] for name in ("collect", "pseudonymize", "validate")}
    digests = {step["source_sha256"] for step in jobs.values()}
    line = (f"sha256 `{digests.pop()}`" if len(digests) == 1 else ", ".join(
        f"{name} `{step['source_sha256']}`" for name, step in jobs.items()))
    edited = sorted({f for step in jobs.values() for f in step["source_changed"]})
    return line + (f"; EDITED while a job ran: {', '.join(edited)}" if edited else "")


def markdown(result: dict[str, Any]) -> str:
    m, gen = result["machine"], result["generation"]
    lines = [
        SECTION_START,
        "## Ingest: collect + pseudonymize vs a bare Spark JSON -> Parquet copy; validate vs ingest",
        "",
        f"- Date: {result['date']}",
        (f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM; load average at "
         f"start {m['load_avg_start']}, at end {result['load_avg_end']}; Spark {m['spark']}, "
         f"Java {m['java']}, Python {m['python']}"),
        f"- Command: `{result['command']}`",
        f"- Code: privrec_pipeline/ and jobs/ at the start of each job: {_code_line(result)}",
        (f"- Input: {gen['records']:,} landing records of {gen['users']:,} users ({gen['bad_records']:,} malformed, "
         f"{gen['duplicates']:,} duplicates) in {gen['files']} gzip JSONL files, "
         f"{gen['bytes'] / MIB:,.1f} MiB"),
        (f"- Each cold Spark step: `spark-submit {' '.join(submit_args(''))} ...`, a separate cold JVM"
         + "".join(f"; {job}: `{options}`" for job, options in JOB_JVM_OPTIONS.items())
         + "; each `warm_` step: the same script as a Python client of one Spark Connect server "
           "(`privrec engine start`, local[2], 4g), after a warm-up copy, in the order copy, collect + "
           "pseudonymize, collect + pseudonymize, copy (the client's RSS only)"),
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|",
        *["| " + " | ".join(row) + " |" for row in _rows(result)],
        "",
        f"**{_ratio_line(result['summary'])}**",
        "",
        f"**{_validate_line(result['summary'])}**",
        "",
        f"**{_data_keys_line(result['summary'])}**",
        "",
        *([f"Lower bound (`--floor`): (floor_collect + floor_pseudonymize) / bare copy = "
           f"{result['summary']['floor_ratio']:.2f}x: an explicit-schema parse, one `aes_encrypt` of "
           "the identifiers per row and a Parquet write; then the three HMACs and a write. No "
           "classification, quarantine, dedupe, generalization or scrubbing, no manifests.", ""]
          if "floor_ratio" in result["summary"] else []),
        ("cold_start = spark-submit of an application that only creates the SparkSession and "
         "stops; \"minus cold start\" subtracts it from each step. bare_copy includes Spark's "
         "JSON schema inference (one more full read of the input, as `spark.read.json` does by "
         "default). Peak RSS is sampled every 0.2 s and summed over the process tree (shared "
         "pages counted per process; a child from its second sample on, so momentary "
         f"shell-outs are left out). Raw numbers: `{result['json']}`."),
    ]
    if result["event_log"]:
        lines += ["", "Spark SQL queries (from the event logs; `--event-log` adds event logging):", ""]
        for name in ("collect", "pseudonymize", "validate"):
            lines += [f"- {name}: " + "; ".join(
                f"{q['description']} {q['seconds']} s (tasks {q['task_seconds']} s)"
                for q in result["steps"][name]["queries"])]
    return "\n".join([*lines, SECTION_END])


def update_markdown(section: str, path: Path = BENCHMARKS_MD,
                    markers: tuple[str, str] = (SECTION_START, SECTION_END)) -> None:
    """Replace a benchmark's section of BENCHMARKS.md (between ``markers``), or append it."""
    start, end = markers
    text = path.read_text(encoding="utf-8") if path.exists() else (
        "# Benchmarks\n\nRun with `make bench` (`python -m benchmarks.run`; `--only NAME` for one "
        "benchmark, `--help` for options). Timings are wall-clock on the machine named in each "
        "section; raw results go to `bench-out/` (git-ignored). On a shared 2-core machine a "
        "step's time varies by up to 2x between runs of the same code (see the load averages), "
        "so compare ratios taken within one run.\n")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def run_lines(result: dict[str, Any]) -> list[str]:
    """The Date (and code digest), Machine and Command lines of a benchmark's section."""
    m = result["machine"]
    date = f"- Date: {result['date']}"
    if "code" in result:
        date += f"; code `{result['code']}`" + (
            f" (edited during the run: {', '.join(result['source_changed'])})" if result.get("source_changed") else "")
    return [date, (f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM; load average at start "
                   f"{m['load_avg_start']}; Spark {m['spark']}, Java {m['java']}"),
            f"- Command: `{result['command']}`"]


def shown_path(path: Path) -> str:
    """A result file's path as BENCHMARKS.md shows it: relative to the checkout when inside it."""
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def write_result(result: dict[str, Any], json_path: Path, section: str, markers: tuple[str, str],
                 console: Console, no_markdown: bool) -> None:
    """Write the raw result JSON, print the Markdown section and (unless ``no_markdown``) put
    it into BENCHMARKS.md between ``markers``."""
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(section, markup=False, highlight=False)
    if not no_markdown:
        update_markdown(section, BENCHMARKS_MD, markers)


def print_result(console: Console, result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"ingest benchmark: {result['events']:,} events", title_justify="left")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in _rows(result):
        table.add_row(*row)
    console.print(table)
    console.print(_ratio_line(result["summary"]))
    console.print(_validate_line(result["summary"]))
    console.print(_data_keys_line(result["summary"]))
    for name in ("collect", "collect_keys_exist", "collect_single_key", "pseudonymize", "validate"):
        step = result["steps"][name]
        console.print(f"[bold]{name}[/]: output {step['output']}; log {step['log']}")
        for line, count in step["notable"].items():
            console.print(f"  {count:>4} x {line}", markup=False, highlight=False)
        for q in step["queries"]:
            console.print(f"  query {q['query']:>3} {q['seconds']:7.1f} s  tasks {q['task_seconds']:7.1f} s "
                          f"gc {q['gc_seconds']:5.1f} s  spill {q['spilled_mib']} MiB  "
                          f"shuffle {q['shuffle_write_mib']} MiB  {q['description']}",
                          markup=False, highlight=False)


def run(args: argparse.Namespace, console: Console, command: str) -> int:
    from privrec_pipeline import lake as lk

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    lake = str(out / "lake")
    result: dict[str, Any] = {"benchmark": NAME, "date": dt.datetime.now(dt.UTC).isoformat(
        timespec="seconds"), "command": command, "events": args.events, "bad_rate": args.bad_rate,
        "day": args.date.isoformat(), "event_log": args.event_log, "machine": machine()}
    console.print(f"generating {args.events:,} events for {args.date} into {lake} ...")
    result["generation"] = generate(args, lake)
    env = spark_env(out, lake)
    day, me = args.date.isoformat(), str(Path(__file__).resolve())
    job_args = ["--date", day, "--lake", lake, "--run-id", "bench"]
    apps = {
        "cold_start": [me, "noop"],
        "bare_copy": [me, "copy", lk.partition_uri(lake, "landing", args.date), str(out / "bare-copy")],
        "collect_single_key": [str(ROOT / "jobs" / "collect.py"), *job_args, "--data-keys", "none"],
        "collect": [str(ROOT / "jobs" / "collect.py"), *job_args],
        "collect_keys_exist": [str(ROOT / "jobs" / "collect.py"), *job_args],
        "collect_single_key_2": [str(ROOT / "jobs" / "collect.py"), *job_args, "--data-keys", "none"],
        "pseudonymize": [str(ROOT / "jobs" / "pseudonymize.py"), *job_args],
        "validate": [str(ROOT / "jobs" / "validate.py"), *job_args],
    }
    if args.floor:
        apps["floor_collect"] = [me, "floor-collect", apps["bare_copy"][2], str(out / "floor-bronze")]
        apps["floor_pseudonymize"] = [me, "floor-pseudonymize", str(out / "floor-bronze"), str(out / "floor-silver")]
    steps: dict[str, Step] = {}
    for name, app in apps.items():
        console.print(f"{name}: spark-submit ...")
        before = source_hashes()  # edits while a job runs make its numbers incomparable
        steps[name] = step = run_step(name, app, env, out, args.event_log)
        step.source_sha256, step.source_changed = source_digest(before), _changed(before, source_hashes())
        if step.source_changed:
            console.print(f"[yellow]  sources edited while {name} ran: {', '.join(step.source_changed)}[/]")
        console.print(f"  {step.wall_s:.1f} s, peak {step.peak_rss_mib:,} MiB, exit {step.returncode}")
        if step.returncode != 0:
            break
    if all(step.returncode == 0 for step in steps.values()):
        steps.update(_warm_steps(apps, env, out, console))
    result["steps"] = {name: asdict(step) for name, step in steps.items()}
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path = out / "bench-ingest.json"
    result["json"] = shown_path(json_path)
    failed = [s for s in steps.values() if s.returncode != 0]
    if failed:
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        step = failed[0]
        console.print(f"[red]{step.name} failed (exit {step.returncode}); log: {step.log}[/]")
        console.print("\n".join(Path(step.log).read_text(errors="replace").splitlines()[-30:]),
                      markup=False, highlight=False)
        return 1
    result["summary"] = summarize(args.events, steps)
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_result(console, result)
    if not args.no_markdown:
        update_markdown(markdown(result))
    console.print(f"results: {json_path}" + ("" if args.no_markdown else f" and {BENCHMARKS_MD}"))
    return 0


WARM_ORDER = ("warm_up", "warm_bare_copy", "warm_collect", "warm_pseudonymize", "warm_collect_2",
              "warm_pseudonymize_2", "warm_bare_copy_2")
"""A B B A after a warm-up copy: the two sides alternate, so drift cancels in the ratio."""


def _warm_steps(apps: dict[str, list[str]], env: dict[str, str], out: Path, console: Console) -> dict[str, Step]:
    """The bare copy, collect and pseudonymize as clients of one warm engine (``privrec engine
    start``, local[2], 4g, as the DAG's steps run), in ``WARM_ORDER``."""
    privrec = str(Path(sys.executable).parent / "privrec")
    engine_env = {**env, "PRIVREC_HOME": str(out / "engine-home")}
    subprocess.run([privrec, "engine", "start", "--driver-memory", "4g"], env=engine_env, check=True,
                   capture_output=True)
    steps: dict[str, Step] = {}
    try:
        state = json.loads((out / "engine-home" / "engine" / "server.json").read_text())
        token = (out / "engine-home" / "engine" / "token").read_text().strip()
        client_env = {**env, "PRIVREC_SPARK_REMOTE": state["remote"], "SPARK_CONNECT_AUTHENTICATE_TOKEN": token}
        for name in WARM_ORDER:
            app = apps[{"warm_up": "bare_copy"}.get(name, name.removeprefix("warm_").removesuffix("_2"))]
            console.print(f"{name}: on the warm engine ...")
            before = source_hashes()
            steps[name] = step = run_step(name, app, client_env, out, False, client=True)
            step.source_sha256, step.source_changed = source_digest(before), _changed(before, source_hashes())
            console.print(f"  {step.wall_s:.1f} s, exit {step.returncode}")
            if step.returncode != 0:
                break
    finally:
        subprocess.run([privrec, "engine", "stop"], env=engine_env, capture_output=True)
    return steps


def _floor(spark: Any, mode: str, src: str, dst: str) -> None:
    """The lower-bound jobs of ``--floor`` (throwaway random keys: the data is synthetic)."""
    from pyspark.sql import functions as F

    from privrec_pipeline import crypto
    from privrec_pipeline.schema import DIRECT_IDENTIFIERS
    from privrec_pipeline.transforms.collect import landing_struct

    if mode == "floor-collect":
        df = spark.read.schema(landing_struct()).json(src)
        ids = F.to_json(F.struct(*DIRECT_IDENTIFIERS))
        df = df.select(*[c for c in df.columns if c not in (*DIRECT_IDENTIFIERS, "_corrupt")],
                       F.aes_encrypt(ids, F.lit(os.urandom(32)), F.lit("GCM")).alias("identifiers_enc"))
    else:  # the pseudonyms of privrec_pipeline.crypto, with the pads as literals (no key join)
        ipad, opad = (F.lit(pad) for pad in crypto.hmac_pads(os.urandom(32)))
        df = spark.read.parquet(src)
        df = df.select(*[crypto.pseudonym(ipad, opad, c, F.col(c)).alias(c) if c in ("event_id", "user_id", "session_id")
                         else c for c in df.columns if c != "identifiers_enc"])
    df.write.mode("overwrite").parquet(dst)


def spark_main(argv: list[str]) -> int:
    """The reference Spark application (run by spark-submit): ``noop`` or ``copy SRC DST``."""
    from privrec_pipeline.spark.session import get_spark

    mode, *paths = argv
    if mode not in ("noop", "copy", "floor-collect", "floor-pseudonymize") or len(paths) != (0 if mode == "noop" else 2):
        raise SystemExit("usage: ingest.py noop | ingest.py copy|floor-collect|floor-pseudonymize SRC DST")
    spark = get_spark(f"privrec-bench-{mode}")  # privrec's session defaults (zstd, UTC, ...)
    try:
        if mode == "copy":
            spark.read.json(paths[0]).write.mode("overwrite").parquet(paths[1])
        elif mode.startswith("floor-"):
            _floor(spark, mode, *paths)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(spark_main(sys.argv[1:]))
