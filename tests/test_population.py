"""The DP partition counts the sampling rates are set from (``training.population``): Laplace
noise of sensitivity 1 at the population epsilon, one ledger release per window, reused by
every later run, and the plan (sampling rates, denominators) built from them, never from the
exact sizes. No Spark."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest

from privrec_pipeline.privacy.accounting import pure_epsilon
from privrec_pipeline.privacy.ledger import BudgetPolicy, Ledger
from privrec_pipeline.training.federated import TrainConfig, plan_privacy
from privrec_pipeline.training.population import RELEASE_KEY, noisy_counts, release_population

WINDOW = (dt.date(2026, 1, 1), dt.date(2026, 1, 7))
SIZES = [5_000, 7_000, 6_000]


@pytest.fixture
def ledger(tmp_path):
    return Ledger(f"sqlite:///{tmp_path}/ledger.db", BudgetPolicy(epsilon=100.0, delta=1e-3))


def test_the_counts_carry_laplace_noise_of_sensitivity_one():
    # 3 partitions x 4,000 draws at epsilon 0.5: scale b = 1 / 0.5 = 2, variance 2 b^2 = 8.
    draws = np.array([noisy_counts(SIZES, 0.5) for _ in range(4_000)], dtype=float) - SIZES
    assert abs(draws.mean()) < 4 * math.sqrt(8 / draws.size)
    # Rounding adds 1/12 to the variance (PyDP rounds the integer count's noise).
    assert draws.var() == pytest.approx(8 + 1 / 12, rel=4 * math.sqrt(5 / draws.size))
    # A tiny partition never gets a count below 1 (a sampling rate needs a population).
    assert min(min(noisy_counts([1, 2], 0.01)) for _ in range(200)) >= 1


def test_one_release_per_window_reused_by_later_runs_and_charged_once(ledger):
    first = release_population(ledger, WINDOW, SIZES, 0.05, run_id="run-1", dag_id="d", force=False, parameters={})
    assert first.status == "new" and len(first.partition_users) == 3
    assert first.partition_users != SIZES  # P(all three noises round to 0) ~ (1 - e^-0.025)^3
    again = release_population(ledger, WINDOW, SIZES, 0.05, run_id="run-2", dag_id="d", force=False, parameters={})
    assert again.status == "reuse" and again.partition_users == first.partition_users  # noise drawn once
    [release] = [r for r in ledger.releases() if r.release_key == RELEASE_KEY]
    assert release.state == "committed" and release.result == {"partition_users": first.partition_users}
    # The ledger holds one pure Laplace component at the population epsilon.
    assert [pure_epsilon(c) for c in release.components] == [(pytest.approx(0.05), 0.0)]
    assert (release.epsilon, release.delta) == (pytest.approx(0.05), 0.0)
    forced = release_population(ledger, WINDOW, SIZES, 0.05, run_id="run-3", dag_id="d", force=True, parameters={})
    assert forced.status == "new" and forced.release_id != first.release_id
    assert ledger.spend_at(WINDOW[1]).basic_epsilon == pytest.approx(0.1)
    # A reused release with another number of partitions cannot set this run's rates.
    from privrec_pipeline.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="counts 3 partitions, this run has 2"):
        release_population(ledger, WINDOW, SIZES[:2], 0.05, run_id="run-4", dag_id="d", force=False, parameters={})


def test_the_plan_is_made_from_the_dp_counts_and_publishes_no_exact_size():
    config = TrainConfig(mode="local", epsilon=4.0, rounds=2, local_steps=2, batch_size=256)
    counts = noisy_counts(SIZES, 0.05)
    plan = plan_privacy(config, counts)
    assert plan.population == counts
    assert plan.sampling_rates == [pytest.approx(256 / n) for n in counts]
    # batch / q gives back the DP count, not the exact size.
    assert [round(256 / q) for q in plan.sampling_rates] == counts
    with pytest.raises(Exception, match="population_epsilon must be positive"):
        TrainConfig(population_epsilon=0.0)
