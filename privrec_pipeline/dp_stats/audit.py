"""Audit a DP statistics release with the DP tester (``privacy.dp_tester``), statistic by statistic.

Neighbouring days: ``silver`` and ``silver`` plus one user with all of their events. Each is
bounded once (Spark, as the release bounds it, at fixed K and T) and its noise is drawn
``runs`` times (``noise.add_noise``: the release's own PyDP mechanisms at the plan's epsilon
and sensitivity); the tester then bounds each statistic's epsilon from below, on the
statistic's released values (and the sum of those the added user moved: a bounding that does
not bind shows there), against the epsilon the ledger was told for it. Partition selection (without a catalog) is audited on which keys are released. A
broken release (sensitivity halved, bounding skipped) is refuted (``tests/test_dp_audit.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from privrec_pipeline.dp_stats.bounding import user_summary
from privrec_pipeline.dp_stats.noise import NoisyRelease, add_noise
from privrec_pipeline.dp_stats.params import DPStatsParams
from privrec_pipeline.privacy.dp_tester import LowerBound, epsilon_lower_bound
from privrec_pipeline.schema import EVENT_TYPES

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame


def _inputs(silver: "DataFrame", params: DPStatsParams, salt: str, catalog_items: "pa.Table | None",
            public: "DataFrame | None") -> dict[str, Any]:
    from privrec_pipeline.dp_stats.release import noise_inputs

    summary = user_summary(silver, params, max(params.max_items_upper, params.max_items_per_user) + 1,
                           max(params.max_category_events_upper, params.category_l1()) + 1, public)
    return noise_inputs(silver, params, salt, summary, catalog_items, public)


def outputs(noisy: NoisyRelease, items: list[str], categories: list[str]) -> dict[str, np.ndarray]:
    """Each statistic's released values in a fixed order (absent keys: 0; for partition
    selection, 1 where a key was released)."""
    rows = {r["item_id"]: r for r in noisy.items.to_pylist()}
    cats = {r["category"]: r for r in noisy.categories.to_pylist()}
    funnel = {r["event_type"]: r for r in noisy.funnel.to_pylist()}
    out = {
        "item_selection": [float(i in rows) for i in items],
        "item_users": [float((rows.get(i) or {}).get("users") or 0) for i in items],
        "item_events": [float((rows.get(i) or {}).get(t) or 0) for i in items for t in EVENT_TYPES],
        "funnel_users": [float((funnel.get(t) or {}).get("users") or 0) for t in EVENT_TYPES],
        "category_selection": [float(c in cats) for c in categories],
        "category_events": [float((cats.get(c) or {}).get("events") or 0) for c in categories],
        "purchase_price_sum": [float(noisy.purchases.get("noisy_price_sum_centred", 0.0))],
        "purchase_count": [float(noisy.purchases.get("noisy_purchases", 0))],
        "bounding_bias": [float(noisy.bounding.get("noisy_dropped", 0))],
        "category_bias": [float((noisy.bounding.get("category") or {}).get("noisy_dropped", 0))],
    }
    return {name: np.array(values) for name, values in out.items()}


def audit_release(silver: "DataFrame", neighbour: "DataFrame", params: DPStatsParams, runs: int, *,
                  salt: str = "audit", catalog_items: "pa.Table | None" = None, public: "DataFrame | None" = None,
                  confidence: float = 0.95) -> dict[str, LowerBound]:
    """The tester's lower bound for every statistic of ``params.plan()`` (bounds fixed: K, T as
    set; the bound choices are audited on their histograms, ``dp_tester.audit``)."""
    inputs = [_inputs(day, params, salt, catalog_items, public) for day in (silver, neighbour)]
    items = sorted({i for x in inputs for i in [*x["items"].column("item_id").to_pylist(), *(x["public_items"] or [])]
                    if i is not None})
    categories = sorted({c for x in inputs for c in x["categories"].column("category").to_pylist() if c is not None}
                        | set(params.public_categories))
    draws: list[dict[str, list[np.ndarray]]] = [{}, {}]
    for side, kwargs in enumerate(inputs):
        for _ in range(runs):
            for name, values in outputs(add_noise(**kwargs), items, categories).items():
                draws[side].setdefault(name, []).append(values)
    plan = params.plan()
    return {name: epsilon_lower_bound(np.array(draws[0][name]), np.array(draws[1][name]), budget.epsilon,
                                      budget.delta, confidence)
            for name, budget in plan.items() if name in draws[0]}
