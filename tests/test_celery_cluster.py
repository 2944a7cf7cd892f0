"""privrec on a multi-worker deployment, every service a process on loopback: PostgreSQL
(Airflow metadata, Celery results, the privacy ledger), Redis (Celery broker), Airflow's API
server, scheduler and DAG processor with the CeleryExecutor, three Celery workers (the
default queue, which holds the encryption/pseudonym keys but no partition secret, and one
worker per training partition, each holding only its own partition's secret as the
connection ``privrec_partition_K``), and a Spark standalone master and worker
(``spark-class``) that the ``spark_default`` connection points at: the default worker's first
Spark step starts the warm engine (a Spark Connect server) on that master.

One generated day runs through the REST API. Partition 1's worker is killed (SIGKILL, with
its task processes) while it trains the last round: the round fails closed (the task fails
once its heartbeat stops, the aggregation and everything after it do not run, the training
release stays reserved, no model appears); the worker comes back, the failed tasks are
cleared (a retry) and the day finishes with every release spent once. Then: every Spark step ran on the one engine, the only application of the standalone master; every partition task ran in
its partition's queue, on the worker of that partition (its notes are in that worker's home
only), and no secret file was written anywhere; the day's rows equal those of the same day
run by the embedded code path; the ledger (on PostgreSQL) holds the day's committed releases.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from test_backfill_airflow import PG_SERVER, _postgres_database, _stop_group

from conftest import free_ports, unavailable
from privrec_pipeline import deployment as topology
from privrec_pipeline import lake as lk
from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day
from privrec_pipeline.spark.standalone import start_cluster

pytestmark = [pytest.mark.airflow, pytest.mark.spark]

AIRFLOW = str(Path(sys.executable).parent / "airflow")
DAG = "privrec_nightly"
DAY = dt.date(1999, 12, 31)
PARTITIONS = 2
STEPS = ("collect", "pseudonymize", "validate", "dp_stats", "build_partitions")
CONF = {"dp_epsilon": 50, "train_window_days": 1, "train_epsilon": 8,
        "train_settings": {"local_steps": 3, "batch_size": 20, "dim": 16},
        "publish_settings": {"min_gain_over_dp_popularity": -1}}
TIMEOUT_S = 1500


def _redis_db() -> int:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=5).ping()
    except redis.exceptions.ConnectionError as exc:
        unavailable(f"Redis at 127.0.0.1:6379 is not reachable ({type(exc).__name__})")
    return 1 + os.getpid() % 15  # a database of its own: two runs of the suite do not share a broker


class Deployment:
    def __init__(self, root: Path, env: dict[str, str], base: str, password: str) -> None:
        self.root, self.env, self.base, self.password = root, env, base, password
        self.processes: list[subprocess.Popen] = []
        self.commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.named: dict[str, subprocess.Popen] = {}
        self.headers: dict[str, str] = {}

    def start(self, name: str, args: list[str], **extra: str) -> None:
        log = (self.root / f"{name}.log").open("ab")
        process = subprocess.Popen([AIRFLOW, *args], env={**self.env, **extra}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        self.commands[name], self.named[name] = (args, extra), process

    def kill(self, name: str) -> None:
        """SIGKILL a service and every process it started (a machine lost, not a shutdown): its
        process group and its descendants (Airflow puts each task runner in a group of its own)."""
        import psutil

        process = self.named[name]
        descendants = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGKILL)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        process.wait(timeout=30)

    def restart(self, name: str) -> None:
        args, extra = self.commands[name]
        self.start(name, args, **extra)

    def task_instances(self, run_id: str) -> dict[str, dict]:
        tis = self.api("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return {t["task_id"]: t for t in tis["task_instances"]}

    def wait_run(self, run_id: str, timeout_s: float, *, on_poll=None) -> str:
        deadline = time.monotonic() + timeout_s
        while (state := self.api("GET", f"/dags/{DAG}/dagRuns/{run_id}")["state"]) not in ("success", "failed"):
            assert time.monotonic() < deadline, f"run not done in {timeout_s} s: " + self.logs()
            if on_poll is None or not on_poll():
                time.sleep(3)
        return state

    def api(self, method: str, path: str, **kwargs) -> dict:
        response = requests.request(method, self.base + "/api/v2" + path, headers=self.headers, timeout=60, **kwargs)
        assert response.ok, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline, "the deployment did not come up: " + self.logs()
            assert all(p.poll() is None for p in self.processes), "a process exited: " + self.logs()
            try:
                if not self.headers:
                    reply = requests.post(self.base + "/auth/token",
                                          json={"username": "admin", "password": self.password}, timeout=10)
                    if reply.ok:
                        self.headers = {"Authorization": f"Bearer {reply.json()['access_token']}"}
                if self.headers and requests.get(f"{self.base}/api/v2/dags/{DAG}", headers=self.headers,
                                                 timeout=10).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for process in self.processes:
            _stop_group(process)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, key_document):
    from sqlalchemy.exc import OperationalError

    database = f"privrec_cluster_{os.getpid()}"
    try:
        _postgres_database(database)
    except OperationalError as exc:
        unavailable(f"PostgreSQL at 127.0.0.1:5432 is not reachable ({type(exc).__name__})")
    broker = _redis_db()
    root = tmp_path_factory.mktemp("cluster")
    spark = start_cluster(root / "spark", cores=2, memory="2g")
    password = secrets.token_urlsafe(16)
    (root / "passwords.json").write_text(json.dumps({"admin": password}))
    api_port, *log_ports = free_ports(1 + 2 + 1 + PARTITIONS)
    url = f"{PG_SERVER}/{database}"
    from privrec_pipeline.orchestration.local import airflow_env, ensure_metadata_db

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PRIVREC"))}
    base_env.update({"PRIVREC_HOME": str(root / "home-services"), "PRIVREC_LAKE": str(root / "lake")})
    env = airflow_env(base_env)
    env.update({
        "AIRFLOW_HOME": str(root / "airflow-home"),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url,
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{broker}",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://postgres@127.0.0.1:5432/{database}",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "passwords.json"),
        "AIRFLOW_CONN_SPARK_DEFAULT": spark.master_url,
        "PRIVREC_LEDGER_URL": url,
        "PRIVREC_KEY_FILE": str(root / "no-such-key-file.json"),
        "PRIVREC_SPARK_DRIVER_MEMORY": "1g",
        "PRIVREC_SPARK_CONF": '{"spark.executor.cores": "1", "spark.executor.memory": "900m"}',
        "PRIVREC_TRAIN_PARTITIONS": str(PARTITIONS), "PRIVREC_TRAIN_ROUNDS": "2",
        "PRIVREC_TASK_RETRIES": "0", "PRIVREC_BUDGET_EPSILON": "1000",
        # A task whose worker died is failed once its heartbeat has been missing this long.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    })
    generate_day(GeneratorConfig(date=DAY, events=3000, users=200, items=100, seed=5, bad_rate=0.02),
                 env["PRIVREC_LAKE"])
    ensure_metadata_db(env, root / "migrate.log")
    deployment = Deployment(root, env, f"http://127.0.0.1:{api_port}", password)
    deployment.partition_secrets = {k: secrets.token_hex(32) for k in range(PARTITIONS)}
    try:
        deployment.start("api-server", ["api-server", "--port", str(api_port)])
        deployment.start("scheduler", ["scheduler"], AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(log_ports[0]))
        deployment.start("dag-processor", ["dag-processor"])
        # The workers of the deployment's topology (docker-compose.yml has the same): the default
        # queue's (Spark steps with the keys, the orchestrator's tasks; no partition secret) and
        # one per partition, each with only its own secret. Each has a home of its own.
        values = {topology.KEYS_CONNECTION: json.dumps({"conn_type": "generic", "password": key_document}),
                  **{topology.partition_connection_env(k): json.dumps(
                      {"conn_type": "generic", "password": deployment.partition_secrets[k]}) for k in range(PARTITIONS)}}
        for n, worker in enumerate(topology.celery_workers(PARTITIONS)):
            deployment.start(worker.name, ["celery", "worker", "--queues", worker.queue, "--concurrency", "2",
                                           "--celery-hostname", f"{worker.name}@127.0.0.1"],
                             PRIVREC_HOME=str(root / f"home-{worker.name}"),
                             AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(log_ports[1 + n]),
                             **{name: values[name] for name in worker.secrets})
        deployment.wait_ready()
        deployment.spark = spark
        yield deployment
    finally:
        deployment.stop()
        for worker in topology.celery_workers(PARTITIONS):  # the engine a worker's task started
            subprocess.run([str(Path(sys.executable).parent / "privrec"), "engine", "stop"], capture_output=True,
                           env={**env, "PRIVREC_HOME": str(root / f"home-{worker.name}")}, timeout=120)
        spark.stop()
        _postgres_database(database, drop_only=True)


RUN_ID = "cluster-test-1999-12-31"
KILLED_TASK, KILLED_WORKER = "train_round_1_partition_1", "airflow-worker-partition-1"


def _training_releases(deployment) -> list:
    from privrec_pipeline.privacy.ledger import Ledger, policy_from_env

    ledger = Ledger(deployment.env["PRIVREC_LEDGER_URL"], policy_from_env(deployment.env))
    return [r for r in ledger.releases() if r.release_key in ("training", "population", "dp_stats")]


@pytest.fixture(scope="module")
def interrupted(deployment):
    """The day's run with partition 1's worker killed while it trains the last round."""
    deployment.api("POST", f"/dags/{DAG}/dagRuns", json={
        "dag_run_id": RUN_ID, "logical_date": f"{DAY}T00:00:00Z", "conf": CONF})
    deployment.api("PATCH", f"/dags/{DAG}", json={"is_paused": False})
    killed = []

    def kill_when_running() -> bool:
        if not killed and deployment.task_instances(RUN_ID).get(KILLED_TASK, {}).get("state") == "running":
            deployment.kill(KILLED_WORKER)
            killed.append(time.monotonic())
        time.sleep(0.25)  # poll fast until the kill, so the task is caught while it runs
        return not killed

    state = deployment.wait_run(RUN_ID, TIMEOUT_S, on_poll=kill_when_running)
    assert killed, f"{KILLED_TASK} was never seen running: " + deployment.logs()
    lake = deployment.env["PRIVREC_LAKE"]
    return {"state": state, "tis": deployment.task_instances(RUN_ID), "releases": _training_releases(deployment),
            "candidate": (lk.partition(lake, "candidates", DAY) / "model").exists(),
            "final_round": (lk.partition(lake, "candidates", DAY) / "run" / "round=2" / "model.npz").exists()}


@pytest.fixture(scope="module")
def finished(interrupted, deployment):
    """The worker back, the failed tasks cleared (a retry of the round), the run to its end."""
    deployment.restart(KILLED_WORKER)
    deployment.api("POST", f"/dags/{DAG}/clearTaskInstances", json={
        "dry_run": False, "dag_run_id": RUN_ID, "only_failed": True, "include_downstream": True,
        "reset_dag_runs": True})
    state = deployment.wait_run(RUN_ID, TIMEOUT_S)
    return state, deployment.task_instances(RUN_ID)


def test_a_worker_killed_mid_round_fails_the_round_closed(interrupted):
    tis = interrupted["tis"]
    assert interrupted["state"] == "failed" and tis[KILLED_TASK]["state"] == "failed", tis[KILLED_TASK]
    assert tis["train_round_1_partition_0"]["state"] == "success"  # the other partition's update is in the lake
    after = ("aggregate_round_1", "finish_training", "evaluate_and_publish")
    assert {t: tis[t]["state"] for t in after} == dict.fromkeys(after, "upstream_failed")
    assert not interrupted["candidate"] and not interrupted["final_round"]
    [training] = [r for r in interrupted["releases"] if r.release_key == "training"]
    assert training.state == "reserved"  # reserved before the rounds, neither committed nor failed


def test_the_retry_finishes_the_day_and_spends_every_release_once(finished, interrupted, deployment):
    state, tis = finished
    assert state == "success", ({k: t["state"] for k, t in tis.items()}, deployment.logs())
    before, after = interrupted["releases"], _training_releases(deployment)
    assert sorted((r.id, r.release_key) for r in after) == sorted((r.id, r.release_key) for r in before)
    assert {r.state for r in after} == {"committed"}
    [training] = [r for r in after if r.release_key == "training"]
    assert training.id == next(r.id for r in before if r.release_key == "training")
    # Partition 0's round-1 update was reused by the retry, not trained and masked again.
    assert tis["train_round_1_partition_0"]["try_number"] == interrupted["tis"]["train_round_1_partition_0"][
        "try_number"]


def test_the_day_runs_end_to_end_on_the_cluster(finished, deployment):
    state, tis = finished
    failed = {k: t["state"] for k, t in tis.items() if t["state"] not in ("success", "skipped")}
    assert state == "success" and not failed, (failed, deployment.logs())
    from privrec_pipeline.models.recommend import LATEST, models_root

    assert (models_root(deployment.env["PRIVREC_LAKE"]) / "privrec-recommender" / LATEST).exists()
    # One Spark application on the standalone master: the warm engine, which the default
    # queue's worker started for the first Spark step and which every step then used.
    apps = deployment.spark.applications()
    assert [(a["name"], a["state"]) for a in apps] == [("privrec-engine", "RUNNING")], apps
    # PRIVREC_SPARK_CONF reached the engine: executors of 900 MiB (Spark's default is 1 GiB).
    assert {a.get("memoryperexecutor", a.get("memoryperslave")) for a in apps} == {900}, apps
    engine_home = deployment.root / "home-airflow-worker-default" / "engine"
    state = json.loads((engine_home / "server.json").read_text())
    assert state["master"] == deployment.spark.master_url
    task_logs = "\n".join(p.read_text(errors="replace") for p in
                          Path(deployment.env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]).rglob("attempt=*.log"))
    ran = {step for step in STEPS if f"running {step}.py on the Spark Connect server {state['remote']}" in task_logs}
    assert ran == set(STEPS), ran


def test_partition_tasks_ran_on_their_own_workers_and_secrets_stayed_there(finished, deployment):
    _, tis = finished
    for task_id, ti in tis.items():
        partition = next((k for k in range(PARTITIONS) if (task_id.endswith(f"_{k}") and "partition" in task_id)
                          or task_id == f"publish_keys_{k}"), None)
        assert ti["queue"] == (topology.partition_queue(partition) if partition is not None
                               else topology.DEFAULT_QUEUE), task_id
    root = deployment.root
    # Each partition's worker noted only its own masked updates, in its own home; the default
    # worker (the aggregator's) and the services hold no partition state at all.
    for k in range(PARTITIONS):
        notes = {p.name for p in (root / f"home-airflow-worker-partition-{k}" / "partition-secrets" / "masked").iterdir()}
        assert notes and all(f"partition={k}" in n for n in notes), notes
    for home in ("home-airflow-worker-default", "home-services"):
        assert not (root / home / "partition-secrets").exists(), home
    # Secrets came from each worker's connection: no secret file anywhere, and no worker log
    # or lake file holds one.
    assert not list(root.rglob("partition-*.key"))
    leaks = [str(p) for p in [*root.glob("*.log"), *Path(deployment.env["PRIVREC_LAKE"]).rglob("*")] if p.is_file()
             and any(s.encode() in p.read_bytes() for s in deployment.partition_secrets.values())]
    assert not leaks


def test_the_rows_equal_the_embedded_code_path_and_the_ledger_is_on_postgres(finished, deployment, spark, keyring,
                                                                              tmp_path):
    from privrec_pipeline.ingest import run_collect, run_pseudonymize
    from privrec_pipeline.privacy.ledger import Ledger, policy_from_env

    lake = str(tmp_path / "embedded")
    generate_day(GeneratorConfig(date=DAY, events=3000, users=200, items=100, seed=5, bad_rate=0.02), lake)
    run_collect(spark, lake, DAY, keyring)
    run_pseudonymize(spark, lake, DAY, keyring)
    for step, keys in (("collect", ("landing_records", "bronze_records", "quarantined", "duplicates")),
                       ("pseudonymize", ("silver_records",))):
        on_cluster, embedded = (json.loads(lk.path(lk.manifest_uri(x, step, DAY)).read_text())
                                for x in (deployment.env["PRIVREC_LAKE"], lake))
        assert {k: on_cluster[k] for k in keys} == {k: embedded[k] for k in keys}, step
    cluster_silver = spark.read.parquet(lk.partition_uri(deployment.env["PRIVREC_LAKE"], "silver", DAY))
    embedded_silver = spark.read.parquet(lk.partition_uri(lake, "silver", DAY))
    assert cluster_silver.exceptAll(embedded_silver).count() == 0 == embedded_silver.exceptAll(cluster_silver).count()
    ledger = Ledger(deployment.env["PRIVREC_LEDGER_URL"], policy_from_env(deployment.env))
    assert {r.release_key for r in ledger.releases() if r.state == "committed"} >= {"dp_stats", "population",
                                                                                     "training"}
