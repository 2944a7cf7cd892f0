"""The DP statistics release's noise step (``dp_stats.noise.add_noise``) measured where it is
wired, on fixed inputs repeated many times: every released number has the Laplace variance
2 (s / epsilon)^2 of its own sensitivity s and budget share, a one-user item is kept at most
delta / K of the time, and the bounded mean's error is what its noisy parts predict. The
expected values are computed by hand here, from the documented defaults, not by the code
under test. No Spark: the inputs are the aggregates the Spark step would collect."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from privrec_pipeline.dp_stats.noise import add_noise
from privrec_pipeline.dp_stats.params import DPStatsParams

TYPES = ("view", "add_to_cart", "remove_from_cart", "purchase", "rating")
RUNS = 2000
TRUE = {"users": 100_000, "events": 50_000, "funnel": 60_000, "category": 400_000, "purchases": 5_000,
        "price_sum_centred": 1_000.0, "dropped": 100_000, "category_dropped": 100_000}


def _add_noise(*args, **kwargs):
    """add_noise with the bounding's dropped counts (the bias statistics' inputs)."""
    params = args[4]
    return add_noise(*args, dropped=TRUE["dropped"], category_dropped=(
        TRUE["category_dropped"] if "category_bias" in params.plan() else None), **kwargs)


def _aggregates(extra_items: list[tuple[str, int]] = ()):
    items = pa.table({"item_id": ["itm_big", *[i for i, _ in extra_items]],
                      "users": [TRUE["users"], *[n for _, n in extra_items]],
                      **{t: [TRUE["events"]] + [1] * len(extra_items) for t in TYPES}})
    funnel = pa.table({t: [TRUE["funnel"]] for t in TYPES})
    categories = pa.table({"category": ["books"], "users": [TRUE["users"]], "events": [TRUE["category"]]})
    purchases = pa.table({"price_sum_centred": [TRUE["price_sum_centred"]], "purchases": [TRUE["purchases"]]})
    return items, funnel, categories, purchases


def test_the_five_event_types_are_the_ones_counted():
    from privrec_pipeline.schema import EVENT_TYPES

    assert tuple(EVENT_TYPES) == TYPES  # the funnel's sensitivity below counts them


def test_every_released_statistic_has_the_laplace_variance_of_its_share():
    # epsilon 1.02 split by the default weights (they sum to 1.02): items 0.2 users / 0.1 events,
    # funnel 0.05, category events 0.05, price sum 0.05, purchase count 0.05, bounding bias 0.02. Sensitivities
    # with the defaults K = 5, C = 5, Kc = 5, Cc = 10, M = 10, prices [0, 200]:
    # users K = 5; item x type table K C = 25; funnel = 5 event types; category events
    # Kc Cc = 50; purchase count M = 10; centred price sum M (200 - 0) / 2 = 1000; dropped
    # contributions B - K = 100 - 5 = 95 (a user's items clamped to U = 100).
    expected = {
        "item_users": 2 * (5 / 0.2) ** 2,
        "item_events": 2 * (25 / 0.1) ** 2,
        "funnel_users": 2 * (5 / 0.05) ** 2,
        "category_events": 2 * (50 / 0.05) ** 2,
        "purchase_count": 2 * (10 / 0.05) ** 2,
        "purchase_price_sum": 2 * (1000 / 0.05) ** 2,
        "bounding_bias": 2 * (95 / 0.02) ** 2,
    }
    params = DPStatsParams(epsilon=1.02, delta=1e-6)
    errors: dict[str, list[float]] = {k: [] for k in expected}
    for _ in range(RUNS):
        release = _add_noise(*_aggregates(), params)
        [item] = release.items.to_pylist()
        errors["item_users"].append(item["users"] - TRUE["users"])
        errors["item_events"].extend(item[t] - TRUE["events"] for t in TYPES)
        errors["funnel_users"].extend(r["users"] - TRUE["funnel"] for r in release.funnel.to_pylist())
        errors["category_events"].append(release.categories.to_pylist()[0]["events"] - TRUE["category"])
        errors["purchase_count"].append(release.purchases["noisy_purchases"] - TRUE["purchases"])
        errors["purchase_price_sum"].append(release.purchases["noisy_price_sum_centred"] - TRUE["price_sum_centred"])
        errors["bounding_bias"].append(release.bounding["noisy_dropped"] - TRUE["dropped"])
    for name, variance in expected.items():
        sample = np.asarray(errors[name], dtype=float)
        # Laplace: kurtosis 6, so the sample variance's relative sd is sqrt(5 / n); allow 4 sd.
        tolerance = 4 * math.sqrt(5 / sample.size)
        assert abs(sample.mean()) < 4 * math.sqrt(variance / sample.size), name
        assert sample.var() == pytest.approx(variance, rel=tolerance), name


def test_a_one_user_item_is_kept_at_most_delta_over_k_of_the_time():
    # delta 0.1 (large, so the rate is measurable): item selection gets 0.8 of it, K = 5, so a
    # single user's item may appear with probability at most 0.08 / 5 = 0.016 (Desfontaines,
    # Voss, Gipson & Mandayam 2022, truncated geometric thresholding).
    params = DPStatsParams(epsilon=1.0, delta=0.1)
    runs, bound = 8_000, 0.8 * 0.1 / 5
    kept = sum("itm_lonely" in _add_noise(*_aggregates([("itm_lonely", 1)]), params).items.column("item_id")
               .to_pylist() for _ in range(runs))
    assert kept / runs <= bound + 4 * math.sqrt(bound * (1 - bound) / runs)
    # ...and an item of many users is kept every time (selection is not "drop everything").
    assert all("itm_big" in _add_noise(*_aggregates(), params).items.column("item_id").to_pylist()
               for _ in range(100))


def test_the_bounded_mean_error_is_what_its_noisy_parts_predict():
    params = DPStatsParams(epsilon=1.02, delta=1e-6)  # weights sum to 1.02: shares are the weights
    true_mean = 100 + TRUE["price_sum_centred"] / TRUE["purchases"]  # midpoint of [0, 200] + centred mean
    means = np.array([_add_noise(*_aggregates(), params).purchases["mean_price"] for _ in range(RUNS)])
    # Delta method: Var(S/N) ~ Var(S)/N^2 + S^2 Var(N)/N^4 with Var(S) = 2 (1000/0.05)^2 and
    # Var(N) = 2 (10/0.05)^2: 32 + 1.3e-4.
    variance = 2 * (1000 / 0.05) ** 2 / TRUE["purchases"] ** 2 + \
        TRUE["price_sum_centred"] ** 2 * 2 * (10 / 0.05) ** 2 / TRUE["purchases"] ** 4
    assert abs(means.mean() - true_mean) < 4 * math.sqrt(variance / RUNS)
    assert means.var() == pytest.approx(variance, rel=4 * math.sqrt(5 / RUNS))


def test_a_mechanism_built_at_other_numbers_than_the_ledger_accounted_fails_the_release():
    from privrec_pipeline.dp_stats.release import check_as_built
    from privrec_pipeline.errors import PrivrecError
    from privrec_pipeline.privacy.mechanisms import LaplaceNoise, PartitionSelection

    params = DPStatsParams(epsilon=1.02, delta=1e-6)  # weights sum to 1.02: shares are the weights
    plan = params.plan()
    ok = {"item_users": LaplaceNoise(0.2, 5).describe(), "item_selection": PartitionSelection(0.4, 0.8e-6, 5).describe()}
    assert check_as_built(plan, ok) == ok
    with pytest.raises(PrivrecError, match=r"item_users .*epsilon: planned 0\.2, built 0\.4"):
        check_as_built(plan, {"item_users": LaplaceNoise(0.4, 5).describe()})
    with pytest.raises(PrivrecError, match=r"noise_scale: planned 25, built 12\.5"):
        check_as_built(plan, {"item_users": {**LaplaceNoise(0.2, 5).describe(), "noise_scale": 12.5}})
    with pytest.raises(PrivrecError, match=r"item_selection .*delta: planned 8e-07, built 0\.001"):
        check_as_built(plan, {"item_selection": PartitionSelection(0.4, 1e-3, 5).describe()})
    with pytest.raises(PrivrecError, match="not planned"):
        check_as_built(DPStatsParams(epsilon=1.0, delta=1e-6, epsilon_split={"purchase_count": 0}).plan(),
                       {"purchase_count": LaplaceNoise(0.05, 10).describe()})


def test_catalog_items_are_all_released_with_the_variance_of_their_share_and_no_other_key():
    # With a catalog (public items and categories) the weights are the catalog's (summing to 1
    # without the selections): item_users gets 0.68 of epsilon 0.625 = 0.425, b = K / 0.425
    # (bounds fixed by hand: chosen bounds would take their share first, below).
    params = DPStatsParams(epsilon=0.625, delta=1e-6, public_items=True, public_categories=("books", "toys"),
                           bounds="fixed")
    catalog = ["itm_big", "itm_unseen"]  # itm_unseen: nobody touched it, released all the same
    unseen, big = [], []
    for _ in range(RUNS):
        release = _add_noise(*_aggregates([("itm_outside", 40)]), params, catalog)
        items = {r["item_id"]: r for r in release.items.to_pylist()}
        assert set(items) == set(catalog)  # an item outside the catalog is never a key
        assert {r["category"] for r in release.categories.to_pylist()} == {"books", "toys"}
        big.append(items["itm_big"]["users"] - TRUE["users"])
        unseen.append(items["itm_unseen"]["users"])
    variance = 2 * (5 / 0.425) ** 2
    sample = np.asarray(big, dtype=float)
    assert sample.var() == pytest.approx(variance, rel=4 * math.sqrt(5 / sample.size))
    # A zero count is clamped at 0 after the noise (post-processing): about half the draws
    # are 0, the others Laplace's positive half (mean b).
    zeros = np.mean(np.asarray(unseen) == 0)
    assert 0.45 < zeros < 0.6 and np.mean([u for u in unseen if u > 0]) == pytest.approx(5 / 0.425, rel=0.15)
    with pytest.raises(ValueError, match="public_items"):
        _add_noise(*_aggregates(), params)  # the flag without the catalog's list


def test_a_category_total_cap_sets_the_sensitivity_of_the_category_events():
    # Chosen bounds with a catalog (the default "auto_if_catalog"): K and T take 0.03 of epsilon
    # 1.04 each, the statistics split the other 0.9776 by the catalog's weights: category_events
    # gets 0.9776 x 0.12 = 0.117312. With T = 7 chosen (Kc and Cc lifted to the 2 categories and
    # 7 events), a user changes the category table by at most 7 in L1 (PipelineDP's
    # max_contributions): b = 7 / 0.117312.
    params = DPStatsParams(epsilon=1.04, delta=1e-6, public_items=True, public_categories=("books", "toys"))
    plan = params.plan()
    assert plan["item_bounds"].epsilon == plan["category_bounds"].epsilon == pytest.approx(0.0312)
    assert plan["category_bounds"].mechanism == "exponential" and plan["category_bounds"].sensitivity == 1
    assert plan["category_events"].epsilon == pytest.approx(0.117312)
    chosen = replace(params, max_category_events_per_user=7, max_events_per_category=7, max_categories_per_user=2)
    assert chosen.components() == params.components()  # T never changes what the ledger was told
    errors = []
    for _ in range(RUNS):
        release = _add_noise(*_aggregates(), chosen, ["itm_big"])
        errors.append({r["category"]: r["events"] for r in release.categories.to_pylist()}["books"]
                      - TRUE["category"])
    sample = np.asarray(errors, dtype=float)
    variance = 2 * (7 / 0.117312) ** 2
    assert abs(sample.mean()) < 4 * math.sqrt(variance / sample.size)
    assert sample.var() == pytest.approx(variance, rel=4 * math.sqrt(5 / sample.size))
    # T below Kc x Cc caps the sensitivity at T; above it, Kc x Cc stays the bound.
    assert DPStatsParams(max_category_events_per_user=12).plan()["category_events"].sensitivity == 12
    assert DPStatsParams(max_category_events_per_user=80).plan()["category_events"].sensitivity == 50


def test_public_keys_get_estimates_of_the_unbounded_counts_from_the_noisy_kept_share():
    # Scaled bounds kept 100,000 of the item's 200,000 (user, item) contributions and 400,000 of
    # 500,000 category events. The estimates divide each noisy count by the noisy kept share
    # (noisy kept sum / (noisy kept sum + noisy dropped)): post-processing of DP values only.
    params = DPStatsParams(epsilon=5.0, delta=1e-6, public_items=True, public_categories=("books",), bounds="fixed")
    plan = params.plan()
    # The category bias: a user's events clamped at Bc = max(Uc, L + 1) = 100, L = Kc Cc = 50.
    assert plan["category_bias"].sensitivity == 100 - 50 and plan["bounding_bias"].sensitivity == 100 - 5
    items, users, cats = [], [], []
    for _ in range(400):
        release = _add_noise(*_aggregates(), params, ["itm_big"])
        [item] = release.items.to_pylist()
        [category] = release.categories.to_pylist()
        share = release.bounding["kept_share"]
        assert item["users_estimate"] == round(item["users"] / share)
        assert category["events_estimate"] == round(category["events"] / release.bounding["category"]["kept_share"])
        assert release.bounding["dropped_share"] == pytest.approx(1 - share)
        items.append(item["users_estimate"])
        users.append(item["users"])
        cats.append(category["events_estimate"])
    # 100,000 kept + 100,000 dropped: the estimate is about twice the count, 200,000...
    assert np.median(items) == pytest.approx(200_000, rel=0.01) and np.median(users) == pytest.approx(100_000, rel=0.01)
    assert np.median(cats) == pytest.approx(500_000, rel=0.01)  # ...400,000 + 100,000 for the category
    # Without public keys (partition selection) no estimate is published: the kept sum covers
    # the selected items only.
    selected = _add_noise(*_aggregates(), DPStatsParams(epsilon=5.0, delta=1e-6)).items.to_pylist()
    assert [r["users_estimate"] for r in selected] == [None]
