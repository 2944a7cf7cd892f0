"""The DP tester on a whole DP statistics release (``dp_stats.audit``): neighbouring days bounded
by the release's Spark code, noise by its PyDP mechanisms, a lower bound per statistic. The
release as built is refuted on no statistic; with the item counts' sensitivity halved, or with
contribution bounding skipped, it is refuted on the item user counts."""

from __future__ import annotations

import pyarrow as pa
import pytest

from privrec_pipeline.dp_stats import audit as audit_module
from privrec_pipeline.dp_stats import bounding
from privrec_pipeline.dp_stats.params import DPStatsParams
from privrec_pipeline.schema import EVENT_TYPES

pytestmark = pytest.mark.spark

COLUMNS = ["event_id", "user_pseudonym", "item_id", "category", "event_type", "price"]
ITEMS = [f"item-{i}" for i in range(40)]
CATEGORIES = ("cat-0", "cat-1", "cat-2", "cat-3")
# K = 1 and L = 1: a user with one event moves one item count and one category count by the
# whole sensitivity, so the tester's bound on a correct release comes near the claimed epsilon.
PARAMS = DPStatsParams(epsilon=1.5, bounds="fixed", max_items_per_user=1, max_events_per_item=1,
                       max_categories_per_user=1, max_events_per_category=1, public_items=True,
                       public_categories=CATEGORIES)
RUNS = 1500  # per day; 4,000 where a factor 2 in epsilon must show (the halved noise)
CONFIDENCE = 0.9999  # a correct statistic is refuted with probability at most 1e-4


def _rows(users: int) -> list[tuple]:
    return [(f"e-{u}-{j}", f"{u:064x}", f"item-{(u + j) % 15}", CATEGORIES[j % 4], EVENT_TYPES[j % 4], 10.0)
            for u in range(users) for j in range(3)]


@pytest.fixture(scope="module")
def days(spark):
    catalog = pa.table({"item_id": ITEMS, "category": [CATEGORIES[i % 4] for i in range(40)]})
    public = spark.createDataFrame(catalog.to_pandas())
    base = spark.createDataFrame(_rows(30), COLUMNS)
    one_event = base.unionByName(spark.createDataFrame(
        [("a-1", "a" * 64, "item-30", "cat-2", "view", 5.0)], COLUMNS))
    heavy = base.unionByName(spark.createDataFrame(  # 25 items of their own
        [(f"h-{i}", "b" * 64, f"item-{15 + i}", CATEGORIES[i % 4], "view", 5.0) for i in range(25)], COLUMNS))
    return base, one_event, heavy, catalog, public


def _audit(base, neighbour, catalog, public, params=PARAMS, runs=RUNS):
    return audit_module.audit_release(base, neighbour, params, runs, catalog_items=catalog, public=public,
                                      confidence=CONFIDENCE)


def test_the_release_as_built_is_refuted_on_no_statistic(days):
    base, one_event, heavy, catalog, public = days
    for neighbour in (one_event, heavy):
        bounds = _audit(base, neighbour, catalog, public)
        assert set(bounds) == set(PARAMS.plan())
        refuted = {name: b.to_dict() for name, b in bounds.items() if b.refutes}
        assert not refuted, refuted
        if neighbour is one_event:  # the test has power: the user moves one item count by the full K = 1
            assert bounds["item_users"].epsilon_lower > 0.3 * PARAMS.plan()["item_users"].epsilon


class _HalvedItemNoise(DPStatsParams):
    def sensitivity(self, statistic: str) -> float:
        value = super().sensitivity(statistic)
        return value / 2 if statistic == "item_users" else value


def test_item_counts_with_half_the_noise_are_refuted(days):
    base, one_event, _, catalog, public = days
    broken = _HalvedItemNoise(**{k: getattr(PARAMS, k) for k in PARAMS.__dataclass_fields__})
    assert broken.plan()["item_users"].noise_scale == PARAMS.plan()["item_users"].noise_scale / 2
    bound = _audit(base, one_event, catalog, public, broken, runs=4000)["item_users"]
    assert bound.refutes, bound.to_dict()


def test_item_counts_without_contribution_bounding_are_refuted(days, monkeypatch):
    base, _, heavy, catalog, public = days
    scaled = bounding.scale_items

    def unbounded(silver, params):  # every item of a user counts 1, whatever K
        from pyspark.sql import functions as F

        return scaled(silver, params).withColumn("weight", F.lit(1.0))

    monkeypatch.setattr(bounding, "scale_items", unbounded)
    bound = _audit(base, heavy, catalog, public)["item_users"]
    assert bound.refutes, bound.to_dict()
