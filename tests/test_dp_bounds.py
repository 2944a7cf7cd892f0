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
    ItemBoundScore,
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
    assert plan["item_bounds"].mechanism == "exponential" and plan["item_bounds"].sensitivity == U
    # The statistics split the other 0.95 by their weights (selections out: 0.52 in total).
    assert charged["item_users"][0] == pytest.approx(1.9 * 0.2 / 0.52)
    assert charged["bounding_bias"][0] == pytest.approx(1.9 * 0.02 / 0.52)
    for name, budget in plan.items():
        assert charged[name] == (pytest.approx(budget.epsilon), budget.delta)
    assert params.spent() == (pytest.approx(2.0), 0.0)
    assert sum(e for e, _ in charged.values()) == pytest.approx(2.0)
    # Whatever K is chosen, the ledger components (reserved before) are the same...
    for k in (1, 7, 100):
        assert replace(params, max_items_per_user=k).components() == params.components()
    # ...and the noise uses it: sensitivities follow K, the bias's is B - K.
    chosen = replace(params, max_items_per_user=7).plan()
    assert chosen["item_users"].sensitivity == 7 and chosen["bounding_bias"].sensitivity == U - 7
    # Fixed bounds: no choice, the bias is still reported (B = max(U, K + 1)).
    fixed = DPStatsParams(epsilon=2.0, max_items_per_user=150)
    assert "item_bounds" not in fixed.plan() and fixed.plan()["bounding_bias"].sensitivity == 1


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
        DPStatsParams(bounds="auto", bounds_epsilon_share=1.0)
    with pytest.raises(ConfigurationError, match="needs a positive weight"):
        DPStatsParams(bounds="auto", epsilon_split={"item_users": 0})
