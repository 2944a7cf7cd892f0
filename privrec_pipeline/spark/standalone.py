"""A Spark standalone cluster on this machine, from pyspark's own ``bin/spark-class``.

``start_cluster`` starts a Master and one Worker on 127.0.0.1 (web UIs on their own ports,
never Airflow's 8080) and waits until the worker has registered; ``applications`` reads the
master's JSON status (what ran on it). Used by the cluster test and for trying privrec
against a cluster: point the ``spark_default`` connection at ``cluster.master_url``
(``AIRFLOW_CONN_SPARK_DEFAULT=spark://127.0.0.1:PORT``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def spark_class() -> Path:
    import pyspark

    path = Path(pyspark.__file__).parent / "bin" / "spark-class"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the installed pyspark has no bin/spark-class")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class StandaloneCluster:
    master_url: str
    master_ui: str
    worker_ui: str
    log_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.master_ui}/json/", timeout=10) as response:
            return json.loads(response.read().decode("utf-8"))

    def applications(self) -> list[dict[str, Any]]:
        """Every application the master ran or runs (name, id, state, cores)."""
        status = self.status()
        return [*status.get("activeapps", []), *status.get("completedapps", [])]

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait(predicate, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.5)  # polling a starting JVM: readiness, not a fixed delay
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s; see {log}")


def start_cluster(log_dir: Path, *, cores: int = 2, memory: str = "2g", timeout: float = 120.0) -> StandaloneCluster:
    """Start a Master and a Worker on 127.0.0.1; stop them with ``cluster.stop()``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(log_dir),
           "SPARK_WORKER_DIR": str(log_dir / "work")}
    port, master_ui_port, worker_ui_port = free_port(), free_port(), free_port()
    cluster = StandaloneCluster(f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{master_ui_port}",
                                f"http://127.0.0.1:{worker_ui_port}", log_dir)
    try:
        master_log = log_dir / "master.log"
        cluster.processes.append(subprocess.Popen(
            [str(spark_class()), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
             "--webui-port", str(master_ui_port)],
            env=env, stdout=master_log.open("wb"), stderr=subprocess.STDOUT))
        _wait(lambda: cluster.status().get("status") == "ALIVE", "the Spark master", master_log, timeout)
        worker_log = log_dir / "worker.log"
        cluster.processes.append(subprocess.Popen(
            [str(spark_class()), "org.apache.spark.deploy.worker.Worker", cluster.master_url, "--host", "127.0.0.1",
             "--webui-port", str(worker_ui_port), "--cores", str(cores), "--memory", memory,
             "--work-dir", str(log_dir / "work")],
            env=env, stdout=worker_log.open("wb"), stderr=subprocess.STDOUT))
        _wait(lambda: any(w.get("state") == "ALIVE" for w in cluster.status().get("workers", [])),
              "the Spark worker", worker_log, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
