"""Noise and partition selection on the bounded aggregates (PyDP, in the driver).

Input: the bounded aggregates as Arrow tables (one row per candidate key). Output: the
released tables, which hold only DP values: keys kept by partition selection, noisy counts
(rounded, clamped at 0: post-processing), and confidence intervals from PyDP. Nothing
exact leaves this module, not even how many candidate keys there were.

With public keys (scaled bounds, ``dp_stats.bounding``) each count also gets an estimate of
the unbounded count: the noisy count divided by the kept share, kept / (kept + dropped), where
kept is the sum of the noisy counts and dropped the noisy dropped count of ``bounding_bias``
(``category_bias``): a function of DP values only (post-processing, no budget). Its intervals
are not given: the confidence intervals cover the bounded counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from privrec_pipeline.dp_stats.params import DPStatsParams, StatisticBudget
from privrec_pipeline.privacy.mechanisms import LaplaceNoise, PartitionSelection
from privrec_pipeline.schema import EVENT_TYPES

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class NoisyRelease:
    items: "pa.Table"  # item_id, users, users_low, users_high, users_estimate, <type>..., ordered by noisy users
    funnel: "pa.Table"  # event_type, users, users_low, users_high
    categories: "pa.Table"  # category, events, events_low, events_high, events_estimate
    purchases: dict[str, Any]  # mean price and its noisy parts (empty when not released)
    bounding: dict[str, Any]  # K, L and the noisy shares of contributions they dropped (empty when not released)
    mechanisms: dict[str, dict[str, Any]]  # statistic -> PyDP mechanism description


def _laplace(budget: StatisticBudget, params: DPStatsParams) -> LaplaceNoise:
    return LaplaceNoise(budget.epsilon, budget.sensitivity, params.confidence_level)


def _selection(budget: StatisticBudget, params: DPStatsParams) -> PartitionSelection:
    return PartitionSelection(budget.epsilon, budget.delta, int(budget.sensitivity), params.selection_strategy)


def _noisy(noise: LaplaceNoise, value: float) -> int:
    """An integer count with noise: PyDP's integer path for whole values (truncated bounds),
    its real-valued one rounded for the fractional sums of scaled bounds."""
    return noise.count(int(value)) if isinstance(value, int) else round(noise.sum(float(value)))


def _count_with_interval(noise: LaplaceNoise, value: float) -> tuple[int, int, int, int]:
    """(noisy clamped at 0, interval low, interval high, noisy before the clamp)."""
    noisy = _noisy(noise, value)
    return max(noisy, 0), max(round(noisy - noise.half_width), 0), max(round(noisy + noise.half_width), 0), noisy


def kept_share(noisy_kept: float, noisy_dropped: float, cap: float) -> float | None:
    """kept / (kept + dropped) from the noisy sum of the bounded counts and the noisy dropped
    count, in [1 / cap, 1] (``cap`` = B / K: a user with n <= B contributions keeps at least K / B
    of them); None when the noisy kept sum is not positive (nothing to divide)."""
    if noisy_kept <= 0:
        return None
    return min(max(noisy_kept / (noisy_kept + max(noisy_dropped, 0)), 1.0 / cap), 1.0)


def _bias(name: str, budget: StatisticBudget, params: DPStatsParams, dropped: int, noisy_kept: float | None,
          cap: int, bound: int, mechanisms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The noisy dropped count of ``name`` and the share it is of all contributions."""
    noise = _laplace(budget, params)
    mechanisms[name] = noise.describe()
    noisy_dropped = noise.count(int(dropped))
    share = None if noisy_kept is None else kept_share(noisy_kept, noisy_dropped, cap / bound)
    return {"noisy_dropped": max(noisy_dropped, 0), "dropped_share": None if share is None else 1.0 - share,
            "kept_share": share, "epsilon": budget.epsilon, "clamp": cap}


def _selected(keys: list[Any], users: list[int], selection: PartitionSelection) -> list[int]:
    return [i for i, (key, n) in enumerate(zip(keys, users, strict=True)) if key is not None and selection.keep(n)]


def _public_keys(table: "pa.Table", key: str, public: list[str], columns: list[str]) -> "pa.Table":
    """One row per public key, in the given order: its bounded values, 0 where it had none
    (a public key is released whether or not anybody contributed to it); keys outside the
    list are left out (PipelineDP's public partitions)."""
    import pyarrow as pa

    observed = {row[key]: row for row in table.select([key, *columns]).to_pylist()}
    return pa.table({key: pa.array(public, pa.string()),
                     **{c: pa.array([float((observed.get(k) or {}).get(c) or 0) for k in public], pa.float64())
                        for c in columns}})


def add_noise(items: "pa.Table", funnel: "pa.Table", categories: "pa.Table", purchases: "pa.Table",
              params: DPStatsParams, public_items: list[str] | None = None,
              dropped: int | None = None, category_dropped: int | None = None) -> NoisyRelease:
    """Select keys and add noise, each statistic with its share of the release's budget.
    ``public_items`` (with ``params.public_items``): the catalog's items, every one released.
    ``dropped``: the (user, item) contributions bounding dropped, each user's items clamped to
    ``params.bias_cap()`` (needed when the plan has ``bounding_bias``); ``category_dropped``:
    the category events it dropped, each user's clamped to ``params.category_bias_cap()``
    (needed when the plan has ``category_bias``)."""
    import pyarrow as pa

    plan = params.plan()
    mechanisms: dict[str, dict[str, Any]] = {}
    kinds = {"users": pa.int64(), "users_low": pa.int64(), "users_high": pa.int64()}

    item_cols: dict[str, list[Any]] = {"item_id": [], **{k: [] for k in kinds}, **{t: [] for t in EVENT_TYPES}}
    if ("bounding_bias" in plan) != (dropped is not None):
        raise ValueError("add_noise: dropped is the bounding's dropped count exactly when bounding_bias is planned")
    if ("category_bias" in plan) != (category_dropped is not None):
        raise ValueError("add_noise: category_dropped is given exactly when category_bias is planned")
    noisy_kept: int | None = None  # sum of the noisy (unclamped) item user counts
    if params.public_items != (public_items is not None):
        raise ValueError("add_noise: public_items is the catalog's item list exactly when params.public_items")
    if public_items is not None:
        items = _public_keys(items, "item_id", public_items, ["users", *EVENT_TYPES])
    if "item_selection" in plan or public_items is not None:
        ids, users = items.column("item_id").to_pylist(), items.column("users").to_pylist()
        if public_items is None:
            selection = _selection(plan["item_selection"], params)
            mechanisms["item_selection"] = selection.describe()
            kept = _selected(ids, users, selection)
        else:
            kept = list(range(len(ids)))
        item_cols["item_id"] = [ids[i] for i in kept]
        if "item_users" in plan:
            noise = _laplace(plan["item_users"], params)
            mechanisms["item_users"] = noise.describe()
            triples = [_count_with_interval(noise, users[i]) for i in kept]
            for j, name in enumerate(kinds):
                item_cols[name] = [t[j] for t in triples]
            noisy_kept = sum(t[3] for t in triples)
        if "item_events" in plan:
            # One mechanism for the whole (item x event type) table: a user changes the table
            # by at most K x C in L1 over all its cells together.
            noise = _laplace(plan["item_events"], params)
            mechanisms["item_events"] = noise.describe()
            for t in EVENT_TYPES:
                values = items.column(t).to_pylist()
                item_cols[t] = [max(_noisy(noise, values[i]), 0) for i in kept]
    n_items = len(item_cols["item_id"])
    bounding: dict[str, Any] = {}
    if "bounding_bias" in plan:
        # Without public items the kept sum covers the selected items only (an overestimate of
        # the dropped share, and no estimates).
        bounding = {"max_items_per_user": params.max_items_per_user,
                    **_bias("bounding_bias", plan["bounding_bias"], params, int(dropped), noisy_kept,
                            params.bias_cap(), params.max_items_per_user, mechanisms)}
        bounding["items_per_user_clamp"] = bounding.pop("clamp")
    share = bounding.get("kept_share") if public_items is not None else None
    estimates = ([None] * n_items if share is None or not item_cols["users"]
                 else [round(n / share) for n in item_cols["users"]])
    item_table = pa.table({
        "item_id": pa.array(item_cols["item_id"], pa.string()),
        **{k: pa.array(item_cols[k] or [None] * n_items, v) for k, v in kinds.items()},
        "users_estimate": pa.array(estimates, pa.int64()),
        **{t: pa.array(item_cols[t] or [None] * n_items, pa.int64()) for t in EVENT_TYPES},
    })
    if "item_users" in plan and n_items:
        item_table = item_table.sort_by([("users", "descending"), ("item_id", "ascending")])

    funnel_cols: dict[str, list[Any]] = {"event_type": [], **{k: [] for k in kinds}}
    if "funnel_users" in plan:
        noise = _laplace(plan["funnel_users"], params)
        mechanisms["funnel_users"] = noise.describe()
        row = funnel.to_pylist()[0] if funnel.num_rows else {}
        for t in EVENT_TYPES:  # event types are public keys: no selection needed
            funnel_cols["event_type"].append(t)
            for name, value in zip(kinds, _count_with_interval(noise, int(row.get(t) or 0))[:3], strict=True):
                funnel_cols[name].append(value)
    funnel_table = pa.table({"event_type": pa.array(funnel_cols["event_type"], pa.string()),
                             **{k: pa.array(funnel_cols[k], v) for k, v in kinds.items()}})

    cat_cols: dict[str, list[Any]] = {"category": [], "events": [], "events_low": [], "events_high": [],
                                      "events_estimate": []}
    names, events = categories.column("category").to_pylist(), categories.column("events").to_pylist()
    if params.public_categories:
        # Public keys: every listed category is released (0 events get noise too), others never.
        observed = dict(zip(names, events, strict=True))
        cat_names, cat_events = list(params.public_categories), [observed.get(c, 0) for c in params.public_categories]
    elif "category_selection" in plan:
        selection = _selection(plan["category_selection"], params)
        mechanisms["category_selection"] = selection.describe()
        kept = _selected(names, categories.column("users").to_pylist(), selection)
        cat_names, cat_events = [names[i] for i in kept], [events[i] for i in kept]
    else:
        cat_names, cat_events = [], []
    cat_cols["category"] = cat_names
    if "category_events" in plan:
        noise = _laplace(plan["category_events"], params)
        mechanisms["category_events"] = noise.describe()
        triples = [_count_with_interval(noise, n) for n in cat_events]
        for j, name in enumerate(("events", "events_low", "events_high")):  # (not the unclamped 4th)
            cat_cols[name] = [t[j] for t in triples]
        if "category_bias" in plan:
            l1 = params.category_l1()
            bounding["category"] = {"max_category_events_per_user": l1, **_bias(
                "category_bias", plan["category_bias"], params, int(category_dropped), sum(t[3] for t in triples),
                params.category_bias_cap(), l1, mechanisms)}
            share = bounding["category"]["kept_share"]
            if share is not None:
                cat_cols["events_estimate"] = [round(n / share) for n in cat_cols["events"]]
    n_cats = len(cat_cols["category"])
    cat_table = pa.table({"category": pa.array(cat_cols["category"], pa.string()),
                          **{k: pa.array(cat_cols[k] or [None] * n_cats, pa.int64())
                             for k in ("events", "events_low", "events_high", "events_estimate")}})
    if "category_events" in plan and n_cats:
        cat_table = cat_table.sort_by([("events", "descending"), ("category", "ascending")])

    return NoisyRelease(item_table, funnel_table, cat_table, _mean_price(purchases, params, plan, mechanisms),
                        bounding, mechanisms)


def _mean_price(purchases: "pa.Table", params: DPStatsParams, plan: dict[str, StatisticBudget],
                mechanisms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Bounded mean = midpoint + noisy centred sum / noisy count (Google DP library's BoundedMean:
    centring halves the sum's sensitivity). The ratio is post-processing of two DP values."""
    if "purchase_price_sum" not in plan or "purchase_count" not in plan:
        return {}
    row = purchases.to_pylist()[0] if purchases.num_rows else {}
    sum_noise, count_noise = _laplace(plan["purchase_price_sum"], params), _laplace(plan["purchase_count"], params)
    mechanisms["purchase_price_sum"] = sum_noise.describe()
    mechanisms["purchase_count"] = count_noise.describe()
    noisy_sum = sum_noise.sum(float(row.get("price_sum_centred") or 0.0))
    noisy_count = count_noise.count(int(row.get("purchases") or 0))
    lo, hi = params.price_lower, params.price_upper
    mean = (lo + hi) / 2 + noisy_sum / max(noisy_count, 1)
    return {"mean_price": min(max(mean, lo), hi), "noisy_purchases": max(noisy_count, 0),
            "noisy_price_sum_centred": noisy_sum, "price_clamp": [lo, hi]}
