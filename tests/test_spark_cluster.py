"""The nightly DAG against a Spark standalone cluster (Master and Worker from pyspark's own
``spark-class`` on 127.0.0.1), through the ``spark_default`` connection in client mode: every
Spark step of the day is an application of that master, the day's outputs are complete, and
they agree with the embedded (local Spark) run of the same day."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privrec_pipeline import lake as lk
from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day
from privrec_pipeline.spark.standalone import start_cluster

pytestmark = pytest.mark.airflow
PRIVREC = str(Path(sys.executable).parent / "privrec")
DAY = dt.date(1999, 12, 31)
STEPS = ("collect", "pseudonymize", "validate", "dp_stats", "build_partitions")
RUN = [PRIVREC, "run", "--date", DAY.isoformat(), "-p", "dp_epsilon=50", "-p", "train_window_days=1",
       "-p", "train_epsilon=8", "-p", 'train_settings={"local_steps": 3, "batch_size": 20, "dim": 16}']


def _env(root: Path, key_document: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PRIVREC"))}
    env.update({
        "PRIVREC_HOME": str(root / "airflow"), "PRIVREC_LAKE": str(root / "lake"),
        "PRIVREC_KEY_FILE": str(root / "no-such-key-file.json"),
        "AIRFLOW_CONN_PRIVREC_KEYS": json.dumps({"conn_type": "generic", "password": key_document}),
        "PRIVREC_SPARK_DRIVER_MEMORY": "1g", "PRIVREC_TRAIN_PARTITIONS": "2", "PRIVREC_TRAIN_ROUNDS": "2",
        "PRIVREC_BUDGET_EPSILON": "1000", **extra,
    })
    generate_day(GeneratorConfig(date=DAY, events=3000, users=200, items=100, seed=5, bad_rate=0.02),
                 env["PRIVREC_LAKE"])
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(tmp_path_factory.mktemp("spark-cluster"), cores=2, memory="2g")
    yield running
    running.stop()


def _manifest(lake: str, step: str) -> dict:
    return json.loads(lk.local_path(lk.manifest_uri(lake, step, DAY)).read_text())


def test_every_spark_step_runs_on_the_standalone_master(cluster, tmp_path, key_document):
    root = tmp_path / "on-cluster"
    # Executor settings through PRIVREC_SPARK_CONF: one core each, so two steps could share the worker.
    env = _env(root, key_document, AIRFLOW_CONN_SPARK_DEFAULT=cluster.master_url,
               PRIVREC_SPARK_CONF='{"spark.executor.cores": "1", "spark.executor.memory": "1g"}')
    run = subprocess.run(RUN, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    apps = cluster.applications()
    names = [a["name"] for a in apps]
    expected = [f"privrec-{step.replace('_', '-')}-{DAY.isoformat()}" for step in STEPS]
    assert sorted(names) == sorted(expected), names  # each step once, nothing ran locally instead
    assert all(a["state"] == "FINISHED" for a in apps), apps
    assert {a["cores"] for a in apps} <= {1}  # the executor setting reached the drivers
    lake = env["PRIVREC_LAKE"]
    from privrec_pipeline.models.recommend import LATEST, models_root

    assert (models_root(lake) / "privrec-recommender" / LATEST).exists(), run.stdout[-3000:]

    # The same day on the embedded default (local Spark): the same rows in every zone.
    local_env = _env(tmp_path / "embedded", key_document)
    assert subprocess.run(RUN, env=local_env, capture_output=True, text=True, timeout=1200).returncode == 0
    for step, keys in (("collect", ("landing_records", "bronze_records", "quarantined", "duplicates")),
                       ("pseudonymize", ("silver_records",))):
        on_cluster, embedded = _manifest(lake, step), _manifest(local_env["PRIVREC_LAKE"], step)
        assert {k: on_cluster.get(k) for k in keys} == {k: embedded.get(k) for k in keys}
