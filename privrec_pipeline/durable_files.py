"""Small files written so that a crash leaves the old state or the new one, never a partial file.

Both writers put the bytes in a temporary file of the target's folder (``mkstemp``: mode 0600
from creation, then the requested mode), fsync it, and publish it by one atomic directory
operation, then fsync the folder (POSIX: a new directory entry needs its own fsync):

- ``write_once``: ``os.link`` to the name, which fails if the name exists. The first writer
  wins; nothing is ever overwritten (secrets, sealed rosters, masked updates, key files).
- ``replace``: ``os.replace`` over the name (a rotated key file).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _temp_copy(path: Path, data: bytes, mode: int) -> str:
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode != 0o600:
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(temp)
        raise
    return temp


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_once(path: Path, data: bytes, *, mode: int) -> bool:
    """Publish ``data`` at ``path`` unless a file is already there. Returns False when ``path``
    existed: the first writer wins and the caller reads what it wrote."""
    temp = _temp_copy(path, data, mode)
    try:
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        fsync_folder(path.parent)
        return True
    finally:
        os.unlink(temp)


def replace(path: Path, data: bytes, *, mode: int) -> None:
    """Put ``data`` at ``path`` in one step, over whatever was there."""
    temp = _temp_copy(path, data, mode)
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    fsync_folder(path.parent)
