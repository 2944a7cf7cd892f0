"""Contribution bounds chosen privately and the bounding bias.

The DP statistics choose K and T as DP quantiles (``QuantileScore``: rank score, sensitivity 1);
the popularity baseline chooses K with PipelineDP's l0 score (``ItemBoundScore``: K where the
noise of the item counts and the dropped contributions balance). Each choice's output
distribution is epsilon-DP between neighbouring days, and the ledger is charged the choices and
the bias statistics as planned. No Spark: the input is the per-user histogram the Spark step
collects. Expected numbers are computed by hand here."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from privrec_pipeline.dp_stats.bounds import (
    ItemBoundScore,
    QuantileScore,
    choose_max_items,
    choose_quantile,
    dropped_contributions,
    selection_probabilities,
)
from privrec_pipeline.dp_stats.params import CATALOG_EPSILON_SPLIT, DPStatsParams
from privrec_pipeline.privacy.accounting import pure_epsilon

U = 100
P = 1000  # catalog items
# 900 users with 20 items, 100 with 5, 10 heavy users with 60.
HISTOGRAM = {20: 900, 5: 100, 60: 10}


def _hand_score(histogram: dict[int, int], k: int, eps_users: float, upper: int = U) -> float:
    # PipelineDP's L0ScoringFunction: -0.5 P sqrt(2) k / eps - 0.5 sum_u max(min(c_u, U) - k, 0)
    noise = P * math.sqrt(2) * k / eps_users
    dropped = sum(n * max(min(c, upper) - k, 0) for c, n in histogram.items())
    return -0.5 * noise - 0.5 * dropped


def test_the_dropped_count_is_what_bounding_drops():
    assert dropped_contributions(HISTOGRAM, 5, 100) == 900 * 15 + 10 * 55
    assert dropped_contributions(HISTOGRAM, 5, 30) == 900 * 15 + 10 * 25  # clamped at the cap
    assert dropped_contributions(HISTOGRAM, 60, 100) == 0


def test_auto_picks_k_where_noise_and_dropped_contributions_balance():
    # eps_users 10: one more unit of K costs P sqrt(2) / 10 = 141 in noise and saves one
    # contribution of every user with more than K items: 910 users below 20, 10 above. So the
    # best K is 20.
    eps_users = 10.0
    hand = [_hand_score(HISTOGRAM, k, eps_users) for k in range(1, U + 1)]
    assert int(np.argmax(hand)) + 1 == 20
    score = ItemBoundScore(HISTOGRAM, P, eps_users, U)
    # The code's score is the hand score up to a constant (which the mechanism normalizes away).
    shift = [score.score(k) - h for k, h in zip(range(1, U + 1), hand, strict=True)]
    assert max(shift) - min(shift) == pytest.approx(0, abs=1e-6)
    probabilities = selection_probabilities(score, 10.0)
    assert probabilities[19] > 0.99
    picks = Counter(choose_max_items(HISTOGRAM, P, 10.0, eps_users, U).k for _ in range(50))
    assert picks[20] >= 45


def test_auto_picks_a_small_k_at_a_tiny_epsilon():
    # Counts at epsilon 0.0018, the choice at 0.0005: the noise of 1,000 item counts outweighs
    # every dropped contribution, so K goes to 1.
    score = ItemBoundScore(HISTOGRAM, P, 0.0018, U)
    probabilities = np.array(selection_probabilities(score, 0.0005))
    assert probabilities[:3].sum() > 0.9
    assert (probabilities * np.arange(1, U + 1)).sum() < 3


@pytest.mark.parametrize("extra", [U, 50, 1, 250], ids=["U items", "50 items", "1 item", "over U"])
@pytest.mark.parametrize("eps_select", [0.1, 1.0, 5.0])
def test_the_choice_is_epsilon_dp_between_neighbouring_days(extra, eps_select):
    """Every K is chosen with probabilities within e^eps of each other with and without one
    user (PipelineDP's own output distribution, checked against the definition)."""
    for eps_users in (0.05, 1.0, 10.0):
        without = ItemBoundScore(HISTOGRAM, P, eps_users, U)
        with_user = ItemBoundScore({**HISTOGRAM, extra: HISTOGRAM.get(extra, 0) + 1}, P, eps_users, U)
        p, q = (np.array(selection_probabilities(s, eps_select)) for s in (without, with_user))
        assert p.sum() == pytest.approx(1) and q.sum() == pytest.approx(1)
        # Where both are representable (not underflowed to 0), the log-ratio is at most eps.
        both = (p > 1e-300) & (q > 1e-300)
        assert both.any()
        assert np.max(np.abs(np.log(p[both]) - np.log(q[both]))) <= eps_select + 1e-9
        # ...and it matches exp(eps x score / U) normalized by hand (monotonic score: eps / U).
        hand = np.array([_hand_score(HISTOGRAM, k, eps_users) for k in range(1, U + 1)]) * eps_select / U
        hand = np.exp(hand - hand.max())
        np.testing.assert_allclose(p, hand / hand.sum(), rtol=1e-9, atol=1e-300)


def test_the_ledger_is_charged_the_choice_and_the_bias_as_planned():
    params = DPStatsParams(epsilon=2.0, bounds="auto", bounds_epsilon_share=0.05, public_items=True,
                           public_categories=("c",))
    plan = params.plan()
    charged = {c.label: pure_epsilon(c) for c in params.components()}
    assert set(charged) == set(plan) and {"item_bounds", "bounding_bias", "category_bias"} <= set(plan)
    assert charged["item_bounds"] == (pytest.approx(0.1), 0.0)  # 0.05 of 2, pure
    assert charged["category_bounds"] == (pytest.approx(0.1), 0.0)  # T: another 0.05 of 2
    # A DP quantile's rank score moves by at most 1 with one user.
    assert plan["item_bounds"].mechanism == "exponential" and plan["item_bounds"].sensitivity == 1
    assert plan["category_bounds"].mechanism == "exponential" and plan["category_bounds"].sensitivity == 1
    # The statistics split the other 0.9 by the catalog's weights (no selection; they sum to 1).
    assert sum(w for n, w in CATALOG_EPSILON_SPLIT.items() if "selection" not in n) == pytest.approx(1.0)
    for name in ("item_users", "category_events", "bounding_bias", "category_bias"):
        assert charged[name][0] == pytest.approx(1.8 * CATALOG_EPSILON_SPLIT[name])
    for name, budget in plan.items():
        assert charged[name] == (pytest.approx(budget.epsilon), budget.delta)
    assert params.spent() == (pytest.approx(2.0), 0.0)
    assert sum(e for e, _ in charged.values()) == pytest.approx(2.0)
    # Whatever K is chosen, the ledger components (reserved before) are the same...
    for k in (1, 7, 100):
        assert replace(params, max_items_per_user=k).components() == params.components()
    for t in (1, 9, 100):  # ...nor whatever T
        assert replace(params, max_category_events_per_user=t).components() == params.components()
    # ...and the noise uses it: sensitivities follow K, the biases' are B - K and Bc - T.
    chosen = replace(params, max_items_per_user=7, max_category_events_per_user=9, max_events_per_category=9).plan()
    assert chosen["item_users"].sensitivity == 7 and chosen["bounding_bias"].sensitivity == U - 7
    assert chosen["category_events"].sensitivity == 9 and chosen["category_bias"].sensitivity == 100 - 9
    # Without public categories only K is chosen (the number of categories would be private),
    # there is no category bias, and the statistics get the rest (1 - 0.03 of epsilon by default).
    items_only = DPStatsParams(epsilon=2.0, bounds="auto", public_items=True)
    assert items_only.bound_choices() == ("item_bounds",) and "category_bias" not in items_only.plan()
    assert sum(b.epsilon for n, b in items_only.plan().items() if n != "item_bounds") == pytest.approx(2.0 * 0.97)
    # Fixed bounds: no choice, the bias is still reported (B = max(U, K + 1)).
    fixed = DPStatsParams(epsilon=2.0, max_items_per_user=150)
    assert "item_bounds" not in fixed.plan() and fixed.plan()["bounding_bias"].sensitivity == 1
    # The default chooses them exactly when the release has a catalog (public items).
    assert DPStatsParams().bounds == "auto_if_catalog" and DPStatsParams().bound_choices() == ()
    assert DPStatsParams(public_items=True, public_categories=("c",)).bound_choices() == (
        "item_bounds", "category_bounds")
    assert DPStatsParams(public_items=True, public_categories=("c",), bounds="fixed").bound_choices() == ()
    # The user's weights replace the defaults they name, over the catalog's or the selection's.
    mine = DPStatsParams(epsilon_split={"item_users": 0.1})
    assert mine.weights()["item_users"] == 0.1 and mine.weights()["item_selection"] > 0
    assert replace(mine, public_items=True).weights() == {**CATALOG_EPSILON_SPLIT, "item_users": 0.1}


def test_the_reserved_description_does_not_depend_on_k():
    from privrec_pipeline.dp_stats.release import check_as_built, release_parameters
    from privrec_pipeline.errors import PrivrecError

    params = DPStatsParams(epsilon=2.0, bounds="auto", public_items=True, public_categories=("c",))
    described = release_parameters(params, "fp")["statistics"]
    assert described == release_parameters(replace(params, max_items_per_user=17), "fp")["statistics"]
    assert described["item_users"]["sensitivity"] == "auto" and described["funnel_users"]["sensitivity"] == 5
    assert described["item_bounds"]["epsilon"] == pytest.approx(2.0 * params.bounds_epsilon_share)
    # The release checks the exponential mechanism as built against the plan.
    chosen = choose_quantile(HISTOGRAM, 0.5, params.plan()["item_bounds"].epsilon, U)
    assert check_as_built(params.plan(), {"item_bounds": chosen.description})
    with pytest.raises(PrivrecError, match=r"item_bounds .*epsilon"):
        check_as_built(params.plan(), {"item_bounds": {**chosen.description, "epsilon": 0.2}})
    with pytest.raises(PrivrecError, match=r"item_bounds .*global_sensitivity"):  # e.g. an l0 score's U
        check_as_built(params.plan(), {"item_bounds": {**chosen.description, "global_sensitivity": 100.0}})


def test_auto_bounds_need_item_users_and_sane_settings():
    from privrec_pipeline.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="bounds must be one of"):
        DPStatsParams(bounds="magic")
    with pytest.raises(ConfigurationError, match="bounds_epsilon_share must be in"):
        DPStatsParams(bounds="auto", bounds_epsilon_share=0.5)  # two choices would take it all
    with pytest.raises(ConfigurationError, match="max_category_events_per_user must be a positive integer"):
        DPStatsParams(max_category_events_per_user=0)
    with pytest.raises(ConfigurationError, match="needs a positive weight"):
        DPStatsParams(bounds="auto", epsilon_split={"item_users": 0})
    with pytest.raises(ConfigurationError, match="bounds_quantile must be in"):
        DPStatsParams(bounds_quantile=1.0)


# Users' counts spread evenly: 100 users with each count 1..30 (3,000 users).
SPREAD = {c: 100 for c in range(1, 31)}


def _hand_rank_score(histogram: dict[int, int], k: int, q: float) -> float:
    # minus the distance of q N to [#{c_u < k}, #{c_u <= k}]
    below = sum(n for c, n in histogram.items() if min(c, U) < k)
    at_most = sum(n for c, n in histogram.items() if min(c, U) <= k)
    rank = q * sum(histogram.values())
    return -max(below - rank, rank - at_most, 0)


@pytest.mark.parametrize("q, expected", [(0.55, 17), (0.88, 27), (0.12, 4)])
def test_the_bound_is_the_dp_quantile_of_the_users_counts(q, expected):
    hand = [_hand_rank_score(SPREAD, k, q) for k in range(1, U + 1)]
    assert int(np.argmax(hand)) + 1 == expected
    score = QuantileScore(SPREAD, q, U)
    shift = [score.score(k) - h for k, h in zip(range(1, U + 1), hand, strict=True)]
    assert max(shift) - min(shift) == pytest.approx(0, abs=1e-9)
    # At epsilon 0.3 the neighbours (40 or more users from the quantile's rank) are a factor
    # e^-6 or less as likely.
    assert selection_probabilities(score, 0.3)[expected - 1] > 0.99
    picks = Counter(choose_quantile(SPREAD, q, 0.3, U).k for _ in range(50))
    assert picks[expected] >= 45
    # Users above the largest candidate rank above every candidate: the 0.5-quantile of a day
    # where most users have more than U contributions is U.
    assert choose_quantile({U + 1: 900, 3: 100}, 0.5, 1.0, U).k == U


@pytest.mark.parametrize("extra", [U, 15, 1, 250], ids=["U", "at the median", "1", "over U"])
@pytest.mark.parametrize("q", [0.5, 0.9])
def test_the_quantile_choice_is_epsilon_dp_between_neighbouring_days(extra, q):
    for eps_select in (0.05, 1.0, 5.0):
        p, r = (np.array(selection_probabilities(QuantileScore(h, q, U), eps_select))
                for h in (SPREAD, {**SPREAD, extra: SPREAD.get(extra, 0) + 1}))
        assert p.sum() == pytest.approx(1) and r.sum() == pytest.approx(1)
        both = (p > 1e-300) & (r > 1e-300)
        assert both.any() and np.max(np.abs(np.log(p[both]) - np.log(r[both]))) <= eps_select + 1e-9
        # exp(eps x score / (2 x 1)) normalized by hand (not monotonic: eps / 2).
        hand = np.array([_hand_rank_score(SPREAD, k, q) for k in range(1, U + 1)]) * eps_select / 2
        hand = np.exp(hand - hand.max())
        np.testing.assert_allclose(p, hand / hand.sum(), rtol=1e-9, atol=1e-300)
