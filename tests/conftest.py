"""Shared fixtures: one session-scoped SparkSession, throwaway keys, tiny lakes."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from privrec_pipeline.secrets import KeyRing, new_key_document, parse_key_document

DAY = dt.date(2026, 1, 15)
# py4j logs its connection teardown at interpreter exit, after pytest closed the streams.
logging.getLogger("py4j").setLevel(logging.WARNING)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


DEPLOYMENT_SETTINGS = ("PRIVREC_LEDGER_URL", "PRIVREC_BUDGET_EPSILON", "PRIVREC_BUDGET_DELTA",
                       "PRIVREC_BUDGET_WINDOW_DAYS", "PRIVREC_BUDGET_LIFETIME_EPSILON", "PRIVREC_LEASE_SECONDS",
                       "PRIVREC_KEYS_JSON", "PRIVREC_TASK_RETRIES", "PRIVREC_TRAIN_PARTITIONS", "PRIVREC_TRAIN_ROUNDS",
                       "PRIVREC_SPARK_REMOTE", "SPARK_CONNECT_AUTHENTICATE_TOKEN", "PRIVREC_RETENTION",
                       "PRIVREC_DATA_KEYS_URL")


@pytest.fixture(scope="session", autouse=True)
def _no_deployment_settings(tmp_path_factory):
    """Tests choose their own ledger, budget, leases, keys, lake and home: a deployment's
    settings exported in the shell that runs the suite must not leak into them, and a test
    that forgets to choose writes into a throwaway folder, never into the checkout's
    ``.airflow``/``lake`` (partition secrets there would outlive the run and make the next run
    depend on this one) nor reads the user's key file. ``PYSPARK_PYTHON`` is set here for
    every test, not by the ``spark`` fixture on first use, so what a test's subprocesses
    inherit does not depend on which tests ran before it."""
    patch = pytest.MonkeyPatch()
    for name in DEPLOYMENT_SETTINGS:
        patch.delenv(name, raising=False)
    scratch = tmp_path_factory.mktemp("session-defaults")
    patch.setenv("PRIVREC_HOME", str(scratch / "home"))
    patch.setenv("PRIVREC_LAKE", str(scratch / "lake"))
    patch.setenv("PRIVREC_KEY_FILE", str(scratch / "no-key-file.json"))  # tests pass their keys explicitly
    patch.setenv("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers: this interpreter
    yield
    patch.undo()


@pytest.fixture(scope="session")
def spark():
    from privrec_pipeline.spark.session import get_spark

    session = get_spark("privrec-tests", "local[2]")
    session.conf.set("spark.sql.shuffle.partitions", "2")
    # Not stopped here: the JVM goes with the process, and py4j would log its shutdown to
    # streams pytest has already closed.
    return session


@pytest.fixture()
def killed_before_commit(monkeypatch):
    """``with killed_before_commit(): step()`` runs a step that dies right after publishing its
    output and before the ledger records the commit (the commit transaction is rolled back, as
    a kill at that point leaves it)."""
    from contextlib import contextmanager

    from privrec_pipeline.privacy.ledger import Ledger

    real = Ledger._append

    def crash(self, conn, release_id, event):
        if event == "committed":
            raise KeyboardInterrupt("killed after publishing, before the commit")
        return real(self, conn, release_id, event)

    @contextmanager
    def killed():
        monkeypatch.setattr(Ledger, "_append", crash)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(Ledger, "_append", real)

    return killed


@pytest.fixture(scope="session")
def key_document() -> str:
    return json.dumps(new_key_document())


@pytest.fixture(scope="session")
def keyring(key_document: str) -> KeyRing:
    return parse_key_document(key_document, "test keys")


@pytest.fixture()
def lake(tmp_path: Path) -> str:
    return str(tmp_path / "lake")


def unavailable(reason: str) -> None:
    """A missing service, tool or data set: a skip on a developer's machine, a failure under
    ``CI=true`` (CI has all of them; a skip there would hide a regression)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: every service, tool and data set the suite uses must be there)")
    pytest.skip(reason)


PORT_BLOCK = 64  # ports per process block in ``free_ports``
PORT_FLOOR = 20000


def _ephemeral_floor() -> int:
    """The first port of the kernel's ephemeral range (ports it gives outgoing connections)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; IANA's dynamic range starts at 49152


def free_ports(count: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """``count`` distinct TCP ports nothing is bound to now, for servers a test starts.

    Each port is checked by binding it on every IPv4 interface (0.0.0.0), as Airflow's API
    and log servers bind, and the sockets are held until all are chosen (so the ports are
    distinct), then closed for the server to take. Between the close and the server's bind
    another process could take a port; two things make that unlikely, and callers retry the
    start once on a bind error: the ports lie below the kernel's ephemeral range (outgoing
    connections, e.g. to PostgreSQL, never get them), and the search starts in a block of
    this process's own (by PID), so two test runs started together look in different places.
    """
    import socket

    first, last = PORT_FLOOR, _ephemeral_floor() - 1
    blocks = (last - first + 1) // PORT_BLOCK
    if blocks < 1:  # an unusual ephemeral range: search every unprivileged port
        first, last, blocks = 1024, 65535, 1
    start = first + (os.getpid() % blocks) * PORT_BLOCK
    held: list[socket.socket] = []
    try:
        for port in [*range(start, last + 1), *range(first, start)]:
            if port in exclude:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
            if len(held) == count:
                return [s.getsockname()[1] for s in held]
        raise RuntimeError(f"no {count} free TCP ports in {first}..{last}")
    finally:
        for sock in held:
            sock.close()


def released_day(spark, lake: str, keyring: KeyRing, generator: dict) -> None:
    """A generated DAY through collect, pseudonymize, validate and a DP release (epsilon 30 of
    a 1000 cap: tiny populations release items only with a large budget)."""
    from privrec_pipeline.config import ledger_url
    from privrec_pipeline.dp_stats.params import DPStatsParams
    from privrec_pipeline.dp_stats.release import run_dp_stats
    from privrec_pipeline.ingest import run_collect, run_pseudonymize
    from privrec_pipeline.privacy.ledger import BudgetPolicy, Ledger
    from privrec_pipeline.quality.config import QualityConfig
    from privrec_pipeline.quality.validate import run_validate
    from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

    generate_day(GeneratorConfig(date=DAY, **generator), lake)
    run_collect(spark, lake, DAY, keyring)
    run_pseudonymize(spark, lake, DAY, keyring)
    run_validate(spark, lake, DAY, QualityConfig())
    run_dp_stats(spark, lake, DAY, DPStatsParams(epsilon=30.0, delta=1e-7),
                 Ledger(ledger_url(lake), BudgetPolicy(epsilon=1000.0)))


def row_keys(lake: str, keyring: KeyRing):
    """Opens sealed bronze identifiers and quarantined lines of ``lake`` as an auditor would:
    ``.open(row.enc_key_version, row.data_key, blob, aad)``."""
    from privrec_pipeline.erasure.data_keys import RowKeys
    from privrec_pipeline.erasure.requests import open_register

    return RowKeys(keyring, open_register(lake).data_keys)


def write_landing(lake: str, day: dt.date, lines: list[bytes], name: str = "events-000.jsonl") -> Path:
    """Write raw landing lines (bytes, exactly as given) into the day's landing partition."""
    from privrec_pipeline import lake as lk

    part = lk.path(lk.partition_uri(lake, "landing", day))
    part.mkdir(parents=True, exist_ok=True)
    path = part / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def good_event(i: int, **overrides) -> dict:
    """A valid landing record of DAY; overrides replace or (with None) remove fields."""
    rec = {
        "event_id": f"evt-{i:06d}",
        "event_time": f"{DAY}T10:{i % 60:02d}:00Z",
        "event_type": "view",
        "user_id": f"usr_{i % 7:04d}",
        "session_id": f"ses_{i % 11:04d}",
        "item_id": f"itm_{i % 13:04d}",
        "category": "books",
        "price": 12.5,
        "quantity": 1,
        "email": f"person{i % 7}@example.com",
        "ip": f"10.0.{i % 7}.1",
        "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148",
        "search_query": f"red shoes call +1 555-123-{1000 + i % 7} or person{i % 7}@example.com",
    }
    for key, value in overrides.items():
        if value is None:
            rec.pop(key, None)
        else:
            rec[key] = value
    return rec


def line(rec) -> bytes:
    return json.dumps(rec, ensure_ascii=False).encode("utf-8")


def partition_snapshot(path: Path) -> dict[str, object]:
    """File names and row contents of a parquet partition, to compare reruns.

    Contents, not bytes: parquet-mr writes the footer's per-column encodings from a hash set
    whose order varies between JVMs, so equal data can differ in a few footer bytes.
    """
    import pyarrow.parquet as pq

    return {p.name: pq.read_table(p).to_pylist() for p in sorted(path.glob("*.parquet"))}


# The longest files first (each a deployment of its own), so that `make test`'s two xdist
# workers (`--dist loadfile`) start on them and the short files fill the rest of the time.
LONGEST_FIRST = ("test_backfill_airflow.py", "test_celery_cluster.py", "test_e2e_airflow.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order
