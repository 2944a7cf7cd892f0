"""The DP evaluation release (``models.dp_evaluation``) the publish gate decides on: each sum
of per-user values in [0, 1] and the user count get Laplace noise of scale (number of
statistics) / epsilon, the release is accounted once per candidate and reused, and the
decision is a function of the noisy means only. No Spark."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest

from privrec_pipeline.models.dp_evaluation import (
    exact_sums,
    release_evaluation,
    release_key,
    statistics,
)
from privrec_pipeline.models.evaluate import GateSettings, decide
from privrec_pipeline.privacy.accounting import pure_epsilon
from privrec_pipeline.privacy.ledger import BudgetPolicy, Ledger

WINDOW = (dt.date(2026, 1, 1), dt.date(2026, 1, 7))
RNG = np.random.default_rng(3)
USERS = 2_000
CANDIDATE = {"recall@20": RNG.random(USERS), "ndcg@10": RNG.random(USERS), "hr@10": (RNG.random(USERS) < 0.4) * 1.0}
POPULARITY = {"recall@20": RNG.random(USERS) * 0.5, "ndcg@10": RNG.random(USERS), "hr@10": RNG.random(USERS)}


@pytest.fixture
def ledger(tmp_path):
    return Ledger(f"sqlite:///{tmp_path}/ledger.db", BudgetPolicy(epsilon=1e6, delta=1e-3))


def test_each_user_moves_every_sum_by_at_most_one():
    sums = exact_sums(CANDIDATE, POPULARITY, None)
    assert statistics(False) == ["candidate recall@20", "candidate ndcg@10", "candidate hr@10",
                                 "dp_popularity recall@20", "users"]
    extra = {k: np.append(v, 7.5) for k, v in CANDIDATE.items()}  # a value outside [0, 1] is clipped to 1
    more = exact_sums(extra, {k: np.append(v, -3.0) for k, v in POPULARITY.items()}, None)
    assert np.abs(np.subtract(more, sums)).max() <= 1 + 1e-9 and more[-1] == USERS + 1
    with pytest.raises(ValueError, match="not the same users"):
        exact_sums(CANDIDATE, {k: v[:-1] for k, v in POPULARITY.items()}, None)


def test_the_noise_of_every_sum_is_laplace_of_the_planned_scale(ledger):
    # 5 statistics at epsilon 0.5: scale b = 5 / 0.5 = 10, variance 200 on every sum (80
    # releases x 5 sums: the variance within about 45%, a scale off by 1.5x or more fails).
    sums = exact_sums(CANDIDATE, POPULARITY, None)
    errors = []
    for i in range(80):
        dp = release_evaluation(ledger, WINDOW, i, sums, None, 0.5, run_id=f"r{i}", dag_id="d", force=False,
                                parameters={})
        assert dp.noise_scale == pytest.approx(10.0) and dp.status == "new"
        [release] = [r for r in ledger.releases() if r.release_key == release_key(i)]
        errors.append(np.subtract(release.result["noisy_sums"], sums))
        assert [pure_epsilon(c) for c in release.components] == [(pytest.approx(0.5), 0.0)]
    errors = np.concatenate(errors)
    assert abs(errors.mean()) < 4 * math.sqrt(200 / errors.size)
    assert errors.var() == pytest.approx(200, rel=4 * math.sqrt(5 / errors.size))


def test_one_release_per_candidate_reused_and_the_decision_uses_only_the_noisy_means(ledger):
    sums = exact_sums(CANDIDATE, POPULARITY, CANDIDATE)
    first = release_evaluation(ledger, WINDOW, 7, sums, "2026-01-06-r5", 0.2, run_id="run-1", dag_id="d",
                               force=False, parameters={"training_release": 7})
    again = release_evaluation(ledger, WINDOW, 7, sums, "2026-01-06-r5", 0.2, run_id="run-2", dag_id="d",
                               force=False, parameters={"training_release": 7})
    assert again.status == "reuse" and (again.candidate, again.published) == (first.candidate, first.published)
    assert ledger.spend_at(WINDOW[1]).basic_epsilon == pytest.approx(0.2)  # charged once
    # Means: noisy sum / noisy count, in [0, 1]; with 2,000 users the noise (b = 6 / 0.2 = 30)
    # moves a mean by about 0.015.
    assert first.candidate["recall@20"] == pytest.approx(CANDIDATE["recall@20"].mean(), abs=0.1)
    assert set(first.dp_popularity) == {"recall@20"} and first.published_version == "2026-01-06-r5"
    # The gate reads nothing but the release: the same noisy means give the same decision,
    # whatever the exact metrics were.
    gate = GateSettings(min_gain_over_dp_popularity=0.0)
    assert decide(first, gate) == decide(again, gate)
    assert decide(first, gate)[0] == (first.candidate["recall@20"] > first.dp_popularity["recall@20"]
                                      and first.candidate["recall@20"] >= 0.95 * first.published["recall@20"])
    from dataclasses import replace

    worse = replace(first, candidate={**first.candidate, "recall@20": first.dp_popularity["recall@20"]})
    assert decide(worse, gate) == (False, f"DP Recall@20 {worse.candidate['recall@20']:.4f} does not beat DP "
                                          f"popularity ({worse.dp_popularity['recall@20']:.4f})")
    # -1 turns the popularity check off, even when the noisy candidate mean is clamped to 0.
    off = GateSettings(min_gain_over_dp_popularity=-1.0, tolerance=1.0)
    zero = replace(first, candidate={**first.candidate, "recall@20": 0.0})
    assert decide(zero, off)[0] and not decide(zero, gate)[0]
