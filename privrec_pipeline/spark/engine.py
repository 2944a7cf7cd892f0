"""The warm Spark engine: one long-lived Spark Connect server, jobs as thin clients.

A cold ``spark-submit`` starts a JVM for every step of every day (about 7-9 s here before any
work, and the JIT starts cold). With ``PRIVREC_SPARK_REMOTE`` set, ``spark.session.get_spark``
returns a Spark Connect session on that server instead: a job is then a Python process of a
second or two that sends plans, and the server's JVM stays warm across steps, days and runs.

- Embedded default: ``privrec engine start`` runs the server on this machine
  (``org.apache.spark.sql.connect.service.SparkConnectServer`` from pyspark's own jars, master
  ``local[N]``), bound to 127.0.0.1 only, with a fresh random token; its address and token are
  kept in ``$PRIVREC_HOME/engine/`` (the token file is 0600). ``privrec engine stop`` ends it.
- Production: a Spark Connect server on the cluster; set ``PRIVREC_SPARK_REMOTE`` to its
  ``sc://`` address and ``SPARK_CONNECT_AUTHENTICATE_TOKEN`` (Spark's own variable, read by
  server and client) to its token.

Keys travel to the server as data of the session (the key frames of ``crypto`` and
``erasure.data_keys``), so the channel must be private: a remote on this machine is reached
as ``localhost`` with gRPC local credentials (loopback only) and the token; any other host
needs ``use_ssl=true`` in the address (TLS, e.g. a TLS-terminating proxy in front of the
server), and every remote needs a token. Sessions are isolated per client (Spark Connect
session ids), so two runs at once share one server safely.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from privrec_pipeline.errors import ConfigurationError, PrivrecError

ENV_REMOTE = "PRIVREC_SPARK_REMOTE"
ENV_TOKEN = "SPARK_CONNECT_AUTHENTICATE_TOKEN"  # Spark's own: the server and the client read it
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
LOOPBACK = ("localhost",)  # gRPC local credentials are used for this host name only
START_TIMEOUT_S = 180.0
SPARK_CONF_ENV = "PRIVREC_SPARK_CONF"  # extra settings of the server, one JSON object
DRIVER_MEMORY_ENV = "PRIVREC_SPARK_DRIVER_MEMORY"  # the server's JVM (default 4g)
SETTING_NAME = re.compile(r"spark\.[A-Za-z0-9_.\-]+")
DEFAULTS_MARKER = "spark.privrec.defaults"  # set on privrec's server: SPARK_DEFAULTS are its settings


class EngineUnavailableError(PrivrecError):
    """The Spark Connect server does not answer."""


@dataclass(frozen=True)
class EngineState:
    pid: int
    port: int
    remote: str
    master: str
    log: str
    started: float
    owner: str = "manual"  # who started it: "manual" (privrec engine start), "run" (a command), "task"
    settings: str = ""  # digest of its master, memory and Spark settings (``settings_digest``)


def engine_folder() -> Path:
    from privrec_pipeline.config import privrec_home

    return privrec_home() / "engine"


def _state_path() -> Path:
    return engine_folder() / "server.json"


def _token_path() -> Path:
    return engine_folder() / "token"


def _is_server(pid: int, port: int) -> bool:
    """Whether ``pid`` is this user's Spark Connect server listening on ``port``: a recorded
    pid may have been reused after a crash, and a port may have been taken by someone else."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.uids().real != os.getuid() or SERVER_CLASS not in " ".join(process.cmdline()):
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in process.net_connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def read_state() -> EngineState | None:
    """The embedded engine's state, if one was started and it is still that server."""
    path = _state_path()
    if not path.exists():
        return None
    state = EngineState(**json.loads(path.read_text(encoding="utf-8")))
    return state if _is_server(state.pid, state.port) else None


@contextlib.contextmanager
def _engine_lock() -> Iterator[None]:
    """One ``start`` or ``stop`` at a time (flock on ``engine/lock``)."""
    import fcntl

    folder = engine_folder()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lease() -> Iterator[Callable[[], bool]]:
    """Held by each command that runs the DAG on the embedded engine (a shared flock on
    ``engine/users``); yields ``alone()``: whether no other command holds it now (it then holds
    it exclusively until the end of the block, so none starts using the engine meanwhile)."""
    import fcntl

    folder = engine_folder()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder / "users", os.O_RDWR | os.O_CREAT, 0o600)

    def alone() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield alone
    finally:
        os.close(fd)


def check_remote(remote: str, token: str | None) -> None:
    """Refuse an address over which keys would travel in clear or unauthenticated."""
    url = urlparse(remote)
    if url.scheme != "sc" or not url.hostname:
        raise ConfigurationError(f"{ENV_REMOTE} must be a Spark Connect address sc://host:port, not {remote!r}")
    params = dict(p.split("=", 1) for p in url.path.lstrip("/").split(";") if "=" in p)
    if "token" in params:  # an address is logged and shown; a token in it would be too
        raise ConfigurationError(f"{ENV_REMOTE} must not hold the token: give it in {ENV_TOKEN}")
    if not token:
        raise ConfigurationError(f"the Spark Connect server {url.hostname}:{url.port} needs a token: set {ENV_TOKEN} "
                                 "(keys are sent to it as session data)")
    if url.hostname not in LOOPBACK and params.get("use_ssl", "").lower() != "true":
        raise ConfigurationError(
            f"the Spark Connect server {url.hostname} is not this machine's 'localhost': keys are sent to it as "
            f"session data, so its address needs use_ssl=true (sc://{url.hostname}:{url.port}/;use_ssl=true)")


def remote_settings(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(address, token) of the engine jobs use: ``PRIVREC_SPARK_REMOTE`` and
    ``SPARK_CONNECT_AUTHENTICATE_TOKEN``; None: each job is a Spark application of its own."""
    env = os.environ if environ is None else environ
    if not env.get(ENV_REMOTE):
        return None
    token = env.get(ENV_TOKEN, "")
    check_remote(env[ENV_REMOTE], token)
    return env[ENV_REMOTE], token


def connection_remote(host: str, port: int | None, use_ssl: Any) -> str:
    """The address of a ``spark_connect`` Airflow connection (the Spark provider's type: host,
    port, extra ``use_ssl``), without its token (which travels in ``ENV_TOKEN``)."""
    url = urlparse(host if "://" in host else f"sc://{host}")
    if url.scheme != "sc" or not url.hostname or url.path not in ("", "/"):
        raise ConfigurationError(f"the spark_connect connection's host must be a host name or sc://host, not {host!r}")
    ssl = str(use_ssl).lower() == "true" if use_ssl is not None else False
    return f"sc://{url.hostname}:{port or url.port or 15002}/" + (";use_ssl=true" if ssl else "")


def token() -> str:
    """The embedded engine's token (``engine/token``, 0600)."""
    return _token_path().read_text(encoding="utf-8").strip()


def extra_conf(connection_extra: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """The server's extra Spark settings: the spark connection's extra ``conf`` and
    ``PRIVREC_SPARK_CONF`` (one JSON object, e.g. ``{"spark.executor.memory": "4g"}``; it wins)."""
    merged: dict[str, str] = {}
    for source, value in (("the spark connection's extra 'conf'", connection_extra.get("conf")),
                          (SPARK_CONF_ENV, environ.get(SPARK_CONF_ENV))):
        if value in (None, ""):
            continue
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ConfigurationError(f"{source} is not JSON ({error.msg}): give one object of Spark settings, "
                                         'e.g. {"spark.executor.memory": "4g"}') from None
        if not isinstance(value, dict) or not all(isinstance(k, str) and SETTING_NAME.fullmatch(k) for k in value):
            raise ConfigurationError(f"{source} must be one JSON object whose keys are Spark settings (spark.*), "
                                     f"not {value!r}")
        bad = sorted(k for k, v in value.items() if isinstance(v, dict | list) or v is None
                     or any(ord(c) < 32 or ord(c) == 127 for c in str(v)))
        if bad:  # the settings go to a properties file, one per line
            raise ConfigurationError(f"{source}: the values of {', '.join(bad)} must be one-line strings, numbers or "
                                     "booleans")
        merged.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()})
    if merged.get("spark.io.encryption.enabled", "false").lower() == "true":
        raise ConfigurationError("spark.io.encryption.enabled cannot be set: Spark 4.2's Connect server then fails "
                                 "to receive any local relation above its inline size, such as the users' data keys "
                                 "(\"Not enough bytes in channel\")")
    return merged


def connect(app_name: str, remote: str, token: str) -> Any:
    """A Spark Connect session on ``remote``; a server that does not answer is an
    ``EngineUnavailableError`` naming how to start one."""
    from pyspark.sql import SparkSession

    check_remote(remote, token)
    url = urlparse(remote)
    # The client retries an unreachable server for minutes: a refused TCP connection says at once.
    try:
        socket.create_connection((url.hostname, url.port or 15002), timeout=10).close()
    except OSError as exc:
        raise EngineUnavailableError(
            f"the Spark Connect server at {remote} does not answer ({exc.strerror or exc}): start it with "
            f"`privrec engine start` (the embedded default), or unset {ENV_REMOTE} to run each step in a Spark "
            "application of its own") from None
    if token:
        os.environ[ENV_TOKEN] = token  # the client sends it with every call
    return SparkSession.builder.remote(remote).appName(app_name).getOrCreate()


KEY_VARIABLES = ("PRIVREC_KEYS_JSON", "PRIVREC_KEY_FILE")


def client_environment(environ: Any, *, keys: bool) -> dict[str, str]:
    """A job client's environment: nothing of Airflow's (its connections hold keys and partition
    secrets, its settings database credentials), and without ``keys`` no key variable."""
    return {k: v for k, v in environ.items()
            if not k.startswith("AIRFLOW_") and (keys or k not in KEY_VARIABLES)}


def server_environment(environ: Any) -> dict[str, str]:
    """The server's environment: nothing of privrec's or Airflow's settings (keys, the ledger's
    and Airflow's database credentials, connections, secrets backends) and no inherited token."""
    return {k: v for k, v in environ.items()
            if not k.startswith(("AIRFLOW_", "PRIVREC_")) and k != ENV_TOKEN}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_digest(master: str, driver_memory: str, conf: dict[str, str]) -> str:
    """What a server was started with, to tell whether a running one matches (no values shown)."""
    import hashlib

    return hashlib.sha256(json.dumps([master, driver_memory, sorted(conf.items())]).encode()).hexdigest()[:16]


def start(*, master: str = "local[*]", driver_memory: str | None = None, conf: dict[str, str] | None = None,
          port: int | None = None, owner: str = "manual") -> tuple[EngineState, bool, str]:
    """Start the embedded engine unless it runs; (its state, whether it was started now, its
    token), read under the engine's lock. ``driver_memory`` defaults to
    ``PRIVREC_SPARK_DRIVER_MEMORY`` (else 4g), ``conf`` (extra Spark settings) to ``PRIVREC_SPARK_CONF``."""
    memory, settings = server_settings(driver_memory, conf)
    with _engine_lock():
        state, started = _start(master, memory, settings, port, owner)
        return state, started, token()


def server_settings(driver_memory: str | None = None, conf: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """(driver memory, extra Spark settings) of a server started now, defaults from the environment."""
    return driver_memory or os.environ.get(DRIVER_MEMORY_ENV) or "4g", (
        extra_conf({}, dict(os.environ)) if conf is None else conf)


def _reap_orphan() -> None:
    """Under the lock: a recorded server that does not listen was left by a starter that was
    killed while it started (no other start can be in progress): end it."""
    import psutil

    path = _state_path()
    if not path.exists():
        return
    state = EngineState(**json.loads(path.read_text(encoding="utf-8")))
    try:  # this home's server (its properties file), started no later than recorded: not a reused pid
        process = psutil.Process(state.pid)
        command = " ".join(process.cmdline())
        ours = (process.uids().real == os.getuid() and SERVER_CLASS in command
                and str(_properties_path()) in command and process.create_time() <= state.started + 1)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        ours = False
    if ours:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(state.pid, signal.SIGKILL)
    path.unlink(missing_ok=True)


def _properties_path() -> Path:
    return engine_folder() / "server.properties"


def _property_value(value: str) -> str:
    """``value`` as java.util.Properties (Spark's --properties-file) reads it back unchanged:
    backslashes escaped, and a leading space, '=' or ':' (a separator to the reader) too.
    ``extra_conf`` refuses control characters, so a value is one line."""
    escaped = value.replace("\\", "\\\\")
    return "\\" + escaped if escaped[:1] in (" ", "=", ":") else escaped


def _write_private(path: Path, text: str) -> None:
    """``text`` into ``path``, readable by this user only (created 0600, replaced atomically)."""
    staged = path.with_name(path.name + ".tmp")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    staged.replace(path)  # readers see the old file or the whole new one


def _start(master: str, driver_memory: str, extra: dict[str, str], port: int | None,
           owner: str) -> tuple[EngineState, bool]:
    from privrec_pipeline.spark.session import LAUNCH_CONF, SPARK_DEFAULTS
    from privrec_pipeline.spark.standalone import spark_class

    running = read_state()
    if running is not None:
        if owner == "manual" and running.owner != "manual":  # started by hand now: kept until stopped by hand
            running = EngineState(**{**asdict(running), "owner": "manual"})
            _write_private(_state_path(), json.dumps(asdict(running), indent=2))
        return running, False
    _reap_orphan()
    folder = engine_folder()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_hex(32)
    _write_private(_token_path(), token + "\n")
    port = port or _free_port()
    # Session defaults on the server, so the deployment's settings override them (get_spark then
    # leaves them alone); extra settings win over those, but not over what follows.
    conf = {"spark.ui.enabled": os.environ.get("PRIVREC_SPARK_UI", "false"), **LAUNCH_CONF, **SPARK_DEFAULTS,
            **extra, DEFAULTS_MARKER: "true",
            "spark.connect.grpc.binding.address": "127.0.0.1", "spark.connect.grpc.binding.port": str(port),
            "spark.driver.memory": driver_memory}
    # Not spark.io.encryption.enabled: with it, Spark 4.2's Connect server fails to cache a local
    # relation larger than its inline threshold ("Not enough bytes in channel"), and the users'
    # data keys reach the server as one (data_keys.key_frame). Its local dirs are its own (0700).
    # A properties file (0600), not --conf arguments: any local user can read a command line
    # (the launcher still puts JVM options, extraJavaOptions, on the java command line).
    properties = _properties_path()
    _write_private(properties, "".join(f"{key} {_property_value(value)}\n" for key, value in conf.items()))
    command = [str(spark_class().parent / "spark-submit"), "--master", master, "--class", SERVER_CLASS,
               "--name", "privrec-engine", "--properties-file", str(properties)]
    log = folder / "server.log"
    # The server gets no key material, no database credentials and nothing of Airflow's: it
    # receives key frames as session data.
    env = server_environment(os.environ)
    env[ENV_TOKEN] = token
    env.setdefault("PYSPARK_PYTHON", sys.executable)  # Python UDFs run in this project's interpreter
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    state = EngineState(process.pid, port, f"sc://localhost:{port}", master, str(log), time.time(), owner,
                        settings_digest(master, driver_memory, extra))
    # Recorded before it listens: a starter killed while waiting leaves a server the next start ends.
    _write_private(_state_path(), json.dumps(asdict(state), indent=2))
    try:
        _wait_listening(process, port, log)
    except BaseException:  # a failure, or the starter ended (SIGTERM, timeout): no orphan server
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        _state_path().unlink(missing_ok=True)
        raise
    return state, True


def _wait_listening(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _is_server(process.pid, port):
        if process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise EngineUnavailableError(f"the Spark Connect server exited with code {process.returncode} while "
                                         f"starting (log {log}):\n{tail}")
        if time.monotonic() > deadline:
            raise EngineUnavailableError(f"the Spark Connect server did not listen on port {port} within "
                                         f"{START_TIMEOUT_S:.0f} s (log {log}; is the port taken?)")
        time.sleep(0.2)


def stop() -> EngineState | None:
    """Stop the embedded engine; its state, or None if none ran."""
    with _engine_lock():
        state = read_state()  # only a process that is still our server is signalled
        if state is None:
            _reap_orphan()  # one recorded while it started, whose starter was killed
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(state.pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _alive(state.pid):
                time.sleep(0.2)
            if _alive(state.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(state.pid, signal.SIGKILL)
        for path in (_state_path(), _token_path()):
            path.unlink(missing_ok=True)
        return state


def _alive(pid: int) -> bool:
    """Still running (an ended child not yet reaped by its parent, a zombie, is not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
