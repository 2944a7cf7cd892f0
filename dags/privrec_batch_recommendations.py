"""
### privrec batch recommendations

Runs whenever `privrec_nightly` publishes a new model (the Asset
`privrec://models/privrec-recommender`): scores the newest hold-out histories (pseudonymous
users of the model's training day) with the published model and writes
`serving/recommendations/dt=<day>/<version>.parquet` (key, rank, item_id, score): per-user
output, so a restricted zone of its own (never the published model folder), kept
`PRIVREC_SERVING_RETENTION_DAYS` (30) days. It shows the Asset wiring a downstream consumer
(a cache warmer, an export) uses.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, task

from privrec_pipeline.config import EARLIEST_DAY
from privrec_pipeline.orchestration.notify import FailureNotifier

MODEL_ASSET = Asset("privrec-recommender", uri="privrec://models/privrec-recommender")


@dag(
    dag_id="privrec_batch_recommendations",
    schedule=[MODEL_ASSET],
    start_date=pendulum.datetime(EARLIEST_DAY.year, EARLIEST_DAY.month, EARLIEST_DAY.day, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["privrec", "serving"],
    doc_md=__doc__,
    default_args={"owner": "privrec", "retries": int(os.environ.get("PRIVREC_TASK_RETRIES", "2")),
                  "retry_delay": timedelta(minutes=5),
                  "execution_timeout": timedelta(minutes=int(os.environ.get("PRIVREC_TASK_TIMEOUT_MINUTES", "180"))),
                  "on_failure_callback": FailureNotifier()},
)
def privrec_batch_recommendations() -> None:
    @task
    def score_latest() -> dict:
        from privrec_pipeline.config import lake_root
        from privrec_pipeline.models.batch import score_latest_holdout

        return score_latest_holdout(lake_root())

    score_latest()


batch = privrec_batch_recommendations()
