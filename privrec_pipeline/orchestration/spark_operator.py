"""The Spark operator of privrec's DAGs: each job a thin client of the deployment's Spark engine.

Every Spark step runs the same way, on the embedded default and on a cluster: ``jobs/<step>.py``
as a plain Python process on the Airflow worker, a Spark Connect client that sends its plans
to one long-lived Spark Connect server (``privrec_pipeline.spark.engine``) and starts no JVM of
its own. Which server, decided when the task runs:

- ``PRIVREC_SPARK_REMOTE`` (and ``SPARK_CONNECT_AUTHENTICATE_TOKEN``), else the Spark
  provider's ``spark_connect_default`` connection (host, port, extra ``use_ssl``, the token as
  its password, so a secrets backend can hold it): a server the deployment runs elsewhere; it
  must be reached over loopback or TLS, with a token. One that does not answer fails the task
  naming how to start it.
- otherwise the engine of this worker (``privrec engine``), started now if none runs. Its master
  and settings come from the ``spark_default`` connection (``local[*]`` on the embedded default,
  ``spark://host:port`` for a standalone cluster; the connection's extra ``conf`` and
  ``PRIVREC_SPARK_CONF`` add Spark settings, ``PRIVREC_SPARK_DRIVER_MEMORY`` the server's
  memory). The engine outlives the task: the next step, day and run find it warm.

Keys reach the client as the environment variable ``PRIVREC_KEYS_JSON``, set for that process
only, from the Airflow connection ``privrec_keys`` (its password holds the key document, see
``privrec_pipeline.secrets``; Airflow's secrets masker hides it in task logs); without that
connection the client inherits the worker's own (``PRIVREC_KEYS_JSON`` / ``PRIVREC_KEY_FILE``).
The client sends key frames to the server as session data, which is why the server must be on
loopback or behind TLS. ``needs_keys=False`` jobs (validate and later steps, which read only
pseudonymized data) never receive key material; no job gets Airflow's variables (connections,
database credentials).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from airflow.models import BaseOperator

from privrec_pipeline.errors import ConfigurationError, PrivrecError
from privrec_pipeline.secrets import ENV_KEYS_JSON

KEYS_CONN_ID = "privrec_keys"
SPARK_CONNECT_CONN_ID = "spark_connect_default"  # the Spark provider's default Spark Connect connection
TAIL_LINES = 5
KILL_AFTER_S = 3.0


class PrivrecSparkOperator(BaseOperator):
    """Runs one privrec Spark job (``application``: its script) on the deployment's engine."""

    template_fields = ("application_args",)
    ui_color = "#f4a460"

    def __init__(self, *, application: str, application_args: list[str] | None = None,
                 conn_id: str = "spark_default", needs_keys: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.application = application
        self.application_args = application_args or []
        self.conn_id = conn_id
        self.needs_keys = needs_keys
        self._client: subprocess.Popen | None = None

    def execute(self, context: Any) -> None:
        from airflow.exceptions import AirflowException

        from privrec_pipeline.spark import engine

        try:
            elsewhere = self._server_elsewhere()
            # On the embedded engine the task holds a lease on it while its job runs, so a
            # `privrec run` ending meanwhile does not stop it.
            with contextlib.nullcontext() if elsewhere else engine.run_lease():
                self._run_job(*(elsewhere or self._embedded_engine()))
        except (ConfigurationError, PrivrecError) as error:
            raise AirflowException(str(error)) from None

    def _run_job(self, remote: str, token: str) -> None:
        from airflow.exceptions import AirflowException

        from privrec_pipeline.config import lake_root
        from privrec_pipeline.spark.engine import ENV_REMOTE, ENV_TOKEN, client_environment

        # The job gets the key document only if it needs keys, and nothing of Airflow's.
        env = {**client_environment(os.environ, keys=self.needs_keys), ENV_REMOTE: remote, ENV_TOKEN: token}
        if self.needs_keys:
            env.update(self._keys())
        name = Path(self.application).name
        command = [sys.executable, str(self.application), *self._job_args(lake_root())]
        self.log.info("running %s on the Spark Connect server %s", name, remote)
        # In the task's process group: a signal Airflow sends the group reaches the job too.
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace")
        self._client = process
        tail: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            self.log.info("%s", line.rstrip("\n"))
            tail = [*tail[-(TAIL_LINES - 1):], line.rstrip("\n")]
        if process.wait() != 0:
            raise AirflowException(f"{name} failed on the Spark Connect server {remote} "
                                   f"(exit {process.returncode}): " + " | ".join(tail))

    def _server_elsewhere(self) -> tuple[str, str] | None:
        """(address, token) of a server the deployment runs elsewhere, if it names one (see the
        module's docstring)."""
        from privrec_pipeline.spark import engine

        settings = engine.remote_settings()
        if settings is not None:
            return settings
        server = self._connection_or_none(SPARK_CONNECT_CONN_ID)
        if server is None:
            return None
        remote = engine.connection_remote(server.host or "", server.port, server.extra_dejson.get("use_ssl"))
        engine.check_remote(remote, server.password)
        return remote, str(server.password)

    def _embedded_engine(self) -> tuple[str, str]:
        """(address, token) of this worker's engine, started now unless it runs."""
        from privrec_pipeline.spark import engine

        master, deploy_mode, extra = self._connection()
        if deploy_mode == "cluster":
            raise ConfigurationError(
                f"the spark connection {self.conn_id!r} asks for deploy mode 'cluster' (master {master!r}): "
                "privrec's Spark engine runs its driver on the Airflow worker that holds the lake's manifests "
                "and the keys; remove the deploy-mode extra or set it to 'client'")
        memory, conf = engine.server_settings(conf=engine.extra_conf(extra, dict(os.environ)))
        state, started, token = engine.start(master=master, driver_memory=memory, conf=conf, owner="task")
        if started:
            self.log.info("started the Spark engine %s (master %s, pid %d): it stays up for the next steps; "
                          "`privrec engine stop` ends it", state.remote, state.master, state.pid)
        elif state.settings != engine.settings_digest(master, memory, conf):
            self.log.warning("the running Spark engine (master %s) was started with other settings than the %r "
                             "connection, PRIVREC_SPARK_CONF and PRIVREC_SPARK_DRIVER_MEMORY give now (master %s): "
                             "restart it (`privrec engine stop`) to apply them", state.master, self.conn_id, master)
        return state.remote, token

    def _job_args(self, lake: str) -> list[str]:
        """The job's arguments with the worker's lake, explicit: the job does not depend on
        its own environment."""
        args = list(self.application_args or [])
        if "--lake" not in args:
            args += ["--lake", lake if "://" in lake else str(Path(lake).resolve())]
        return args

    def _connection(self) -> tuple[str, str | None, dict[str, Any]]:
        """The master URL, deploy mode and extras of the spark connection, as the Spark
        provider's hook resolves them (``local[*]``, ``spark://host:port``, ...)."""
        from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
        from airflow.sdk import BaseHook

        resolved = SparkSubmitHook(conn_id=self.conn_id)._connection
        return str(resolved["master"]), resolved.get("deploy_mode"), BaseHook.get_connection(self.conn_id).extra_dejson

    def _keys(self) -> dict[str, str]:
        """``PRIVREC_KEYS_JSON`` from the ``privrec_keys`` connection; empty without it (the
        client then resolves keys from the worker's environment)."""
        conn = self._connection_or_none(KEYS_CONN_ID)
        return {ENV_KEYS_JSON: conn.password} if conn is not None and conn.password else {}

    @staticmethod
    def _connection_or_none(conn_id: str) -> Any:
        """An Airflow connection, or None if it is not defined."""
        from airflow.exceptions import AirflowNotFoundException
        from airflow.sdk import BaseHook

        try:
            return BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            return None

    def on_kill(self) -> None:
        """End the job with the task: SIGTERM (the job's cleanup runs), SIGKILL after
        ``KILL_AFTER_S``, before Airflow's own SIGKILL of the task (5 s after its SIGTERM)."""
        client = self._client
        if client is None or client.poll() is not None:
            return
        client.send_signal(signal.SIGTERM)
        try:
            client.wait(timeout=KILL_AFTER_S)
        except subprocess.TimeoutExpired:
            client.kill()
