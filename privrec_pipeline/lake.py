"""The lake: its layout (DESIGN.md "Lake layout") and every file operation on it, for every URI.

One abstraction for the Python side and the jobs' driver code alike: paths are
``upath.UPath`` objects over fsspec file systems (universal_pathlib, the path type of
Airflow's object storage), so a lake is a local folder, a ``file://`` URI, or any URI fsspec
knows (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``memory://``; the backend's package must
be installed). Spark reads and writes DataFrames by the same URIs; nothing goes through the
JVM gateway. A local lake's paths are ``pathlib.Path`` objects (``PosixUPath``).

Every zone is partitioned by ``dt=YYYY-MM-DD``. A writer never writes into the visible
partition: it writes a hidden staging folder (leading underscore, ignored by Spark readers)
and swaps it in, so a killed task leaves no half-written partition visible.

Atomicity by kind of file system (``Lake.atomic``):

- **Local and file://** (and any POSIX mount): a swap is two directory renames (old aside,
  new in), a small file is written to a temporary name, fsynced and renamed over the target,
  and a write-once file is published with ``link`` (``durable_files``): readers see the old
  state or the new one.
- **Object stores and other fsspec back-ends**: there is no atomic rename of a folder. A swap
  copies the staging files into the target, **its commit file last** (the manifest-last rule:
  readers decide on the commit file — ``model_card.json``, ``training.json``, ``LATEST``, a
  step's manifest in ``_manifests`` — which exists only once everything before it is written),
  and the previous files are removed first, so a reader can see a partition with no commit
  file (treated as absent) but never a commit file over missing data. A single small object is
  written by one PUT (atomic per object). Write-once files are checked then written: two
  writers racing within that window can both write (the partition workers' notes outside the
  lake are what refuse a replaced masked update). Every step manifest records
  ``"atomic_swaps"`` so a reader of the lake knows which guarantee held.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from upath import UPath

if TYPE_CHECKING:
    import numpy as np
    import pyarrow.dataset as ds

ZONES = {
    "landing": "landing/interactions",
    "bronze": "bronze/interactions",
    "quarantine": "quarantine/interactions",
    "silver": "silver/interactions",
    "manifests": "_manifests",
    "reports": "reports/quality",
    "dp_stats": "gold/dp_stats",
    "training": "training",
    "candidates": "models/_candidates",
    "models": "models",  # published versions: models/<name>/<version>/ and models/<name>/LATEST
    "audits": "reports/audits",  # on-demand audits (``audits.py``): public results only
    "catalog": "catalog/items",  # public input: dt=D is the catalog from day D on (catalog.py)
    # Per-user outputs (recommendations keyed by user pseudonym): restricted like silver, never in
    # the published model folder, kept for SERVING_RETENTION_DAYS (models/batch.py).
    "serving": "serving/recommendations",
}


def partition_name(day: dt.date) -> str:
    return f"dt={day.isoformat()}"


def zone_uri(lake: str, zone: str) -> str:
    return f"{lake.rstrip('/')}/{ZONES[zone]}"


def partition_uri(lake: str, zone: str, day: dt.date) -> str:
    return f"{zone_uri(lake, zone)}/{partition_name(day)}"


def manifest_uri(lake: str, step: str, day: dt.date) -> str:
    return f"{zone_uri(lake, 'manifests')}/{step}/{partition_name(day)}.json"


def is_local(uri: str) -> bool:
    """A folder or a ``file://`` URI (POSIX renames), as opposed to an fsspec back-end."""
    return uri.startswith("file://") or "://" not in uri


def path(uri: str | os.PathLike[str]) -> UPath:
    """The lake path of ``uri``: a ``pathlib.Path`` (``PosixUPath``) for a folder or ``file://``
    URI, an fsspec-backed ``UPath`` for any other scheme."""
    if isinstance(uri, UPath):
        return uri
    text = os.fspath(uri)
    if is_local(text):
        return UPath(text.removeprefix("file://"))
    try:
        return UPath(text)
    except (ImportError, ValueError) as error:
        from privrec_pipeline.errors import ConfigurationError

        scheme = text.split("://", 1)[0]
        raise ConfigurationError(
            f"lake URI {text}: no file system for {scheme}:// ({error}); install its fsspec package on every "
            "worker (e.g. s3fs for s3:// and s3a://, gcsfs for gs://, adlfs for abfs://)") from None


def partition(lake: str, zone: str, day: dt.date) -> UPath:
    """The lake path of a zone's partition of ``day``."""
    return path(partition_uri(lake, zone, day))


def atomic(p: UPath) -> bool:
    """Whether renames and links on ``p``'s file system are atomic (a POSIX folder)."""
    return isinstance(p, Path)


# ---- small files ----------------------------------------------------------------------------

def write_bytes(p: UPath, data: bytes, *, mode: int = 0o644) -> None:
    """Replace the file ``p`` by ``data`` in one step (local: temp file, fsync, rename; object
    stores: one PUT)."""
    if atomic(p):
        from privrec_pipeline.durable_files import replace

        p.parent.mkdir(parents=True, exist_ok=True)
        replace(Path(p), data, mode=mode)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def write_text(p: UPath, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def write_json(p: UPath, doc: Any) -> None:
    write_text(p, json.dumps(doc, indent=2, sort_keys=True))


def read_json(p: UPath) -> Any:
    return json.loads(p.read_text(encoding="utf-8"))


def read_json_if_exists(p: UPath) -> Any | None:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def write_once(p: UPath, data: bytes, *, mode: int = 0o644) -> bool:
    """Publish ``data`` at ``p`` unless a file is there (False: the first writer won). Atomic on a
    local lake (``durable_files.write_once``); checked then written elsewhere (see the module)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    if atomic(p):
        from privrec_pipeline.durable_files import write_once as durable_write_once

        return durable_write_once(Path(p), data, mode=mode)
    if p.exists():
        return False
    p.write_bytes(data)
    return True


def save_npz(p: UPath, **arrays: "np.ndarray") -> None:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(p, buffer.getvalue())


def load_npz(p: UPath) -> dict[str, "np.ndarray"]:
    """The arrays of an ``.npz`` file (read whole: no file handle stays open)."""
    import numpy as np

    with np.load(io.BytesIO(p.read_bytes())) as npz:
        return {name: npz[name] for name in npz.files}


def dataset(p: UPath, **kwargs: Any) -> "ds.Dataset":
    """A pyarrow dataset over the folder or file ``p`` on its own file system."""
    import pyarrow.dataset as ds

    if atomic(p):
        return ds.dataset(str(p), **kwargs)
    return ds.dataset(p.path, filesystem=p.fs, **kwargs)


# ---- folders --------------------------------------------------------------------------------

def remove(p: UPath) -> None:
    """Delete the file or folder ``p`` (nothing if it is absent)."""
    if atomic(p):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            Path(p).unlink(missing_ok=True)
        return
    if p.exists():
        p.fs.rm(p.path, recursive=True)


def files(folder: UPath) -> list[UPath]:
    """Every file under ``folder``, in sorted order (recursively)."""
    if not folder.exists():
        return []
    return sorted((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.as_posix())


def copy_folder(source: Path | UPath, target: Path | UPath, *, last: str | None = None,
                skip: tuple[str, ...] = ()) -> None:
    """Copy every file of ``source`` under ``target`` (same relative paths; any two file systems),
    ``last`` after all others, files named in ``skip`` left out."""
    entries = [f for f in files(source) if f.name not in skip]
    entries.sort(key=lambda f: (f.relative_to(source).as_posix() == last, f.as_posix()))
    for f in entries:
        dest = target / f.relative_to(source).as_posix()
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())


def swap_folder(staging: UPath, target: UPath, *, last: str | None = None) -> None:
    """Replace the folder ``target`` by ``staging`` (on the same lake). Local: rename the old
    folder aside, the new one in, delete the old one. Elsewhere: delete the old files, copy the
    new ones with ``last`` (the folder's commit file) last, delete the staging folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if atomic(target):
        old = target.parent / f"_replaced-{target.name}-{uuid.uuid4().hex[:12]}"
        if target.exists():
            target.rename(old)
        try:
            staging.rename(target)
        except BaseException:
            if old.exists():
                old.rename(target)
            raise
        remove(old)
        return
    remove(target)
    copy_folder(staging, target, last=last)
    remove(staging)


def upload_folder(local_dir: Path, target: UPath, *, last: str | None = None) -> None:
    """Copy a local folder (a rendered report, a model) to ``target`` on the lake: a folder
    that did not exist there before (a staging folder)."""
    if atomic(target):
        shutil.copytree(local_dir, target, dirs_exist_ok=True)
        return
    copy_folder(local_dir, target, last=last)


def staging_for(target: UPath) -> UPath:
    """A hidden sibling of ``target`` to write into before ``swap_folder``. Leftovers of an
    earlier attempt at the same partition that was killed are removed first: one partition has
    one writer at a time."""
    parent = target.parent
    if parent.exists():
        for leftover in parent.iterdir():
            if leftover.name.startswith((f"_staging-{target.name}-", f"_replaced-{target.name}-")):
                remove(leftover)
    return parent / f"_staging-{target.name}-{uuid.uuid4().hex[:12]}"


@contextmanager
def replacing(target: UPath, *, last: str | None = None) -> Iterator[Path]:
    """Context manager yielding a local folder whose contents replace ``target`` on success
    (atomically on a local lake, commit file ``last`` last elsewhere). On error nothing
    changes and the staging folder is removed."""
    if atomic(target):
        staging = staging_for(target)
        staging.mkdir(parents=True)
        try:
            yield Path(staging)
            swap_folder(staging, target)
        except BaseException:
            remove(staging)
            raise
        return
    with tempfile.TemporaryDirectory(prefix="privrec-stage-") as local:
        yield Path(local)
        remove(target)  # no rename to stage behind: the old files go, the new come, ``last`` last
        copy_folder(Path(local), target, last=last)


# ---- the lake by URI (the jobs' driver code) -----------------------------------------------

@dataclass(frozen=True)
class LakeFile:
    uri: str
    size: int


class Lake:
    """File operations by URI for the jobs' driver code (Spark writes the data by the same URIs)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.root = path(uri)

    @property
    def atomic(self) -> bool:
        return atomic(self.root)

    def exists(self, uri: str) -> bool:
        return path(uri).exists()

    def list_files(self, uri: str) -> list[LakeFile]:
        """Visible data files directly under ``uri`` (names starting with _ or . are hidden)."""
        folder = path(uri)
        out = [LakeFile(_uri_of(uri, f.name), f.stat().st_size) for f in folder.iterdir()
               if f.is_file() and not f.name.startswith(("_", "."))]
        return sorted(out, key=lambda f: f.uri)

    def delete(self, uri: str) -> None:
        remove(path(uri))

    def read_text(self, uri: str) -> str:
        return path(uri).read_text(encoding="utf-8")

    def write_manifest(self, uri: str, text: str) -> None:
        """A step's manifest (its commit file, JSON ``text``), with whether the lake's swaps were atomic."""
        write_json(path(uri), {**json.loads(text), "atomic_swaps": self.atomic})

    def staging_uri(self, target: str) -> str:
        return _uri_of(target.rstrip("/").rsplit("/", 1)[0], staging_for(path(target)).name)

    def commit_partition(self, staging: str, target: str) -> None:
        """Replace ``target`` by ``staging`` (a Spark output folder): Spark's side files go and the
        data files get stable names (``part-00000.<ext>``), so a rerun on the same input produces
        the same file names with the same rows; then the folders are swapped."""
        folder = path(staging)
        for f in list(folder.iterdir()):
            name = f.name
            if name.startswith(("_", ".")):
                remove(f)  # _SUCCESS and .crc files
            elif name.startswith("part-"):
                index, _, rest = name[len("part-"):].partition("-")
                ext = rest.split(".", 1)[1] if "." in rest else "data"
                f.rename(folder / f"part-{index}.{ext}")
        self.swap_in(staging, target)

    def swap_in(self, staging: str, target: str, *, last: str | None = None) -> None:
        swap_folder(path(staging), path(target), last=last)

    def upload_dir(self, local_dir: str, uri: str, *, last: str | None = None) -> None:
        upload_folder(Path(local_dir), path(uri), last=last)


def _uri_of(parent: str, name: str) -> str:
    return f"{parent.rstrip('/')}/{name}"
