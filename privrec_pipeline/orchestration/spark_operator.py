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

import json
import os
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.secrets import ENV_KEYS_JSON

KEYS_CONN_ID = "privrec_keys"
LOCAL_MASTERS = ("local", "spark://")
SPARK_CONF_ENV = "PRIVREC_SPARK_CONF"
"""Extra Spark settings of every job, one JSON object (e.g. ``{"spark.executor.memory": "4g"}``);
the ``spark_default`` connection's extra ``conf`` (an object) gives them too, the variable wins."""


def extra_conf(connection_extra: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """Spark settings from the connection's extra ``conf`` and ``PRIVREC_SPARK_CONF``."""
    merged: dict[str, str] = {}
    for source, value in (("the spark connection's extra 'conf'", connection_extra.get("conf")),
                          (SPARK_CONF_ENV, environ.get(SPARK_CONF_ENV))):
        if value in (None, ""):
            continue
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source} is not JSON ({error.msg}): give one object of Spark settings, e.g. "
                                 '{"spark.executor.memory": "4g"}') from None
        if not isinstance(value, dict) or not all(isinstance(k, str) and k.startswith("spark.") for k in value):
            raise ValueError(f"{source} must be one JSON object whose keys are Spark settings (spark.*), "
                             f"not {value!r}")
        merged.update({k: str(v) for k, v in value.items()})
    return merged


class PrivrecSparkSubmitOperator(SparkSubmitOperator):
    """Runs one privrec Spark job; the master comes from the ``spark_default`` connection.

    ``needs_keys=False`` for jobs that read only pseudonymized data (validate and later
    steps): they never receive key material.
    """

    def __init__(self, *, needs_keys: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.needs_keys = needs_keys

    def execute(self, context: Any) -> Any:
        from airflow.exceptions import AirflowException

        from privrec_pipeline.config import lake_root
        from privrec_pipeline.spark import engine

        try:
            remote = engine.task_settings()
        except ConfigurationError as error:
            raise AirflowException(str(error)) from None
        if remote is not None:
            return self._run_on_engine(*remote)
        master, deploy_mode, extra = self._connection()
        if deploy_mode == "cluster":
            # Spark's standalone master refuses Python applications in cluster mode, and on
            # YARN/Kubernetes the driver would need the project, the lake and the keys there.
            raise AirflowException(
                f"the spark connection {self._conn_id!r} asks for deploy mode 'cluster' (master {master!r}): "
                "privrec runs its Spark drivers in client mode on the Airflow worker (the driver writes "
                "the lake's manifests and receives keys there); remove the deploy-mode extra or set it to "
                "'client'")
        try:
            self.conf = {**(self.conf or {}), **extra_conf(extra, dict(os.environ))}
        except ValueError as error:
            raise AirflowException(str(error)) from None
        self.application_args = self._job_args(lake_root())
        # What the job script imports beside it (the project itself is installed on every node).
        common = Path(self.application).parent / "_common.py"
        if common.exists() and str(common) not in (self.py_files or ""):
            self.py_files = ",".join(filter(None, [self.py_files, str(common)]))
        if self.needs_keys:
            self._inject_keys(master)
        return super().execute(context)

    def _job_args(self, lake: str) -> list[str]:
        """The job's arguments with the worker's lake, explicit: the driver does not depend on
        its own environment."""
        args = list(self.application_args or [])
        if "--lake" not in args:
            args += ["--lake", lake if "://" in lake else str(Path(lake).resolve())]
        return args

    def _run_on_engine(self, remote: str, token: str) -> None:
        """The job as a thin client of the warm engine (``spark.engine``): a Python process that
        sends its plans to the Spark Connect server, no JVM of its own. Keys as on the
        spark-submit route (the ``privrec_keys`` connection, else the worker's environment);
        the engine's address was checked to be loopback or TLS."""
        import subprocess
        import sys

        from airflow.exceptions import AirflowException

        from privrec_pipeline.config import lake_root

        self.env_vars = dict(self.env_vars or {})
        if self.needs_keys:
            self._inject_keys("local")
        from privrec_pipeline.spark.engine import ENV_REMOTE, ENV_TOKEN

        command = [sys.executable, str(self.application), *self._job_args(lake_root())]
        self.log.info("running %s on the Spark Connect server %s", Path(self.application).name, remote)
        # Its own process group: on_kill (a timeout, "mark failed") ends the job, not only this task.
        process = subprocess.Popen(command, env={**os.environ, **self.env_vars, ENV_REMOTE: remote, ENV_TOKEN: token},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                   start_new_session=True)
        self._client = process
        tail: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            self.log.info("%s", line.rstrip("\n"))
            tail = [*tail[-19:], line.rstrip("\n")]
        if process.wait() != 0:
            raise AirflowException(f"{Path(self.application).name} failed on the Spark Connect server {remote} "
                                   f"(exit {process.returncode}): " + " | ".join(tail[-5:]))

    def on_kill(self) -> None:
        """End an engine-route job with the task (SIGTERM: the job's cleanup runs; then SIGKILL)."""
        import signal
        import subprocess

        client = getattr(self, "_client", None)
        if client is None:
            return super().on_kill()
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGTERM)
            try:
                client.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(client.pid, signal.SIGKILL)
        return None

    def _connection(self) -> tuple[str, str | None, dict[str, Any]]:
        """The master URL, deploy mode and extras of the spark connection, as the provider's
        hook resolves them."""
        from airflow.sdk import BaseHook

        hook = self._get_hook()
        resolved = hook._connection  # the hook's own resolution of host, port and scheme
        return str(resolved["master"]), resolved.get("deploy_mode"), BaseHook.get_connection(self._conn_id).extra_dejson

    def _inject_keys(self, master: str) -> None:
        from airflow.exceptions import AirflowException, AirflowNotFoundException
        from airflow.sdk import BaseHook

        try:
            conn = BaseHook.get_connection(KEYS_CONN_ID)
        except AirflowNotFoundException:
            conn = None
        if conn is not None and conn.password:
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
