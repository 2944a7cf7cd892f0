"""The multi-worker deployment's process topology, as data.

One definition for the two places that must agree: ``docker/docker-compose.yml`` (checked
against it by ``tests/test_deployment_files.py``) and the cluster test that runs the same
processes on loopback (``tests/test_celery_cluster.py``).

- Services: PostgreSQL (Airflow metadata, Celery results, the privacy ledger), Redis (the
  Celery broker), Airflow's API server, scheduler and DAG processor, a Spark master and worker.
- Celery workers: one for the default queue (the Spark engine's driver and the Spark steps'
  clients, with the pseudonym/encryption keys, and the orchestrator's tasks: seal_keys, the aggregation, publishing; no partition
  secret), and one per training partition K serving only the queue ``privrec_partition_K``
  and holding only the connection ``privrec_partition_K`` (its secret). The aggregator's
  worker never holds a partition secret, so the default queue has its own worker.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVICES = ("postgres", "redis", "airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
            "spark-master", "spark-worker")
DEFAULT_QUEUE = "default"
KEYS_CONNECTION = "AIRFLOW_CONN_PRIVREC_KEYS"


def partition_queue(partition: int) -> str:
    return f"privrec_partition_{partition}"


def partition_connection_env(partition: int) -> str:
    """The environment variable that gives partition K's worker its secret (an Airflow connection)."""
    return f"AIRFLOW_CONN_PRIVREC_PARTITION_{partition}"


@dataclass(frozen=True)
class Worker:
    name: str  # the compose service and the Celery hostname's prefix
    queue: str
    secrets: tuple[str, ...]  # environment variables with secrets only this worker gets


def celery_workers(partitions: int) -> list[Worker]:
    return [Worker("airflow-worker-default", DEFAULT_QUEUE, (KEYS_CONNECTION,)),
            *(Worker(f"airflow-worker-partition-{k}", partition_queue(k), (partition_connection_env(k),))
              for k in range(partitions))]
