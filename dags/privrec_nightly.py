"""
### privrec nightly

One run = one data interval (a UTC day). The run for day **D** starts after D ends and
processes `landing/interactions/dt=D`:

1. **collect** (Spark): parse with an explicit schema, quarantine malformed records with a
   reason, drop duplicate event ids, encrypt direct identifiers (AES-GCM) -> `bronze/`,
   `quarantine/`, `_manifests/collect/` (landing = bronze + quarantined + duplicates).
2. **pseudonymize** (Spark): HMAC-SHA256 pseudonyms, generalized device and network fields,
   scrubbed search text -> `silver/`.

Every task writes only its day's partition, atomically; reruns give the same output.
Spark's master comes from the `spark_default` connection; keys from the `privrec_keys`
connection or the workers' environment. See README.md for configuration.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag

from privrec_pipeline.orchestration.spark_operator import PrivrecSparkSubmitOperator
from privrec_pipeline.spark.session import LAUNCH_CONF

JOBS = Path(__file__).resolve().parents[1] / "jobs"
# Deployment settings (environment, read without I/O at parse time).
SPARK_CONF = {
    **LAUNCH_CONF,
    "spark.driver.memory": os.environ.get("PRIVREC_SPARK_DRIVER_MEMORY", "4g"),
    "spark.pyspark.python": os.environ.get("PYSPARK_PYTHON", sys.executable),
    "spark.pyspark.driver.python": os.environ.get("PYSPARK_DRIVER_PYTHON", sys.executable),
    "spark.ui.enabled": os.environ.get("PRIVREC_SPARK_UI", "false"),
}
COMMON_ARGS = ["--date", "{{ ds }}", "--run-id", "{{ run_id }}"]


@dag(
    dag_id="privrec_nightly",
    schedule=CronDataIntervalTimetable("30 1 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    tags=["privrec", "ingest", "privacy"],
    doc_md=__doc__,
    default_args={
        "owner": "privrec",
        # Scheduled runs retry; `privrec run` (a one-shot local run) sets 0 to fail fast.
        "retries": int(os.environ.get("PRIVREC_TASK_RETRIES", "2")),
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": True,
    },
    params={
        "allow_empty": Param(
            False, type="boolean", title="Allow an empty day",
            description="Accept a missing or empty landing partition (a day without traffic) "
                        "instead of failing the run.",
        ),
    },
)
def privrec_nightly() -> None:
    collect = PrivrecSparkSubmitOperator(
        task_id="collect",
        application=str(JOBS / "collect.py"),
        conn_id="spark_default",
        name="privrec-collect-{{ ds }}",
        application_args=[*COMMON_ARGS, "--allow-empty", "{{ params.allow_empty }}"],
        conf=SPARK_CONF,
    )
    pseudonymize = PrivrecSparkSubmitOperator(
        task_id="pseudonymize",
        application=str(JOBS / "pseudonymize.py"),
        conn_id="spark_default",
        name="privrec-pseudonymize-{{ ds }}",
        application_args=COMMON_ARGS,
        conf=SPARK_CONF,
    )
    collect >> pseudonymize


nightly = privrec_nightly()
