"""The embedded default: Airflow on SQLite in ``.airflow/`` with the project's DAGs.

``privrec run`` is ``airflow dags test`` with this environment; ``privrec airflow`` is
``airflow standalone`` with it. Nothing here is needed in production, where Airflow's own
deployment provides the metadata database, connections and workers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from privrec_pipeline.config import DAGS_DIR, lake_root, privrec_home

EMBEDDED_MASTER = "local[*]"
DEFAULT_SPARK_CONN = json.dumps({"conn_type": "spark", "host": EMBEDDED_MASTER})


def airflow_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Airflow commands of the embedded default (user settings win)."""
    env = dict(os.environ if base is None else base)
    home = Path(env["PRIVREC_HOME"]).expanduser().resolve() if env.get("PRIVREC_HOME") else privrec_home()
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # airflow, and spark-submit for the engine
    env.setdefault("AIRFLOW_HOME", str(home))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_DIR))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
    env.setdefault("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(home / "logs"))
    env.setdefault("AIRFLOW_CONN_SPARK_DEFAULT", DEFAULT_SPARK_CONN)
    env.setdefault("PRIVREC_LAKE", lake_root())
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return env


def embedded_master(env: dict[str, str]) -> str | None:
    """The Spark engine's master when the ``spark_default`` connection is the embedded default's
    (``local[*]``), else None (the first Spark step resolves the connection and starts it)."""
    return EMBEDDED_MASTER if env.get("AIRFLOW_CONN_SPARK_DEFAULT") == DEFAULT_SPARK_CONN else None


SPARK_POOL, SPARK_POOL_SLOTS_ENV = "privrec_spark", "PRIVREC_SPARK_POOL_SLOTS"
SETUP_VERSION = "2\n"  # what the stamp records: migrated, and the Spark pool created


def ensure_metadata_db(env: dict[str, str], log: Path) -> None:
    """Create or upgrade the SQLite metadata database once (``airflow db migrate``) and the
    pool of Spark steps (``PRIVREC_SPARK_POOL_SLOTS``, default 2, concurrent sessions on the engine)."""
    home = Path(env["AIRFLOW_HOME"])
    stamp = home / ".privrec-db-migrated"
    if stamp.exists() and stamp.read_text(encoding="utf-8") == SETUP_VERSION:
        return
    home.mkdir(parents=True, exist_ok=True)
    slots = env.get(SPARK_POOL_SLOTS_ENV, "2")
    for cmd in (["airflow", "db", "migrate"],
                ["airflow", "pools", "set", SPARK_POOL, slots, "privrec: concurrent Spark steps"]):
        with log.open("ab") as fh:
            proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"'{' '.join(cmd[:3])}' failed (exit {proc.returncode}); see {log}")
    stamp.write_text(SETUP_VERSION, encoding="utf-8")


def dags_test(dag_id: str, day: str, env: dict[str, str], log: Path, conf: dict | None = None) -> int:
    """Run a whole DAG for one logical date in-process (``airflow dags test``); output to ``log``."""
    cmd = ["airflow", "dags", "test", dag_id, day]
    env = {**env, "PRIVREC_TASK_RETRIES": env.get("PRIVREC_TASK_RETRIES", "0")}
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    with log.open("ab") as fh:
        return subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode


_ERROR_LINE = re.compile(r"(privrec_pipeline\.errors\.\w+|\b\w+(?:Error|Exception)): (.+)")
_LOG_SUFFIX = re.compile(r"\s+\[[\w.]+\] loc=\S+$")  # structlog's "[logger] loc=file:line"


def failure_reasons(log_text: str, limit: int = 3) -> list[str]:
    """The distinct error messages of a failed run, most specific first (privrec's own
    errors, then any other exception line), so the user sees why without reading the log."""
    own, other = [], []
    for raw in log_text.splitlines():
        match = _ERROR_LINE.search(raw)
        if not match:
            continue
        detail = _LOG_SUFFIX.sub("", match.group(2)).strip()
        message = f"{match.group(1).rsplit('.', 1)[-1]}: {detail}"
        bucket = own if match.group(1).startswith("privrec_pipeline") else other
        if message not in bucket:
            bucket.append(message)
    return (own or other)[:limit]


_TASK_STARTED = re.compile(r"\[DAG TEST\] starting task_id=(\S+)")


def ran_collect(log_text: str) -> bool:
    """Whether an ``airflow dags test`` log shows the collect task running (a run of a day
    before the DAG's start date is reported successful without running any task)."""
    return any(match.group(1).split(".")[-1] == "collect" for match in _TASK_STARTED.finditer(log_text))
