"""Each training partition's secret: created once, atomically, never empty, never replaced.

A partition's 32-byte secret keys its secure-aggregation key pairs and its training noise
(see ``secure_agg`` and ``federated``). On a deployment with workers per partition it comes
from the Airflow connection ``privrec_partition_K`` (its password: 64 hex characters), which
the secrets backend or environment gives to partition K's worker only (the aggregator's
worker holds none); without that connection it lives in the worker's own folder,
``$PRIVREC_HOME/partition-secrets/partition-K.key`` (folder 0700, file 0600, 64 hex
characters), created on first use. Never in the lake. An empty or short secret would be worse than none: anyone
knowing the run id could derive the masking keys and the noise from it. So:

- creation (``durable_files.write_once``) writes a temporary file (mode 0600) in the same
  folder, fsyncs it and publishes it with ``os.link``, which fails if the target exists: the first writer wins, a racing
  loser reads the winner's secret, and a crash leaves at most an unused temporary file,
  never a partial target; then the folder is fsynced (the new name survives a power loss);
- every read checks the file (a regular file, not readable by group or others, exactly 64
  hex characters) and fails closed with an error that names the file, never its content.
"""

from __future__ import annotations

import os
import re
import secrets as _secrets
import stat
from pathlib import Path

from privrec_pipeline.durable_files import write_once
from privrec_pipeline.errors import PrivrecError

SECRET_BYTES = 32
FOLDER = "partition-secrets"
_FORMAT = re.compile(rb"[0-9a-fA-F]{64}\n?")  # 32 bytes as hex; one trailing newline tolerated


class PartitionSecretError(PrivrecError):
    """A partition secret file is unusable (empty, truncated, malformed or too open)."""


def secret_path(partition: int, home: Path | None = None) -> Path:
    from privrec_pipeline.config import privrec_home

    return (home or privrec_home()) / FOLDER / f"partition-{partition}.key"


def connection_id(partition: int) -> str:
    return f"privrec_partition_{partition}"


def from_connection(partition: int) -> bytes | None:
    """The secret from the connection ``privrec_partition_K`` if this worker has it (checked,
    fails closed naming the connection, never showing its content); None without it."""
    try:
        from airflow.exceptions import AirflowNotFoundException
        from airflow.sdk import BaseHook
    except ImportError:  # outside an Airflow installation: files only
        return None
    try:
        conn = BaseHook.get_connection(connection_id(partition))
    except AirflowNotFoundException:
        return None
    value = (conn.password or "").strip().encode("ascii", "replace")
    if not _FORMAT.fullmatch(value):
        raise PartitionSecretError(
            f"the connection {connection_id(partition)!r} must hold partition {partition}'s secret as its password: "
            f"exactly {2 * SECRET_BYTES} hex characters ({SECRET_BYTES} bytes, e.g. from `python -c \"import "
            "secrets; print(secrets.token_hex(32))\"`)")
    return bytes.fromhex(value.decode("ascii"))


def load_or_create(partition: int, home: Path | None = None) -> bytes:
    """The partition's secret on this worker: its connection's, else its file's, created on
    first use (mode 0600, outside the lake)."""
    configured = from_connection(partition)
    if configured is not None:
        return configured
    path = secret_path(partition, home)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.path.lexists(path):
        write_once(path, _secrets.token_hex(SECRET_BYTES).encode("ascii"), mode=0o600)
    return read(path)


def read(path: Path) -> bytes:
    """The 32 bytes of an existing secret file, checked (fails closed, never shows the content)."""
    fix = (f"if this partition has published no keys for a run still in progress, delete {path} and "
           "retry (a new secret is created); otherwise restore the partition's secret from its backup")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise PartitionSecretError(f"partition secret {path} does not exist") from None
    except OSError as error:  # a symbolic link (ELOOP) or unreadable
        raise PartitionSecretError(f"partition secret {path} cannot be opened ({error.strerror}): it must be a "
                                   "regular file owned by the worker, not a link") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PartitionSecretError(f"partition secret {path} is not a regular file")
        if info.st_mode & 0o077:
            raise PartitionSecretError(
                f"partition secret {path} has mode {stat.S_IMODE(info.st_mode):04o}: group or others may read it; "
                f"run `chmod 600 {path}`; if anyone else may have read it, treat it as leaked: delete it before the "
                "next training run (a new secret is created)")
        data = fh.read(2 * SECRET_BYTES + 2)
    if not _FORMAT.fullmatch(data):
        length = len(data) if len(data) <= 2 * SECRET_BYTES + 1 else "more than 65"
        raise PartitionSecretError(
            f"partition secret {path} is malformed: {length} bytes, expected exactly {2 * SECRET_BYTES} hex "
            f"characters ({SECRET_BYTES} bytes): it was not completely written or was changed; {fix}")
    return bytes.fromhex(data.decode("ascii").strip())
