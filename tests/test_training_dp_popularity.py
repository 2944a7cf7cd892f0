"""The DP popularity baseline (``evaluation.dp_popularity_counts``): the Gaussian variant's
noise is the analytic Gaussian's std for (epsilon, delta) at L2 sensitivity 1 and one user moves
the noiseless item sums by at most 1 in L2; the Laplace variant's bound K holds (one user moves
the noiseless counts by at most K in L1), its noise has scale K / epsilon_counts, and a K chosen
by the exponential mechanism spends its share of epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privrec_pipeline.training import evaluation as ev
from privrec_pipeline.training.data import Histories
from privrec_pipeline.training.evaluation import Split, dp_popularity_counts

V = 300


def _split(rows: list[list[int]]) -> Split:
    return Split(Histories.from_lists(rows), [np.array([0])] * len(rows), V)


def _rows(n_users: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.choice(V, size=int(rng.integers(1, 60)), replace=False).tolist() for _ in range(n_users)]


def _noiseless_gaussian_sums(split: Split) -> np.ndarray:
    lengths = np.diff(split.train.indptr)
    return np.bincount(split.train.items, weights=np.repeat(1 / np.sqrt(lengths), lengths), minlength=V)


def test_gaussian_popularity_has_the_analytic_gaussian_std_of_l2_sensitivity_1():
    from pipeline_dp.dp_computations import gaussian_delta

    split = _split(_rows(200))
    eps, delta = 1.0, 1e-6
    pop = dp_popularity_counts(split, eps, delta, mechanism="gaussian")
    # Balle & Wang 2018 (Algorithm 1, exact privacy profile): the std meets (eps, delta), and 2% less would not.
    assert gaussian_delta(pop.noise_std, eps) <= delta < gaussian_delta(0.98 * pop.noise_std, eps)
    assert pop.noise_std < math.sqrt(2 * math.log(1.25 / delta)) / eps  # tighter than the classical bound
    noise = pop.counts - _noiseless_gaussian_sums(split)
    assert noise.std() == pytest.approx(pop.noise_std, rel=5 / math.sqrt(2 * V))
    assert abs(noise.mean()) < 5 * pop.noise_std / math.sqrt(V)
    assert pop.max_items_per_user is None and pop.delta == delta


def test_one_user_moves_the_gaussian_sums_by_at_most_1_in_l2():
    rows = _rows(50, seed=1)
    base = _noiseless_gaussian_sums(_split(rows))
    for extra in ([5], list(range(V)), [1, 2, 3]):
        moved = _noiseless_gaussian_sums(_split([*rows, extra])) - base
        assert np.linalg.norm(moved) == pytest.approx(1.0)  # exactly 1: every item kept, normalized


def test_laplace_popularity_bounds_each_user_to_k_items_with_noise_of_scale_k_over_epsilon():
    rows = _rows(100, seed=2)
    split = _split(rows)
    base = ev.item_user_counts(split, 7)
    assert np.abs(ev.item_user_counts(_split([*rows, list(range(V))]), 7) - base).sum() == 7  # L1 <= K
    pop = dp_popularity_counts(split, 2.0, mechanism="laplace", max_items_per_user=7)
    assert pop.max_items_per_user == 7 and pop.delta == 0.0
    assert pop.noise_std == pytest.approx(math.sqrt(2) * 7 / 2.0)
    noise = pop.counts - base
    assert noise.std() == pytest.approx(pop.noise_std, rel=0.25)


def test_a_privately_chosen_k_spends_its_share_of_epsilon_and_fits_the_data():
    # Every user has exactly 3 items: K = 3 keeps everything at the least noise. K = 4 scores
    # 0.5 P sqrt(2) / epsilon_counts lower (P = 3000 items), K = 2 by 0.5 per user (5000): at these
    # epsilons the exponential mechanism (exp(epsilon_select score / U)) picks K = 3 but for e^-26.
    rng = np.random.default_rng(3)
    vocab = 3000
    rows = [rng.choice(vocab, size=3, replace=False).tolist() for _ in range(5000)]
    split = Split(Histories.from_lists(rows), [np.array([0])] * len(rows), vocab)
    pop = dp_popularity_counts(split, 50.0, mechanism="laplace", selection_share=0.2, max_items_upper=20)
    selection = pop.description["bound_selection"]
    assert selection["epsilon"] == pytest.approx(10.0) and selection["mechanism"] == "exponential"
    assert pop.max_items_per_user == 3
    assert pop.noise_std == pytest.approx(math.sqrt(2) * 3 / 40.0)  # the counts spend the other 80%


def test_dp_popularity_refuses_bad_settings():
    split = _split(_rows(5))
    with pytest.raises(ValueError, match="mechanism"):
        dp_popularity_counts(split, 1.0, mechanism="exponential")
    with pytest.raises(ValueError, match="delta"):
        dp_popularity_counts(split, 1.0, 0.0, mechanism="gaussian")
    with pytest.raises(ValueError, match="epsilon"):
        dp_popularity_counts(split, math.inf)
