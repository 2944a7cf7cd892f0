"""build_partitions: silver over a training window -> disjoint user shards + hold-out (Spark SQL).

Per user (the privacy unit), from the window's validated days:
- deduplicated items with an event-type weight (the strongest event on the item);
- restricted to the item vocabulary: the union of the items released by the window's
  dp_stats releases: with a catalog, every catalog item (public); without one, the items that
  passed DP partition selection (items nobody may learn about never get an embedding);
  optionally only the ``max_vocabulary`` items with the most noisy users;
- capped to the L most recent items (the per-user contribution bound of the training data);
- split by the evaluation protocol of DESIGN.md: users with at least 5 items give their
  last 20% (at least 1) by time as test items; only the rest is trained on;
- a share of users, chosen by a keyed hash of the pseudonym, is held out of training
  entirely (their histories serve evaluation as unseen users);
- the others are assigned to one of P partitions by a keyed hash of the pseudonym, so the
  partitions are disjoint and a user stays in the same partition every day.

Layout: ``training/dt=D/partition=K/`` (user_pseudonym, item_index, weight, position),
``training/dt=D/holdout/`` (user_pseudonym, item_index, role history|test, trained),
``training/dt=D/vocabulary/`` (item_index, item_id), and ``_manifests/build_partitions/dt=D.json``.
When the lake has a catalog for day D, the vocabulary also has ``category_index`` (the item's
catalog category; items the catalog does not list get the unknown category ``""``, which no
catalog category can be) and ``training/dt=D/categories/`` (category_index, category) names the
categories: the distinct categories of the vocabulary's items, sorted (public: the catalog).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from privrec_pipeline.erasure import lake_lock
from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.schema import EventType
from privrec_pipeline.settings import from_settings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

USER, ITEM = "user_pseudonym", "item_id"
# The strongest signal on an item counts (weights are relative; the loss normalizes them).
EVENT_WEIGHTS = {EventType.VIEW: 1.0, EventType.REMOVE_FROM_CART: 0.5, EventType.ADD_TO_CART: 2.0,
                 EventType.PURCHASE: 4.0, EventType.RATING: 2.0}
MIN_ITEMS, TEST_SHARE = 5, 0.2  # DESIGN.md evaluation protocol
UNKNOWN_CATEGORY = ""  # items outside the catalog (a catalog category is never empty)
CATEGORIES_FOLDER = "categories"  # training/dt=D/categories/ (read by training.data.read_vocabulary)


@dataclass(frozen=True)
class PartitionParams:
    window_days: int = 7
    """Days of silver ending at the run's day."""
    partitions: int = 2
    max_items_per_user: int = 200
    """L: the most recent items of a user kept for training and evaluation."""
    holdout_user_share: float = 0.1
    """Share of users kept out of training entirely (evaluated as unseen users)."""
    max_vocabulary: int = 0
    """N: train on the N items with the most (noisy, DP-released) users of the window; 0: every
    released item (with a catalog: the whole catalog). For very large catalogs."""

    def __post_init__(self) -> None:
        if self.max_vocabulary < 0:
            raise ConfigurationError(f"PartitionParams: max_vocabulary must be 0 (all) or positive, not "
                                     f"{self.max_vocabulary}")
        for name in ("window_days", "partitions", "max_items_per_user"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"PartitionParams: {name} must be positive, not {getattr(self, name)}")
        if not 0 <= self.holdout_user_share < 1:
            raise ConfigurationError(
                f"PartitionParams: holdout_user_share must be in [0, 1), not {self.holdout_user_share}")

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "PartitionParams":
        return from_settings(cls, settings, "training data setting")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def window(self, day: dt.date) -> list[dt.date]:
        return [day - dt.timedelta(days=i) for i in range(self.window_days - 1, -1, -1)]


def user_items(silver: "DataFrame", vocabulary: "DataFrame", params: PartitionParams) -> "DataFrame":
    """One row per kept (user, item): item_index, weight, position (1 = oldest), n (items of
    the user), role (train | test), holdout_user, partition."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    weight = F.lit(0.0)
    for event_type, w in EVENT_WEIGHTS.items():
        weight = F.when(F.col("event_type") == str(event_type), F.lit(w)).otherwise(weight)
    per = (silver.where(F.col(USER).isNotNull() & F.col(ITEM).isNotNull())
           .groupBy(USER, ITEM).agg(F.max(weight).alias("weight"), F.min("event_time").alias("first_time"))
           .where(F.col("weight") > 0)
           .join(F.broadcast(vocabulary), ITEM))
    newest = Window.partitionBy(USER).orderBy(F.col("first_time").desc(), F.col(ITEM))
    recent = per.withColumn("recency", F.row_number().over(newest)).where(F.col("recency") <= params.max_items_per_user)
    user = Window.partitionBy(USER)
    oldest = Window.partitionBy(USER).orderBy("first_time", ITEM)
    n = F.count(F.lit(1)).over(user)
    n_test = F.when(n >= MIN_ITEMS, F.greatest(F.lit(1), F.floor(n * TEST_SHARE))).otherwise(F.lit(0))
    holdout_bucket = F.pmod(F.xxhash64(F.lit("privrec-holdout"), F.col(USER)), F.lit(10_000))
    return recent.select(
        USER, ITEM, "item_index", "weight",
        F.row_number().over(oldest).alias("position"), n.alias("n"),
        F.when(F.row_number().over(oldest) > n - n_test, "test").otherwise("train").alias("role"),
        (holdout_bucket < F.lit(int(params.holdout_user_share * 10_000))).alias("holdout_user"),
        F.pmod(F.xxhash64(F.lit("privrec-partition"), F.col(USER)), F.lit(params.partitions)).cast("int")
        .alias("partition"),
    )


def vocabulary_items(spark: "SparkSession", vocab_files: list[str], limit: int) -> list[str]:
    """The window's released items (with a catalog: the catalog), sorted, so the same releases
    give the same indices; with ``limit`` only the ``limit`` with the most noisy users summed
    over the window's releases (DP values: post-processing)."""
    from pyspark.sql import functions as F

    released = spark.read.parquet(*vocab_files)
    if limit:
        top = (released.groupBy(ITEM).agg(F.sum(F.coalesce(F.col("users"), F.lit(0))).alias("users"))
               .orderBy(F.col("users").desc(), F.col(ITEM)).limit(limit))
        return sorted(r[0] for r in top.select(ITEM).collect())
    return sorted(r[0] for r in released.select(ITEM).distinct().collect())


def item_categories(lake: str, day: dt.date, items: list[str]) -> tuple[list[str], list[int]] | None:
    """(category names, category index of each of ``items``) from the catalog in force on ``day``
    (None: the lake has no catalog then). Names: the distinct categories of ``items``, sorted;
    an item the catalog does not list is in ``UNKNOWN_CATEGORY``."""
    from privrec_pipeline.catalog import read_items, snapshot_for

    snapshot = snapshot_for(lake, day)
    if snapshot is None:
        return None
    table = read_items(snapshot)
    catalog = dict(zip(table.column("item_id").to_pylist(), table.column("category").to_pylist(), strict=True))
    of_item = [catalog.get(item, UNKNOWN_CATEGORY) for item in items]
    names = sorted(set(of_item))
    index = {name: i for i, name in enumerate(names)}
    return names, [index[name] for name in of_item]


def no_items_message(fs: Any, lake: str, days: list[dt.date], window: list[dt.date]) -> str:
    """Why the window has no item to train on, from its DP releases (public or DP numbers only)."""
    import json

    from privrec_pipeline.dp_stats.release import RELEASE_FILE, dp_stats_uri

    reasons = []
    for d in days:
        uri = f"{dp_stats_uri(lake, d)}/{RELEASE_FILE}"
        if not fs.exists(uri):
            continue
        doc = json.loads(fs.read_text(uri))
        selection = doc.get("statistics", {}).get("item_selection") or {}
        built = selection.get("as_built") or {}
        if selection:
            needed = built.get("users_for_half_keep")
            reasons.append(f"{d}: 0 items passed DP partition selection at epsilon {selection['epsilon']:.3g}"
                           + (f" (an item needs about {needed:,} users for an even chance)" if needed else ""))
        else:
            reasons.append(f"{d}: release {doc.get('release_id')} holds no item")
    from privrec_pipeline.catalog import snapshot_for

    catalog = ("the releases did not use the lake's catalog (dp_settings use_catalog is off)"
               if snapshot_for(lake, days[-1]) is not None else "the lake has no item catalog for these days")
    return (f"no item to train on in {window[0]}..{window[-1]}: " + "; ".join(reasons or ["no release"])
            + f". Without a catalog, items must pass partition selection ({catalog}): load the shop's catalog "
              "(privrec catalog load) to release every catalog item, raise dp_epsilon, or use days with more users")


@dataclass(frozen=True)
class PartitionsManifest:
    date: str
    run_id: str
    window: list[str]
    days_used: list[str]
    releases: list[int]
    vocabulary_size: int
    partitions: dict[str, dict[str, int]]  # partition -> users, items
    holdout: dict[str, int]
    params: dict[str, Any]
    uri: str
    pseudonym_key_fingerprint: str
    """The one pseudonym key of every day used (``secrets.key_fingerprint``), for the ledger."""
    categories: int = 0
    """Item categories of the vocabulary (from the catalog; 0: no catalog, no category_index)."""

    def to_json(self) -> str:
        import json

        return json.dumps(asdict(self), indent=2, sort_keys=True)


def training_uri(lake: str, day: dt.date) -> str:
    from privrec_pipeline import lake as lk

    return lk.partition_uri(lake, "training", day)


@lake_lock.step("build_partitions")
def run_build_partitions(spark: Any, lake: str, day: dt.date, params: PartitionParams, *,
                         run_id: str = "manual") -> PartitionsManifest:
    """silver of the window -> training/dt=D/ (shards, hold-out, vocabulary) + manifest."""
    import json

    from pyspark.sql import functions as F

    from privrec_pipeline import lake as lk
    from privrec_pipeline.dp_stats.release import RELEASE_FILE, dp_stats_uri
    from privrec_pipeline.errors import PrivrecError
    from privrec_pipeline.manifest import window_pseudonym_fingerprint
    from privrec_pipeline.quality.validate import SUMMARY_FILE, report_uri

    fs = lk.Lake(lake)
    window = params.window(day)
    days, releases, vocab_files = [], [], []
    for d in window:
        summary = f"{report_uri(lake, d)}/{SUMMARY_FILE}"
        if not fs.exists(summary) or json.loads(fs.read_text(summary)).get("gate") != "passed":
            continue  # a day that was not validated (or failed) is not trained on
        days.append(d)
        release = f"{dp_stats_uri(lake, d)}/{RELEASE_FILE}"
        if fs.exists(release):
            releases.append(int(json.loads(fs.read_text(release))["release_id"]))
            vocab_files.append(f"{dp_stats_uri(lake, d)}/items.parquet")
    if not days:
        raise PrivrecError(f"no validated day in the training window {window[0]}..{window[-1]}: nothing to train on")
    # One user must be one pseudonym across the window: a window over two pseudonym keys (a
    # rotation, a recreated key file, a worker with its own file: all may be labelled v1)
    # counts one person as several users, each clipped on its own. Keys are compared by
    # fingerprint; the error names the days of each key.
    fingerprint = window_pseudonym_fingerprint(fs, lake, days, f"the training window {window[0]}..{window[-1]}")
    if not vocab_files:
        raise PrivrecError(f"no DP statistics release in the training window {window[0]}..{window[-1]}: there is no "
                           "DP item vocabulary (run dp_stats for these days first)")
    items = vocabulary_items(spark, vocab_files, params.max_vocabulary)
    if not items:
        raise PrivrecError(no_items_message(fs, lake, days, window))
    categories = item_categories(lake, day, items)
    if categories is None:
        vocabulary = spark.createDataFrame([(item, i) for i, item in enumerate(items)],
                                           "item_id string, item_index long")
    else:
        vocabulary = spark.createDataFrame([(item, i, c) for i, (item, c) in enumerate(zip(items, categories[1],
                                                                                            strict=True))],
                                           "item_id string, item_index long, category_index long")
    silver = spark.read.parquet(*[lk.partition_uri(lake, "silver", d) for d in days])
    rows = user_items(silver, vocabulary, params).persist()
    target = training_uri(lake, day)
    stage = fs.staging_uri(target)
    try:
        train = rows.where((F.col("role") == "train") & ~F.col("holdout_user"))
        train.select("partition", USER, "item_index", "weight", "position").repartition("partition") \
            .write.partitionBy("partition").parquet(stage)
        rows.where(F.col("n") >= MIN_ITEMS).select(
            USER, "item_index", "weight", "position",
            F.when(F.col("role") == "test", "test").otherwise("history").alias("role"),
            (~F.col("holdout_user")).alias("trained"),
        ).write.parquet(f"{stage}/holdout")
        vocabulary.coalesce(1).write.parquet(f"{stage}/vocabulary")
        if categories is not None:
            spark.createDataFrame(list(enumerate(categories[0])), "category_index long, category string") \
                .coalesce(1).write.parquet(f"{stage}/{CATEGORIES_FOLDER}")
        per_partition = {str(r["partition"]): {"users": int(r["users"]), "items": int(r["items"])} for r in
                         train.groupBy("partition").agg(F.countDistinct(USER).alias("users"),
                                                        F.count(F.lit(1)).alias("items")).collect()}
        missing = [k for k in range(params.partitions) if str(k) not in per_partition]
        if missing:
            raise PrivrecError(
                f"too few users for {params.partitions} training partitions in {window[0]}..{window[-1]}: "
                f"partition(s) {missing} hold no user with an item of the vocabulary ({len(items):,} items). Use fewer "
                "partitions (PRIVREC_TRAIN_PARTITIONS, at least 2), a longer window (train_window_days) or more data")
        held = rows.where(F.col("n") >= MIN_ITEMS).agg(
            F.countDistinct(F.when(F.col("holdout_user"), F.col(USER))).alias("held_out_users"),
            F.countDistinct(F.when(~F.col("holdout_user"), F.col(USER))).alias("evaluated_training_users")).first()
        manifest = PartitionsManifest(
            date=day.isoformat(), run_id=run_id, window=[d.isoformat() for d in window],
            days_used=[d.isoformat() for d in days], releases=releases, vocabulary_size=vocabulary.count(),
            partitions=dict(sorted(per_partition.items())), holdout={k: int(held[k]) for k in held.asDict()},
            params=params.to_dict(), uri=target, pseudonym_key_fingerprint=fingerprint,
            categories=len(categories[0]) if categories is not None else 0)
        fs.swap_in(stage, target)
    except BaseException:
        fs.delete(stage)
        raise
    finally:
        rows.unpersist()
    fs.write_manifest(lk.manifest_uri(lake, "build_partitions", day), manifest.to_json())
    return manifest
