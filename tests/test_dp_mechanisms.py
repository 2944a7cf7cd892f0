"""Privacy properties of the DP statistics' building blocks (no Spark): the noise PyDP adds
has the variance theory says, partition selection keeps and drops keys with the promised
probabilities, and the budget split adds up to the release."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privrec_pipeline.dp_stats.params import DEFAULT_EPSILON_SPLIT, STATISTICS, DPStatsParams
from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.privacy.accounting import composed_epsilon
from privrec_pipeline.privacy.mechanisms import (
    LaplaceNoise,
    PartitionSelection,
    truncated_geometric_keep_probability,
)

DRAWS = 20_000


@pytest.mark.parametrize("epsilon, sensitivity", [(0.5, 1.0), (0.1, 5.0), (2.0, 50.0)])
def test_laplace_noise_has_the_variance_of_theory(epsilon, sensitivity):
    noise = LaplaceNoise(epsilon, sensitivity)
    b = sensitivity / epsilon  # Dwork & Roth 2014, Thm 3.6
    assert noise.scale == pytest.approx(b)
    draws = np.array([noise.sum(1000.0) for _ in range(DRAWS)]) - 1000.0
    # Sample variance of Laplace noise: relative standard error sqrt((kurtosis - 1) / n) = sqrt(5 / n).
    tolerance = 5 * math.sqrt(5 / DRAWS)
    assert draws.var() == pytest.approx(2 * b * b, rel=tolerance)
    assert abs(draws.mean()) < 5 * math.sqrt(2) * b / math.sqrt(DRAWS)
    # PyDP's confidence interval covers the true value at its level.
    inside = np.mean(np.abs(draws) <= noise.half_width)
    assert inside == pytest.approx(0.95, abs=5 * math.sqrt(0.95 * 0.05 / DRAWS))


def test_integer_counts_are_unbiased_with_the_same_scale():
    noise = LaplaceNoise(0.2, 5.0)  # b = 25
    draws = np.array([noise.count(500) for _ in range(DRAWS)]) - 500
    assert draws.dtype.kind == "i"
    assert draws.var() == pytest.approx(2 * 25.0**2, rel=5 * math.sqrt(5 / DRAWS))
    assert abs(draws.mean()) < 5 * math.sqrt(2) * 25 / math.sqrt(DRAWS)


def test_partition_selection_follows_the_truncated_geometric_probabilities():
    epsilon, delta, k = 1.0, 1e-5, 5
    selection = PartitionSelection(epsilon, delta, k)
    for n in (1, 2, 10, 40, 60, 100):  # PyDP's strategy is the paper's optimal one
        assert selection.probability(n) == pytest.approx(
            truncated_geometric_keep_probability(n, epsilon, delta, k), rel=1e-3, abs=1e-9)
    # A key of one user is kept with probability delta / K at most: its presence reveals little.
    assert selection.probability(1) <= delta / k * 1.001
    assert selection.probability(200) == 1.0


@pytest.mark.parametrize("users", [1, 2, 3])
def test_partition_selection_keeps_rare_keys_at_the_promised_rate(users):
    # A large delta makes the rare-key probability measurable: pi(1) = delta for K = 1.
    selection = PartitionSelection(0.5, 0.05, 1)
    p = selection.probability(users)
    assert p == pytest.approx(truncated_geometric_keep_probability(users, 0.5, 0.05, 1), rel=1e-3)
    kept = sum(selection.keep(users) for _ in range(DRAWS))
    assert kept / DRAWS == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / DRAWS))


def test_partition_selection_keeps_keys_with_many_users():
    selection = PartitionSelection(0.2, 8e-9, 5)
    many = selection.users_for(0.999)
    assert selection.probability(many) >= 0.999 > selection.probability(many - 1)
    assert sum(selection.keep(many * 2) for _ in range(2000)) == 2000
    assert sum(selection.keep(1) for _ in range(DRAWS)) == 0


def test_release_budget_is_split_and_adds_up():
    params = DPStatsParams(epsilon=0.8, delta=2e-8)
    plan = params.plan()
    assert set(plan) == set(STATISTICS) - {"category_bias"}  # (scaled bounds of public categories only)
    assert sum(b.epsilon for b in plan.values()) == pytest.approx(0.8)
    assert sum(b.delta for b in plan.values()) == pytest.approx(2e-8)
    assert params.spent() == pytest.approx((0.8, 2e-8))
    weights = sum(DEFAULT_EPSILON_SPLIT.values())
    assert plan["item_users"].epsilon == pytest.approx(0.8 * DEFAULT_EPSILON_SPLIT["item_users"] / weights)
    # Sensitivities follow the bounds: K distinct items, K x C events, M purchases of width (hi - lo) / 2.
    assert plan["item_users"].sensitivity == params.max_items_per_user
    assert plan["item_events"].sensitivity == params.max_items_per_user * params.max_events_per_item
    assert plan["purchase_price_sum"].sensitivity == params.max_purchases_per_user * 100.0
    assert plan["item_users"].noise_scale == pytest.approx(plan["item_users"].sensitivity / plan["item_users"].epsilon)
    # The ledger's tight composition of the parts never exceeds their basic sum.
    assert composed_epsilon(params.components(), 1e-6) <= 0.8 + 1e-6


def test_statistics_can_be_left_out_and_public_categories_need_no_selection():
    params = DPStatsParams(epsilon=1.0, epsilon_split={"purchase_price_sum": 0, "purchase_count": 0},
                           public_categories=("books", "games"))
    plan = params.plan()
    assert "purchase_count" not in plan and "category_selection" not in plan and "category_events" in plan
    assert sum(b.epsilon for b in plan.values()) == pytest.approx(1.0)
    assert plan["item_selection"].delta == pytest.approx(params.delta)  # the only selection left


@pytest.mark.parametrize("settings, message", [
    ({"epsilon": 0}, "DPStatsParams: epsilon must be positive"),
    ({"max_items_per_user": 0}, "max_items_per_user must be positive, not 0"),
    ({"price_lower": 10.0, "price_upper": 5.0}, "price_upper must be finite and greater than price_lower"),
    ({"epsilon_split": {"item_count": 1}}, "names unknown statistics ['item_count']"),
    ({"epsilon_split": {"item_selection": 0}}, "gives item_users a weight but not item_selection"),
    ({"selection_strategy": "threshold"}, "selection_strategy must be one of"),
    ({"epsilon": "high"}, "DP statistics setting epsilon must be int or float"),
    ({"max_item_per_user": 3}, "unknown DP statistics setting(s) ['max_item_per_user']"),
])
def test_bad_parameters_are_clear_errors(settings, message):
    with pytest.raises(ConfigurationError) as info:
        DPStatsParams.from_settings(settings)
    assert message in str(info.value)


@pytest.mark.parametrize("epsilon", [19.0, 32.0, 200.0])
def test_a_laplace_release_of_large_epsilon_is_accounted_at_its_epsilon(epsilon):
    # dp_accounting's Laplace PLD fails numerically above epsilon ~25; such a component is
    # accounted as pure (epsilon, 0)-DP: never less than the Laplace mechanism's own guarantee.
    from privrec_pipeline.privacy.accounting import Component, composed_epsilon

    laplace = Component("laplace", noise_multiplier=1.0 / epsilon)
    assert composed_epsilon([laplace], 1e-6) == pytest.approx(epsilon, rel=1e-3)
    assert composed_epsilon([laplace, laplace], 1e-6) <= 2 * epsilon * (1 + 1e-6)
