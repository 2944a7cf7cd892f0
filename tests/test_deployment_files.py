"""docker/: the compose file agrees with the process topology the cluster test runs
(``privrec_pipeline.deployment``), so the two cannot drift; the image is the official Airflow
image of the pinned version. No Docker engine here: the files are parsed, not run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from privrec_pipeline import deployment

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _partitions() -> int:
    return int(SERVICES["airflow-scheduler"]["environment"]["PRIVREC_TRAIN_PARTITIONS"])


def test_the_services_are_the_topology():
    workers = deployment.celery_workers(_partitions())
    assert set(SERVICES) == set(deployment.SERVICES) | {w.name for w in workers}


def test_each_worker_serves_its_queue_and_holds_only_its_own_secrets():
    workers = deployment.celery_workers(_partitions())
    every_secret = {s for w in workers for s in w.secrets}
    for worker in workers:
        service = SERVICES[worker.name]
        command = service["command"]
        assert command[:2] == ["celery", "worker"]
        assert command[command.index("--queues") + 1] == worker.queue
        assert set(service["environment"]) & every_secret == set(worker.secrets), worker.name
    for name, service in SERVICES.items():
        if name not in {w.name for w in workers}:
            assert not set(service.get("environment") or {}) & every_secret, name  # nobody else holds a secret


def test_the_shared_settings_match_the_tested_deployment():
    env = SERVICES["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "PRIVREC_LEDGER_URL"):
        assert env[key].startswith("postgresql+psycopg2://"), key
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")
    master = " ".join(SERVICES["spark-master"]["command"])
    port = re.search(r"--port (\d+)", master).group(1)
    assert env["AIRFLOW_CONN_SPARK_DEFAULT"] == f"spark://spark-master:{port}"
    ui_ports = {re.search(r"--webui-port (\d+)", " ".join(SERVICES[s]["command"])).group(1)
                for s in ("spark-master", "spark-worker")}
    assert "8080" not in ui_ports  # Airflow's API server has 8080
    assert "lake:/data/lake" in SERVICES["spark-worker"]["volumes"]  # executors write the lake
    # The engine runs in the default worker's container: executors reach its driver by that name.
    engine_conf = json.loads(SERVICES["airflow-worker-default"]["environment"]["PRIVREC_SPARK_CONF"])
    assert engine_conf["spark.driver.host"] == "airflow-worker-default"
    assert all(SERVICES[w.name]["environment"]["PRIVREC_TRAIN_PARTITIONS"] == str(_partitions())
               for w in deployment.celery_workers(_partitions()))


def test_the_image_is_the_official_airflow_image_of_the_pinned_version():
    pinned = next(line.split("==")[1] for line in (DOCKER.parent / "constraints.txt").read_text().splitlines()
                  if line.startswith("apache-airflow=="))
    dockerfile = (DOCKER / "Dockerfile").read_text()
    base = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)[-1]  # the final stage is the image
    assert base.startswith(f"apache/airflow:{pinned}-python3.11"), base
    # The report assets come from the lock file the development machines install from.
    assert "npm ci" in dockerfile and "package-lock.json" in dockerfile
