"""The DP evaluation release (``models.dp_evaluation``) the publish gate decides on: paired
gains and the card's sums, each with Laplace noise of scale sensitivity / epsilon, epsilons
that add up to the release's, an epsilon chosen from the DP population, a gate that passes
a candidate no better than its threshold at most 1 - confidence of the time, and one release
per candidate, reused. No Spark."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import replace

import numpy as np
import pytest

from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.models.dp_evaluation import (
    choose_epsilon,
    exact_sums,
    gains,
    margin,
    noisy_means,
    noisy_sums,
    plan,
    release_evaluation,
    release_key,
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


def evaluate(ledger, key, metrics, published, gate, population=None, run="r"):
    return release_evaluation(ledger, WINDOW, key, metrics, published, gate, population, run_id=f"{run}{key}",
                              dag_id="d", force=False, parameters={})


@pytest.mark.parametrize("min_gain, tolerance", [(0.0, 0.05), (0.5, -0.5), (-0.5, 1.5), (-1.0, 0.0)])
def test_one_user_moves_every_sum_by_at_most_its_sensitivity(min_gain, tolerance):
    stats = plan(gains(True, min_gain, tolerance), True, 1.0)
    assert [s.name for s in stats][-6:] == ["candidate recall@20", "candidate ndcg@10", "candidate hr@10",
                                            "dp_popularity recall@20", "published recall@20", "users"]
    assert ("gain dp_popularity" in [s.name for s in stats]) == (min_gain > -1)
    base = exact_sums(stats, CANDIDATE, POPULARITY, POPULARITY)
    worst = np.zeros(len(stats))
    # Adding any one user (values outside [0, 1] are clipped): the largest change of every sum.
    for c in (0.0, 1.0, 7.5):
        for b in (-3.0, 0.0, 1.0):
            more = exact_sums(stats, {k: np.append(v, c) for k, v in CANDIDATE.items()},
                              {k: np.append(v, b) for k, v in POPULARITY.items()},
                              {k: np.append(v, b) for k, v in POPULARITY.items()})
            worst = np.maximum(worst, np.abs(np.subtract(more, base)))
    sensitivities = np.array([s.sensitivity for s in stats])
    assert np.all(worst <= sensitivities + 1e-9)
    assert np.allclose(worst, sensitivities)  # and the bound is reached: no noise wasted
    with pytest.raises(ValueError, match="not the same users"):
        exact_sums(stats, CANDIDATE, {k: v[:-1] for k, v in POPULARITY.items()}, POPULARITY)


def test_the_epsilons_add_up_and_every_sum_gets_laplace_noise_of_its_scale():
    stats = plan(gains(True, 0.0, 0.05), True, 0.5)
    assert sum(s.epsilon for s in stats) == pytest.approx(0.5)
    assert [s.epsilon for s in stats[:2]] == pytest.approx([0.7 * 0.5 / 2.0] * 2)  # same sensitivity 1: halves
    sums = np.array(exact_sums(stats, CANDIDATE, POPULARITY, CANDIDATE))
    errors = np.array([np.subtract(noisy_sums(stats, list(sums)), sums) for _ in range(4_000)])
    # Per statistic over 4,000 draws: the variance is 2 b^2 within 15% (5 standard errors; a
    # scale off by 1.1x or more fails), the mean within 4 standard errors of 0.
    for column, s in zip(errors.T, stats, strict=True):
        assert abs(column.mean()) < 4 * math.sqrt(2 * s.scale**2 / len(column)), s.name
        assert column.var() == pytest.approx(2 * s.scale**2, rel=0.15), s.name


def test_the_release_is_accounted_per_statistic_before_it_is_drawn(ledger):
    gate = GateSettings(epsilon=0.5)
    stats = plan(gains(False, 0.0, 0.05), False, 0.5)
    sums = exact_sums(stats, CANDIDATE, POPULARITY, None)
    dp = evaluate(ledger, 3, (CANDIDATE, POPULARITY, None), None, gate)
    assert dp.status == "new" and dp.epsilon == 0.5 and dp.population is None
    assert [s["scale"] for s in dp.statistics] == pytest.approx([s.scale for s in stats])
    [release] = [r for r in ledger.releases() if r.release_key == release_key(3)]
    assert release.epsilon == 0.5 and release.state == "committed"
    # The ledger is told every statistic as its own pure-epsilon component.
    assert [pure_epsilon(c)[0] for c in release.components] == pytest.approx([s.epsilon for s in stats])
    noisy = release.result["noisy_sums"]
    assert noisy != sums and max(abs(n - e) / s.scale for n, e, s in zip(noisy, sums, stats, strict=True)) < 30


def test_the_chosen_epsilon_resolves_the_gain_on_the_dp_population():
    weights = gains(True, 0.0, 0.05)
    epsilon = choose_epsilon(weights, 600.0, 0.01, 0.95, 10.0)
    stats = plan(weights, True, epsilon)
    for s in stats[:2]:  # both gains: a margin of exactly the resolution as a mean over 600 users
        assert margin(s.scale, 0.95) / 600 == pytest.approx(0.01)
    # A tenth of the users need ten times the epsilon; the bounds hold.
    assert choose_epsilon(weights, 60.0, 0.01, 0.95, 100.0) == pytest.approx(epsilon * 10)
    assert choose_epsilon(weights, 60.0, 0.01, 0.95, 1.0) == 1.0
    assert choose_epsilon(weights, 1e9, 0.01, 0.95, 1.0) == 0.2
    assert margin(1.0, 0.95) == pytest.approx(math.log(10))  # P(Laplace(1) < -ln 10) = 0.05


def test_a_candidate_no_better_than_dp_popularity_passes_at_most_one_time_in_twenty():
    # Exact gain 0 (the candidate scores like DP popularity): the gate passes it only when the
    # noise lifts the lower bound above 0, P = 0.05: about 200 of 4,000 draws (sd 14; 250 is
    # 3.6 sd). The same gate passes a candidate 3 resolutions better 99.5% of the time.
    users = 600
    same = {"recall@20": RNG.random(users) * 0.1, "ndcg@10": RNG.random(users), "hr@10": RNG.random(users)}
    better = {**same, "recall@20": same["recall@20"] + 0.03}
    weights = gains(False, 0.0, 0.05)
    stats = plan(weights, False, choose_epsilon(weights, users, 0.01, 0.95, 1.0))
    for candidate, low, high in ((same, 150, 250), (better, 3_940, 4_000)):
        sums = exact_sums(stats, candidate, same, None)
        passed = sum(noisy_means(stats, noisy_sums(stats, sums), 0.95)[1]["dp_popularity"]["lower"] > 0
                     for _ in range(4_000))
        assert low <= passed <= high


def test_one_release_per_candidate_reused_and_the_decision_uses_only_the_release(ledger):
    gate = GateSettings(epsilon=0.2)
    metrics = (CANDIDATE, POPULARITY, CANDIDATE)
    first = evaluate(ledger, 7, metrics, "2026-01-06-r5", gate, run="run-1")
    again = evaluate(ledger, 7, metrics, "2026-01-06-r5", gate, run="run-2")
    assert again.status == "reuse" and (again.candidate, again.gains) == (first.candidate, first.gains)
    assert ledger.spend_at(WINDOW[1]).basic_epsilon == pytest.approx(0.2)  # charged once
    assert set(first.gains) == {"dp_popularity", "published"} and first.published_version == "2026-01-06-r5"
    # Another published version since: the committed release is reused as it was made.
    later = evaluate(ledger, 7, (CANDIDATE, POPULARITY, None), None, gate, run="run-3")
    assert later.published_version == "2026-01-06-r5" and later.gains == first.gains
    # Other thresholds cannot be read off the committed gains: refused, naming the way out.
    with pytest.raises(ConfigurationError, match="force_release"):
        evaluate(ledger, 7, metrics, "2026-01-06-r5", GateSettings(epsilon=0.2, tolerance=0.2), run="run-4")
    # The decision reads nothing but the release.
    assert decide(first, gate) == decide(again, gate)
    assert decide(first, gate)[0] == (first.gains["dp_popularity"]["lower"] > 0
                                      and first.gains["published"]["lower"] > 0)
    worse = replace(first, gains={**first.gains, "dp_popularity": {"weight": 1.0, "mean": 0.01, "lower": -0.002}})
    ok, reason = decide(worse, gate)
    assert not ok and reason.startswith(f"DP Recall@20 {first.candidate['recall@20']:.4f} does not beat DP "
                                        f"popularity ({first.dp_popularity['recall@20']:.4f}) at confidence 0.95")
    below = replace(first, gains={**first.gains, "published": {"weight": 0.95, "mean": -0.01, "lower": -0.02}})
    assert not decide(below, gate)[0] and "published model 2026-01-06-r5" in decide(below, gate)[1]


def test_turning_the_checks_off_releases_no_gain(ledger):
    off = GateSettings(min_gain_over_dp_popularity=-1.0, epsilon=0.2)
    dp = evaluate(ledger, 1, (CANDIDATE, POPULARITY, None), None, off)
    assert dp.gains == {} and decide(dp, off) == (True, "no model published yet")
    assert sum(s["epsilon"] for s in dp.statistics) == pytest.approx(0.2)


@pytest.mark.parametrize("settings, message", [
    ({"epsilon": 0.0}, "epsilon must be a positive number"),
    ({"epsilon": "much"}, "epsilon must be a positive number"),
    ({"resolution": -0.1}, "resolution and max_epsilon must be positive"),
    ({"confidence": 1.0}, r"confidence must be in \[0.5, 1\)"),
    ({"min_gain_over_dp_popularity": -2.0}, "must be >= -1"),
])
def test_bad_gate_settings_are_refused_by_name(settings, message):
    with pytest.raises(ConfigurationError, match=message):
        GateSettings(**settings)
