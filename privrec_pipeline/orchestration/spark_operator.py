"""The Spark operator of privrec's DAGs: SparkSubmitOperator plus key injection.

Keys reach the Spark driver as an environment variable set at execution time, from the
Airflow connection ``privrec_keys`` (its password holds the key document, see
``privrec_pipeline.secrets``). They are set after template rendering, so they are never
stored as a rendered field, and Airflow's secrets masker hides the connection password in
task logs. Without that connection the job resolves keys from its own environment
(``PRIVREC_KEYS_JSON`` / ``PRIVREC_KEY_FILE``), which spark-submit inherits.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

KEYS_CONN_ID = "privrec_keys"


class PrivrecSparkSubmitOperator(SparkSubmitOperator):
    """Runs one privrec Spark job; the master comes from the ``spark_default`` connection."""

    def execute(self, context: Any) -> None:
        from airflow.exceptions import AirflowNotFoundException
        from airflow.sdk import BaseHook

        try:
            conn = BaseHook.get_connection(KEYS_CONN_ID)
        except AirflowNotFoundException:
            conn = None
        if conn is not None and conn.password:
            # Inherit the worker's environment and add the key document for this process only.
            self.env_vars = {**os.environ, **(self.env_vars or {}), "PRIVREC_KEYS_JSON": conn.password}
        super().execute(context)
