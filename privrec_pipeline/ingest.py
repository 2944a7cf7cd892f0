"""The collect and pseudonymize steps: extract -> transform -> load for one data interval.

Each step reads only its interval's partition, writes to hidden staging folders, checks its
record accounting, then swaps the partitions in and writes its manifest last. A rerun on the
same input produces the same partition contents (deterministic ordering, stable file names,
synthetic IVs).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from privrec_pipeline import lake as lk
from privrec_pipeline.crypto import key_frame
from privrec_pipeline.erasure import data_keys, lake_lock
from privrec_pipeline.erasure.collect_filter import ERASED, flag_erased
from privrec_pipeline.erasure.data_keys import DATA_KEY
from privrec_pipeline.erasure.requests import open_register
from privrec_pipeline.errors import ConfigurationError, LandingPartitionError, PrivrecError
from privrec_pipeline.manifest import CollectManifest, PseudonymizeManifest
from privrec_pipeline.schema import QUARANTINE_REASONS
from privrec_pipeline.secrets import KeyRing
from privrec_pipeline.transforms import collect as tc
from privrec_pipeline.transforms.pseudonymize import to_silver

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

BROADCAST_MAX_IDS = 2_000_000  # duplicated event ids up to this many are broadcast (~100 MB)
LANDING_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")


@dataclass(frozen=True)
class DataInterval:
    """One day in UTC: [start, end). Runs are keyed on it, never on the wall clock."""

    day: dt.date

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.combine(self.day, dt.time(), tzinfo=dt.UTC)

    @property
    def end(self) -> dt.datetime:
        return self.start + dt.timedelta(days=1)


def _write(df: "DataFrame", uri: str) -> None:
    """Write parquet without a shuffle: rows keep the deterministic order of the input
    (files are read in sorted order, one partition per split), so a rerun writes the same
    files with the same rows."""
    df.write.mode("overwrite").parquet(uri)


def _no_landing(day: dt.date, landing: str, problem: str) -> LandingPartitionError:
    return LandingPartitionError(
        f"landing partition for {day} {problem}: {landing} (use --allow-empty for a day without traffic)"
    )


UNKNOWN_ITEMS = ("quarantine", "keep")


def landing_files(lake: str, day: dt.date, *, allow_empty: bool = False) -> tuple[str, list]:
    """The day's landing partition and its data files; without ``allow_empty`` a missing
    partition, or one without data files, is a ``LandingPartitionError`` naming it."""
    fs = lk.Lake(lake)
    landing = lk.partition_uri(lake, "landing", day)
    exists = fs.exists(landing)
    files = [f for f in fs.list_files(landing) if f.uri.endswith(LANDING_SUFFIXES)] if exists else []
    if not allow_empty and not exists:
        raise _no_landing(day, landing, "not found (nothing arrived for this day?)")
    if not allow_empty and not files:
        raise _no_landing(day, landing, f"has no data files ({', '.join(LANDING_SUFFIXES)})")
    return landing, files


@lake_lock.step("collect")
def run_collect(spark: "SparkSession", lake: str, day: dt.date, keys: KeyRing, *,
                run_id: str = "manual", allow_empty: bool = False, unknown_items: str = "quarantine",
                per_user_keys: bool = True) -> CollectManifest:
    """landing/dt=D -> bronze/dt=D + quarantine/dt=D + _manifests/collect/dt=D.json.

    With a catalog in force for D, ``unknown_items="quarantine"`` quarantines records of items
    outside it (reason ``unknown_item``); ``"keep"`` keeps them (validate counts them, and the
    DP statistics leave them out). Without a catalog every item is accepted.

    Bronze identifiers and quarantined lines of a record with a user id are sealed under the
    user's data key (``erasure.data_keys``; crypto-shredding); ``per_user_keys=False`` keeps
    everything under the encryption key alone (the benchmark's single-key baseline)."""
    from pyspark.sql import functions as F

    from privrec_pipeline.catalog import read_items, snapshot_for

    if unknown_items not in UNKNOWN_ITEMS:
        raise ConfigurationError(f"unknown_items must be one of {UNKNOWN_ITEMS}, not {unknown_items!r}")

    fs = lk.Lake(lake)
    interval = DataInterval(day)
    landing, files = landing_files(lake, day, allow_empty=allow_empty)

    lines = spark.read.text([f.uri for f in files]) if files else spark.createDataFrame([], "value string")
    lines = lines.select("value", F.input_file_name().alias("source_file"))
    catalog = snapshot_for(lake, day)
    catalog_items = None
    if catalog is not None and unknown_items == "quarantine":
        catalog_items = spark.createDataFrame(read_items(catalog).select(["item_id"]).to_pandas())
    classified = tc.classify_landing(lines, interval.start, interval.end, catalog_items)
    register = open_register(lake)
    erasures = register.fingerprints()  # users who asked to be erased stay out
    if erasures:
        classified = flag_erased(spark, classified, keys, erasures)

    version = keys.encryption.version
    bronze_uri = lk.partition_uri(lake, "bronze", day)
    quarantine_uri = lk.partition_uri(lake, "quarantine", day)
    bronze_stage, quarantine_stage = fs.staging_uri(bronze_uri), fs.staging_uri(quarantine_uri)
    collected_stage = f"{bronze_stage}-collected"
    try:
        # The one pass over the landing files: parse, classify, encrypt, generalize.
        stored = tc.to_collected(classified, key_frame(spark, keys), version)
        if erasures:  # an erased user's record is only counted: every other column is null
            stored = stored.select(*[F.when(~F.col(ERASED), F.col(c)).alias(c) for c in stored.columns
                                     if c != ERASED], ERASED)
        _write(stored, collected_stage)
        # Everything else reads that parquet back: a few columns, no JSON.
        collected = spark.read.parquet(*[f.uri for f in fs.list_files(collected_stage)
                                         if f.uri.endswith(".parquet")])
        landing_records = collected.count()
        if landing_records == 0 and not allow_empty:
            raise _no_landing(day, landing, f"is empty (0 records in {len(files)} files)")
        # The day's users and their data keys (one column of the staged parquet; keys made for
        # new users), then records of users erased since collect started are dropped too.
        users, withheld = data_keys.user_keys(keys, register.data_keys, [
            r[0] for r in collected.where(data_keys.has_user(F.col("user_id"))).select("user_id").distinct().collect()
        ] if per_user_keys else [])
        if withheld:  # as data of a join, never literals of the plan
            gone = spark.createDataFrame([(u,) for u in withheld], "_withheld string")
            collected = collected.join(F.broadcast(gone), F.col("user_id") == F.col("_withheld"), "left")
            late = F.col("_withheld").isNotNull()
            collected = collected.withColumn(ERASED, (F.col(ERASED) | late) if erasures else late).drop("_withheld")
        erased = 0
        if erasures or withheld:
            erased = collected.where(F.col(ERASED)).count()
            collected = collected.where(~F.col(ERASED))
            if erased:
                log.warning("collect %s: dropped %d landing records of users who asked to be erased", day, erased)
        sealing = data_keys.key_frame(spark, users)

        def seal(rows: "DataFrame", column: str, context: str, suffix: "Column") -> "DataFrame":
            if not per_user_keys:
                return rows.withColumn(DATA_KEY, F.lit(None).cast("string"))
            return data_keys.seal(rows, sealing, {column: (context, suffix)},
                                  broadcast=len(users) <= data_keys.BROADCAST_MAX_KEYS)

        valid = collected.where(F.col("reason").isNull()).select(*[c for c in tc.BRONZE_COLUMNS if c != DATA_KEY])
        dup_ids = tc.duplicate_ids(valid.select("event_id")).persist()
        small = dup_ids.count() <= BROADCAST_MAX_IDS
        # Duplicates are dropped before sealing: the kept record is chosen on the inner
        # ciphertext, and only bronze's rows pay the second AES-GCM.
        _write(seal(tc.dedupe_events(valid, dup_ids, broadcast=small), "identifiers_enc", tc.IDENTIFIERS_CONTEXT,
                    F.col("event_id")).select(*tc.BRONZE_COLUMNS), bronze_stage)
        rejected = collected.where(F.col("reason").isNotNull()).select(
            "user_id", *[c for c in tc.QUARANTINE_COLUMNS if c != DATA_KEY])
        _write(seal(rejected, "raw_record_enc", tc.RAW_RECORD_CONTEXT, tc.raw_record_suffix())
               .select(*tc.QUARANTINE_COLUMNS), quarantine_stage)
        # Computed from the duplicate ids, independently of the dedupe that wrote bronze.
        duplicates = int(dup_ids.agg(F.coalesce(F.sum(F.col("count") - 1), F.lit(0))).first()[0])
        dup_ids.unpersist()
        # Counts come back from what was written, not from the plan that wrote it.
        bronze_records = spark.read.parquet(bronze_stage).count()
        by_reason = {r["reason"]: int(r["count"]) for r in
                     spark.read.parquet(quarantine_stage).groupBy("reason").count().collect()}
        manifest = CollectManifest(
            date=day.isoformat(), interval_start=interval.start.isoformat(),
            interval_end=interval.end.isoformat(), run_id=run_id, landing_uri=landing,
            landing_files=[{"uri": f.uri, "bytes": f.size} for f in files],
            landing_records=landing_records, bronze_records=bronze_records,
            quarantined={r: by_reason.get(r, 0) for r in QUARANTINE_REASONS},
            duplicates=duplicates, erased=erased, encryption_key_version=version,
            data_keys="per-user" if per_user_keys else "none",
            encryption_key_fingerprint=keys.encryption.fingerprint,
            bronze_uri=bronze_uri, quarantine_uri=quarantine_uri, allow_empty=allow_empty,
            unknown_items=unknown_items if catalog is not None else "keep",
            catalog={"day": catalog.day.isoformat(), "sha256": catalog.sha256} if catalog is not None else None,
        )
        manifest.check_balance()
        fs.commit_partition(bronze_stage, bronze_uri)
        fs.commit_partition(quarantine_stage, quarantine_uri)
    except BaseException:
        fs.delete(bronze_stage)
        fs.delete(quarantine_stage)
        raise
    finally:
        fs.delete(collected_stage)
    fs.write_manifest(lk.manifest_uri(lake, "collect", day), manifest.to_json())
    return manifest


def read_manifest(spark: "SparkSession", lake: str, step: str, day: dt.date) -> dict:
    fs = lk.Lake(lake)
    uri = lk.manifest_uri(lake, step, day)
    if not fs.exists(uri):
        raise PrivrecError(f"no {step} manifest for {day} ({uri}): run the {step} step for this date first")
    return json.loads(fs.read_text(uri))


@lake_lock.step("pseudonymize")
def run_pseudonymize(spark: "SparkSession", lake: str, day: dt.date, keys: KeyRing, *,
                     run_id: str = "manual") -> PseudonymizeManifest:
    """bronze/dt=D -> silver/dt=D + _manifests/pseudonymize/dt=D.json.

    A rerun under another pseudonym key legitimately replaces the day, with new pseudonyms: the
    manifest records the key's fingerprint, and build_partitions refuses to combine this day
    with days written under another key.
    """
    fs = lk.Lake(lake)
    manifest_uri = lk.manifest_uri(lake, "pseudonymize", day)
    collected = read_manifest(spark, lake, "collect", day)
    bronze_uri = lk.partition_uri(lake, "bronze", day)
    silver_uri = lk.partition_uri(lake, "silver", day)
    bronze = spark.read.parquet(bronze_uri)
    bronze_records = int(collected["bronze_records"])
    stage = fs.staging_uri(silver_uri)
    try:
        _write(to_silver(bronze, key_frame(spark, keys)), stage)
        written = spark.read.parquet(stage)
        manifest = PseudonymizeManifest(
            date=day.isoformat(), run_id=run_id, bronze_records=bronze_records,
            silver_records=written.count(), pseudonym_key_version=keys.pseudonym.version,
            pseudonym_key_fingerprint=keys.pseudonym.fingerprint, silver_uri=silver_uri, columns=written.columns,
        )
        manifest.check_balance()
        # The old manifest names the key of the old silver: it goes before the new silver comes,
        # so a crash in between leaves no manifest (readers refuse the day) rather than a wrong key.
        fs.delete(manifest_uri)
        fs.commit_partition(stage, silver_uri)
    except BaseException:
        fs.delete(stage)
        raise
    fs.write_manifest(manifest_uri, manifest.to_json())
    return manifest
