"""The lake through Hadoop's FileSystem API, so jobs work on any URI Spark can write
(local folder, file://, s3a://, gs://, abfs://).

``commit_partition`` gives the atomic-replace protocol of DESIGN.md on file systems with
atomic renames (local, HDFS). On object stores a rename is a copy: there the partition swap
is not atomic and production should move to a table format (noted in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class LakeFile:
    uri: str
    size: int


class LakeFS:
    """A thin wrapper over ``org.apache.hadoop.fs.FileSystem`` for one SparkSession."""

    def __init__(self, spark: "SparkSession") -> None:
        self._jvm: Any = spark.sparkContext._jvm
        self._conf: Any = spark.sparkContext._jsc.hadoopConfiguration()

    def _path(self, uri: str) -> tuple[Any, Any]:
        path = self._jvm.org.apache.hadoop.fs.Path(uri)
        return path.getFileSystem(self._conf), path

    def exists(self, uri: str) -> bool:
        fs, path = self._path(uri)
        return bool(fs.exists(path))

    def list_files(self, uri: str) -> list[LakeFile]:
        """Visible data files directly under ``uri`` (names starting with _ or . are hidden)."""
        fs, path = self._path(uri)
        out = []
        for status in fs.listStatus(path):
            name = status.getPath().getName()
            if status.isFile() and not name.startswith(("_", ".")):
                out.append(LakeFile(status.getPath().toString(), int(status.getLen())))
        return sorted(out, key=lambda f: f.uri)

    def delete(self, uri: str) -> None:
        fs, path = self._path(uri)
        fs.delete(path, True)

    def rename(self, src: str, dst: str) -> None:
        fs, src_path = self._path(src)
        _, dst_path = self._path(dst)
        if not fs.rename(src_path, dst_path):
            raise OSError(f"rename {src} -> {dst} failed")

    def mkdirs(self, uri: str) -> None:
        fs, path = self._path(uri)
        fs.mkdirs(path)

    def _text_path(self, uri: str) -> tuple[Any, Any]:
        """File system and path for small text files (manifests, summaries). On a local lake
        this is the raw file system: no ``.crc`` side files, so a file edited by hand (or by
        a tool) stays readable instead of failing Hadoop's checksum verification."""
        fs, path = self._path(uri)
        if fs.getScheme() == "file":
            fs = self._jvm.org.apache.hadoop.fs.FileSystem.getLocal(self._conf).getRawFileSystem()
        return fs, path

    def read_text(self, uri: str) -> str:
        fs, path = self._text_path(uri)
        stream = fs.open(path)
        try:
            reader = self._jvm.java.io.BufferedReader(self._jvm.java.io.InputStreamReader(stream, "UTF-8"))
            lines = []
            line = reader.readLine()
            while line is not None:
                lines.append(line)
                line = reader.readLine()
            return "\n".join(lines)
        finally:
            stream.close()

    def write_text_atomic(self, uri: str, text: str) -> None:
        """Write a small file (a manifest) via a hidden temporary name and a rename."""
        fs, path = self._text_path(uri)
        parent = path.getParent()
        fs.mkdirs(parent)
        tmp = self._jvm.org.apache.hadoop.fs.Path(parent, f"_tmp-{uuid.uuid4().hex}-{path.getName()}")
        out = fs.create(tmp, True)
        try:
            out.write(bytearray(text.encode("utf-8")))
        finally:
            out.close()
        if fs.exists(path):
            fs.delete(path, False)
        if not fs.rename(tmp, path):
            raise OSError(f"rename {tmp.toString()} -> {uri} failed")

    def staging_uri(self, target: str) -> str:
        """A hidden sibling of ``target`` to write into before ``commit_partition``.

        Leftovers of an earlier attempt at the same partition that was killed (staging or
        replaced folders) are removed first: one partition has one writer at a time.
        """
        parent, name = target.rstrip("/").rsplit("/", 1)
        fs, parent_path = self._path(parent)
        if fs.exists(parent_path):
            for status in fs.listStatus(parent_path):
                leftover = status.getPath().getName()
                if leftover.startswith((f"_staging-{name}-", f"_replaced-{name}-")):
                    fs.delete(status.getPath(), True)
        return f"{parent}/_staging-{name}-{uuid.uuid4().hex[:12]}"

    def commit_partition(self, staging: str, target: str) -> None:
        """Replace ``target`` by ``staging``: rename old aside, rename new in, delete old.

        Data files are renamed to stable names (``part-00000.<ext>``) so a rerun on the
        same input produces the same file names with the same rows (bytes may differ in the
        parquet footer, whose encoding lists parquet-mr writes in hash-set order).
        """
        fs, staging_path = self._path(staging)
        for status in fs.listStatus(staging_path):
            name = status.getPath().getName()
            if name.startswith(("_", ".")):
                fs.delete(status.getPath(), False)  # _SUCCESS and .crc files
            elif name.startswith("part-"):
                index, _, rest = name[len("part-"):].partition("-")
                ext = rest.split(".", 1)[1] if "." in rest else "data"
                stable = self._jvm.org.apache.hadoop.fs.Path(staging_path, f"part-{index}.{ext}")
                fs.rename(status.getPath(), stable)
        self.swap_in(staging, target)

    def swap_in(self, staging: str, target: str) -> None:
        """Replace the folder ``target`` by ``staging``: rename old aside, rename new in, delete old."""
        fs, staging_path = self._path(staging)
        _, target_path = self._path(target)
        fs.mkdirs(target_path.getParent())
        old = None
        if fs.exists(target_path):
            old = self._jvm.org.apache.hadoop.fs.Path(
                target_path.getParent(), f"_replaced-{target_path.getName()}-{uuid.uuid4().hex[:12]}"
            )
            if not fs.rename(target_path, old):
                raise OSError(f"could not move {target} aside")
        if not fs.rename(staging_path, target_path):
            if old is not None:
                fs.rename(old, target_path)
            raise OSError(f"could not move {staging} to {target}")
        if old is not None:
            fs.delete(old, True)

    def upload_dir(self, local_dir: str, uri: str) -> None:
        """Copy a local folder (e.g. a rendered report) to ``uri`` on the lake's file system."""
        fs, path = self._path(uri)
        src = self._jvm.org.apache.hadoop.fs.Path(f"file://{local_dir}")
        fs.copyFromLocalFile(False, True, src, path)
