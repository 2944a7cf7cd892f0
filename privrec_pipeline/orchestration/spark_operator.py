"""The Spark operator of privrec's DAGs: SparkSubmitOperator plus key injection.

Keys reach the Spark driver as an environment variable set at execution time, from the
Airflow connection ``privrec_keys`` (its password holds the key document, see
``privrec_pipeline.secrets``). They are set after template rendering, so they are never
stored as a rendered field, and Airflow's secrets masker hides the connection password in
task logs. This route serves drivers that run on the worker (local or standalone client
mode); on YARN/Kubernetes the provider would pass env vars as --conf arguments, so the
operator refuses and cluster drivers get keys from a mounted secret. Without that connection the job resolves keys from its own environment
(``PRIVREC_KEYS_JSON`` / ``PRIVREC_KEY_FILE``), which spark-submit inherits.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from privrec_pipeline.secrets import ENV_KEYS_JSON

KEYS_CONN_ID = "privrec_keys"
LOCAL_MASTERS = ("local", "spark://")


class PrivrecSparkSubmitOperator(SparkSubmitOperator):
    """Runs one privrec Spark job; the master comes from the ``spark_default`` connection.

    ``needs_keys=False`` for jobs that read only pseudonymized data (validate and later
    steps): they never receive key material.
    """

    def __init__(self, *, needs_keys: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.needs_keys = needs_keys

    def execute(self, context: Any) -> Any:
        if self.needs_keys:
            self._inject_keys()
        return super().execute(context)

    def _inject_keys(self) -> None:
        from airflow.exceptions import AirflowException, AirflowNotFoundException
        from airflow.sdk import BaseHook

        try:
            conn = BaseHook.get_connection(KEYS_CONN_ID)
        except AirflowNotFoundException:
            conn = None
        if conn is not None and conn.password:
            master = str(BaseHook.get_connection(self._conn_id).host or "")
            if not master.startswith(LOCAL_MASTERS):
                # On YARN/Kubernetes the provider turns env_vars into --conf arguments, which
                # would put the keys on a command line. Refuse instead of leaking.
                raise AirflowException(
                    f"connection {KEYS_CONN_ID!r} can only inject keys into local or standalone-client "
                    f"Spark drivers (master {master!r}); deliver keys to cluster drivers as a mounted "
                    "secret file (PRIVREC_KEY_FILE) or the cluster's secret environment instead"
                )
            # The hook adds these to the worker's environment for the spark-submit process only.
            self.env_vars = {**(self.env_vars or {}), ENV_KEYS_JSON: conn.password}
