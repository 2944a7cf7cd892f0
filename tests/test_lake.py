"""The one lake abstraction (``privrec_pipeline.lake``) on a local folder and on an fsspec
back-end without renames (``memory://``, standing in for an object store): the same calls, the
guarantees each can give (atomic swaps locally, commit file last elsewhere)."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from upath import UPath

from privrec_pipeline import lake as lk

DAY = dt.date(2026, 1, 15)


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "lake")
    return f"memory://lake-{uuid.uuid4().hex[:8]}"


def test_paths_are_pathlib_paths_on_a_local_lake_and_fsspec_paths_elsewhere(tmp_path):
    local, uri = lk.path(str(tmp_path / "lake")), lk.path(f"file://{tmp_path}/lake")
    assert isinstance(local, Path) and lk.atomic(local) and local == uri == Path(tmp_path / "lake")
    remote = lk.path("memory://lake/x")
    assert not isinstance(remote, Path) and not lk.atomic(remote) and str(remote) == "memory://lake/x"
    assert lk.partition("memory://lake", "silver", DAY) == UPath("memory://lake/silver/interactions/dt=2026-01-15")
    assert lk.Lake(str(tmp_path)).atomic and not lk.Lake("memory://lake").atomic


def test_small_files_arrays_and_datasets_read_back_the_same_everywhere(root):
    folder = lk.path(root) / "zone"
    lk.write_json(folder / "doc.json", {"b": 1, "a": [1, 2]})
    assert lk.read_json(folder / "doc.json") == {"a": [1, 2], "b": 1}
    assert lk.read_json_if_exists(folder / "missing.json") is None
    lk.write_json(folder / "doc.json", {"replaced": True})  # replaced, not appended
    assert lk.read_json(folder / "doc.json") == {"replaced": True}
    lk.save_npz(folder / "state.npz", params=np.arange(5.0), m=np.ones(2))
    arrays = lk.load_npz(folder / "state.npz")
    assert np.array_equal(arrays["params"], np.arange(5.0)) and np.array_equal(arrays["m"], np.ones(2))
    table = pa.table({"x": [1, 2, 3]})
    for name in ("a.parquet", "b.parquet"):
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        lk.write_bytes(folder / "data" / name, buffer.getvalue().to_pybytes())
    assert sorted(lk.dataset(folder / "data", format="parquet").to_table().column("x").to_pylist()) == [1, 1, 2, 2, 3, 3]
    assert [f.name for f in lk.files(folder / "data")] == ["a.parquet", "b.parquet"]
    lk.remove(folder)
    assert not folder.exists() and lk.files(folder) == []


def test_a_file_is_written_once_and_never_replaced(root):
    target = lk.path(root) / "run" / "masked.npz"
    assert lk.write_once(target, b"first") is True
    assert lk.write_once(target, b"second") is False  # the first writer wins
    assert target.read_bytes() == b"first"


def test_a_partition_is_replaced_whole_and_a_failed_writer_changes_nothing(root):
    target = lk.partition(root, "catalog", DAY)
    with lk.replacing(target, last="_meta.json") as staging:
        (staging / "items.parquet").write_bytes(b"v1")
        (staging / "_meta.json").write_text("v1")
    with pytest.raises(RuntimeError), lk.replacing(target, last="_meta.json") as staging:
        (staging / "items.parquet").write_bytes(b"half")
        raise RuntimeError("killed while writing")
    assert (target / "items.parquet").read_bytes() == b"v1"
    with lk.replacing(target, last="_meta.json") as staging:
        (staging / "other.parquet").write_bytes(b"v2")
        (staging / "_meta.json").write_text("v2")
    assert sorted(f.name for f in target.iterdir()) == ["_meta.json", "other.parquet"]  # old files gone
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no staging folder left


def test_on_an_object_store_the_commit_file_is_written_after_every_other_file(monkeypatch):
    target = lk.partition(f"memory://lake-{uuid.uuid4().hex[:8]}", "dp_stats", DAY)
    order: list[str] = []
    real = UPath.write_bytes

    def recording(self, data):
        if str(self).startswith(str(target) + "/"):
            order.append(self.name)
        return real(self, data)

    monkeypatch.setattr(UPath, "write_bytes", recording)
    with lk.replacing(target, last="release.json") as staging:
        for name in ("release.json", "items.parquet", "report.html", "zz.parquet"):
            (staging / name).write_bytes(name.encode())
    assert order[-1] == "release.json" and sorted(order) == sorted(
        ["release.json", "items.parquet", "report.html", "zz.parquet"])


def test_the_jobs_lake_swaps_spark_output_in_with_stable_names(root):
    fs = lk.Lake(root)
    target = lk.partition_uri(root, "bronze", DAY)
    stage = fs.staging_uri(target)
    for name in ("part-00000-3f2a.c000.snappy.parquet", "part-00001-3f2a.c000.snappy.parquet", "_SUCCESS",
                 ".part-00000-3f2a.c000.snappy.parquet.crc"):
        lk.write_bytes(lk.path(stage) / name, name.encode())
    assert [f.uri.rsplit("/", 1)[1] for f in fs.list_files(stage)] == [
        "part-00000-3f2a.c000.snappy.parquet", "part-00001-3f2a.c000.snappy.parquet"]
    fs.commit_partition(stage, target)
    assert sorted(p.name for p in lk.path(target).iterdir()) == ["part-00000.c000.snappy.parquet",
                                                                  "part-00001.c000.snappy.parquet"]
    assert not fs.exists(stage)
    # A leftover of a killed attempt is removed when the next attempt stages.
    leftover = lk.path(fs.staging_uri(target)) / "part-x"
    lk.write_bytes(leftover, b"x")
    fs.staging_uri(target)
    assert not leftover.exists()
    fs.write_manifest(lk.manifest_uri(root, "collect", DAY), '{"step": "collect"}')
    assert lk.read_json(lk.path(lk.manifest_uri(root, "collect", DAY))) == {
        "step": "collect", "atomic_swaps": lk.is_local(root)}


def test_a_lake_uri_without_a_file_system_names_the_package_to_install():
    from privrec_pipeline.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"lake URI nosuchfs://bucket/lake: no file system for nosuchfs://"):
        lk.path("nosuchfs://bucket/lake")
