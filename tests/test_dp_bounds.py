"""Contribution bounds chosen privately (``dp_stats.bounds``, bounds="auto") and the bounding
bias: the exponential mechanism picks K where the noise of the item counts and the dropped
contributions balance, its output distribution is epsilon-DP between neighbouring days, and the
ledger is charged the choice and the bias statistic as planned. No Spark: the input is the
per-user histogram the Spark step collects. Expected numbers are computed by hand here."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from privrec_pipeline.dp_stats.bounds import (
    CategoryEventsScore,
    ItemBoundScore,
    choose_category_events,
    choose_max_items,
    dropped_contributions,
    selection_probabilities,
)
from privrec_pipeline.dp_stats.params import DPStatsParams
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
    # A release at epsilon 0.01: item_users gets about 0.0018, the choice 0.0005. The noise of
    # 1,000 item counts outweighs every dropped contribution, so K goes to 1.
    params = DPStatsParams(epsilon=0.01, bounds="auto", public_items=True, public_categories=("c",))
    plan = params.plan()
    score = ItemBoundScore(HISTOGRAM, P, plan["item_users"].epsilon, U)
    probabilities = np.array(selection_probabilities(score, plan["item_bounds"].epsilon))
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
    assert set(charged) == set(plan) and "item_bounds" in plan and "bounding_bias" in plan
    assert charged["item_bounds"] == (pytest.approx(0.1), 0.0)  # 0.05 of 2, pure
    assert charged["category_bounds"] == (pytest.approx(0.1), 0.0)  # T: another 0.05 of 2
    assert plan["item_bounds"].mechanism == "exponential" and plan["item_bounds"].sensitivity == U
    assert plan["category_bounds"].mechanism == "exponential" and plan["category_bounds"].sensitivity == 100
    # The statistics split the other 0.9 by their weights (selections out: 0.52 in total).
    assert charged["item_users"][0] == pytest.approx(1.8 * 0.2 / 0.52)
    assert charged["category_events"][0] == pytest.approx(1.8 * 0.05 / 0.52)
    assert charged["bounding_bias"][0] == pytest.approx(1.8 * 0.02 / 0.52)
    for name, budget in plan.items():
        assert charged[name] == (pytest.approx(budget.epsilon), budget.delta)
    assert params.spent() == (pytest.approx(2.0), 0.0)
    assert sum(e for e, _ in charged.values()) == pytest.approx(2.0)
    # Whatever K is chosen, the ledger components (reserved before) are the same...
    for k in (1, 7, 100):
        assert replace(params, max_items_per_user=k).components() == params.components()
    for t in (1, 9, 100):  # ...nor whatever T
        assert replace(params, max_category_events_per_user=t).components() == params.components()
    # ...and the noise uses it: sensitivities follow K, the bias's is B - K, the categories' T.
    chosen = replace(params, max_items_per_user=7, max_category_events_per_user=9, max_events_per_category=9).plan()
    assert chosen["item_users"].sensitivity == 7 and chosen["bounding_bias"].sensitivity == U - 7
    assert chosen["category_events"].sensitivity == 9
    # Without public categories only K is chosen (the number of categories would be private),
    # and the statistics get 0.95.
    items_only = DPStatsParams(epsilon=2.0, bounds="auto", public_items=True)
    assert items_only.bound_choices() == ("item_bounds",)
    assert sum(b.epsilon for n, b in items_only.plan().items() if n != "item_bounds") == pytest.approx(1.9)
    # Fixed bounds: no choice, the bias is still reported (B = max(U, K + 1)).
    fixed = DPStatsParams(epsilon=2.0, max_items_per_user=150)
    assert "item_bounds" not in fixed.plan() and fixed.plan()["bounding_bias"].sensitivity == 1
    # The default chooses them exactly when the release has a catalog (public items).
    assert DPStatsParams().bounds == "auto_if_catalog" and DPStatsParams().bound_choices() == ()
    assert DPStatsParams(public_items=True, public_categories=("c",)).bound_choices() == (
        "item_bounds", "category_bounds")
    assert DPStatsParams(public_items=True, public_categories=("c",), bounds="fixed").bound_choices() == ()


def test_the_reserved_description_does_not_depend_on_k():
    from privrec_pipeline.dp_stats.release import check_as_built, release_parameters
    from privrec_pipeline.errors import PrivrecError

    params = DPStatsParams(epsilon=2.0, bounds="auto", public_items=True, public_categories=("c",))
    described = release_parameters(params, "fp")["statistics"]
    assert described == release_parameters(replace(params, max_items_per_user=17), "fp")["statistics"]
    assert described["item_users"]["sensitivity"] == "auto" and described["funnel_users"]["sensitivity"] == 5
    assert described["item_bounds"]["epsilon"] == pytest.approx(0.1)
    # The release checks the exponential mechanism as built against the plan.
    chosen = choose_max_items(HISTOGRAM, P, 0.1, params.plan()["item_users"].epsilon, U)
    assert check_as_built(params.plan(), {"item_bounds": chosen.description})
    with pytest.raises(PrivrecError, match=r"item_bounds .*epsilon"):
        check_as_built(params.plan(), {"item_bounds": {**chosen.description, "epsilon": 0.2}})


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


# Events per user in public categories: 1,000 users with 6, 2,000 with 30, 20 heavy ones with 100.
EVENTS = {6: 1000, 30: 2000, 100: 20}
CATEGORIES = 24


def _hand_category_score(t: int, eps_events: float, upper: int = U) -> float:
    # The same score for T: -0.5 P sqrt(2) t / eps - 0.5 sum_u max(min(e_u, Uc) - t, 0)
    return -0.5 * CATEGORIES * math.sqrt(2) * t / eps_events - 0.5 * sum(
        n * max(min(e, upper) - t, 0) for e, n in EVENTS.items())


def test_the_category_bound_balances_the_noise_of_the_categories_and_the_dropped_events():
    # eps = 24 sqrt(2) / 1000: one more unit of T costs 0.5 x 1000 in the score (noise of 24
    # categories) and keeps one more event (0.5 each) of every user above T: 2,020 users below
    # 30, 20 above. So T = 30, and every step away from it costs about 500.
    eps_events = CATEGORIES * math.sqrt(2) / 1000
    hand = [_hand_category_score(t, eps_events) for t in range(1, U + 1)]
    assert int(np.argmax(hand)) + 1 == 30
    score = CategoryEventsScore(EVENTS, CATEGORIES, eps_events, U)
    shift = [score.score(t) - h for t, h in zip(range(1, U + 1), hand, strict=True)]
    assert max(shift) - min(shift) == pytest.approx(0, abs=1e-6)
    assert selection_probabilities(score, 5.0)[29] > 0.9
    picks = Counter(choose_category_events(EVENTS, CATEGORIES, 5.0, eps_events, U).k for _ in range(50))
    assert picks[30] >= 40
    # A tiny epsilon for the events makes their noise dominate: T goes to 1.
    tiny = np.array(selection_probabilities(CategoryEventsScore(EVENTS, CATEGORIES, 1e-5, U), 5.0))
    assert tiny[:3].sum() > 0.9


@pytest.mark.parametrize("extra", [U, 7, 1, 250])
def test_the_category_choice_is_epsilon_dp_between_neighbouring_days(extra):
    for eps_select in (0.05, 1.0):
        for eps_events in (0.05, 1.0):
            p, q = (np.array(selection_probabilities(CategoryEventsScore(h, CATEGORIES, eps_events, U), eps_select))
                    for h in (EVENTS, {**EVENTS, extra: EVENTS.get(extra, 0) + 1}))
            both = (p > 1e-300) & (q > 1e-300)
            assert both.any() and np.max(np.abs(np.log(p[both]) - np.log(q[both]))) <= eps_select + 1e-9
            hand = np.array([_hand_category_score(t, eps_events) for t in range(1, U + 1)]) * eps_select / U
            hand = np.exp(hand - hand.max())
            np.testing.assert_allclose(p, hand / hand.sum(), rtol=1e-9, atol=1e-300)
