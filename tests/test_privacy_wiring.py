"""Privacy properties of how the mechanisms are wired together (no Spark), written for the
mutants of ``scripts/mutants.py`` that the rest of the suite did not kill:

- partition selection in the DP statistics keeps a key of n users at the keep probability of
  the selection's planned (epsilon, delta) share, computed here from the paper's recurrence;
- the ledger charges a DP statistics release and a training run exactly what they spend: no
  statistic left out, no step or sampling rate understated (and nothing overstated);
- training samples users at the accounted rate, bounds one user's influence on a partition's
  update by the clip norm, and hands every local step's optimizer the full noise;
- each Gaussian sample of the training noise takes four Box-Muller draws of the keystream;
- the secure aggregation's pads come from the pairs' shared secrets, not from public data.

Expected numbers are computed in the tests from the documented defaults and the cited
formulas, not taken from the code under test."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from privrec_pipeline.dp_stats.noise import add_noise
from privrec_pipeline.dp_stats.params import DPStatsParams
from privrec_pipeline.privacy.accounting import composed_epsilon, pure_epsilon
from privrec_pipeline.schema import EVENT_TYPES
from privrec_pipeline.training import secure_agg
from privrec_pipeline.training.data import Histories
from privrec_pipeline.training.federated import (
    TrainConfig,
    flatten,
    new_model,
    partition_update,
    plan_privacy,
)
from privrec_pipeline.training.secure_random import SecureRandom
from privrec_pipeline.training.tasks import training_components

V = 40


# -- DP statistics ----------------------------------------------------------------------------


def _keep_probability(users: int, epsilon: float, delta: float, max_partitions: int) -> float:
    """pi(n) of the truncated geometric partition selection (Desfontaines, Voss, Gipson &
    Mandayam 2022, Thm. 1) at the per-key budget (epsilon / m, delta / m)."""
    eps, dlt = epsilon / max_partitions, delta / max_partitions
    pi = 0.0
    for _ in range(users):
        pi = min(math.exp(eps) * pi + dlt, 1 + math.exp(-eps) * (pi + dlt - 1), 1.0)
    return pi


def _aggregates(item_users: dict[str, int]):
    """Bounded aggregates as the Spark step collects them: one row per candidate item."""
    names = list(item_users)
    items = pa.table({"item_id": names, "users": [item_users[n] for n in names],
                      **{t: [item_users[n] for n in names] for t in EVENT_TYPES}})
    funnel = pa.table({t: [1000] for t in EVENT_TYPES})
    categories = pa.table({"category": ["books"], "users": [1000], "events": [5000]})
    purchases = pa.table({"price_sum_centred": [0.0], "purchases": [100]})
    return items, funnel, categories, purchases


def test_an_item_is_kept_at_the_keep_probability_of_its_planned_selection_budget():
    # epsilon 1.02, delta 0.1 (large, so that rates are measurable): item selection gets 0.4 of
    # epsilon (the default weights sum to 1.02) and 0.8 of delta (the default split), K = 5 items per user.
    params = DPStatsParams(epsilon=1.02, delta=0.1)
    sizes, per_size, runs = (1, 4, 10, 20), 250, 16
    candidates = {f"itm_{n}_{i}": n for n in sizes for i in range(per_size)}
    kept = dict.fromkeys(sizes, 0)
    for _ in range(runs):
        for item in add_noise(*_aggregates(candidates), params, dropped=0).items.column("item_id").to_pylist():
            kept[candidates[item]] += 1
    draws = per_size * runs
    for n in sizes:
        p = _keep_probability(n, 0.4, 0.08, 5)
        assert kept[n] / draws == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / draws) + 1e-9), n


def _shares(weights: dict[str, float], epsilon: float, delta: float) -> dict[str, tuple[float, float]]:
    total = sum(weights.values())
    selections = [s for s in ("item_selection", "category_selection") if s in weights]
    delta_weights = {"item_selection": 0.8, "category_selection": 0.2}
    delta_total = sum(delta_weights[s] for s in selections)
    return {s: (epsilon * w / total, delta * delta_weights[s] / delta_total if s in selections else 0.0)
            for s, w in weights.items()}


@pytest.mark.parametrize("settings, weights", [
    ({}, {"item_selection": 0.4, "item_users": 0.2, "item_events": 0.1, "funnel_users": 0.05,
          "category_selection": 0.1, "category_events": 0.05, "purchase_price_sum": 0.05, "purchase_count": 0.05,
          "bounding_bias": 0.02}),
    # user weights that do not sum to 1, and public categories (no category selection)
    ({"epsilon_split": {"item_selection": 0.8}, "public_categories": ("books",)},
     {"item_selection": 0.8, "item_users": 0.2, "item_events": 0.1, "funnel_users": 0.05, "category_events": 0.05,
      "purchase_price_sum": 0.05, "purchase_count": 0.05, "bounding_bias": 0.02}),
], ids=["default_split", "own_weights"])
def test_the_ledger_charges_a_dp_stats_release_what_each_statistic_spends(settings, weights):
    params = DPStatsParams(epsilon=1.0, delta=1e-8, **settings)
    charged = {c.label: pure_epsilon(c) for c in params.components()}
    expected = _shares(weights, 1.0, 1e-8)
    assert set(charged) == set(expected)  # every statistic the release computes, and nothing else
    for name, (epsilon, delta) in expected.items():
        assert charged[name] == (pytest.approx(epsilon, rel=1e-9), pytest.approx(delta, rel=1e-9, abs=0)), name
    assert params.spent() == (pytest.approx(1.0), pytest.approx(1e-8))
    # Composed tightly at a policy delta, the release costs its whole epsilon (a Laplace count
    # reaches its worst-case loss with probability 1/2, so k of them compose to the sum).
    assert composed_epsilon(params.components(), 1e-6) == pytest.approx(1.0, rel=2e-3)


# -- training ---------------------------------------------------------------------------------


def _histories(n_users: int, seed: int = 0) -> Histories:
    rng = np.random.default_rng(seed)
    rows = [rng.choice(V, size=int(rng.integers(1, 9)), replace=False).tolist() for _ in range(n_users)]
    return Histories.from_lists(rows, [rng.uniform(0.5, 3.0, size=len(r)).tolist() for r in rows])


@pytest.mark.parametrize("mode, worst_rate, steps", [("local", 20 / 100, 3 * 4), ("distributed", 20 / 750, 3)],
                         ids=["local", "distributed"])
def test_the_ledger_charges_a_training_run_its_planned_epsilon(mode, worst_rate, steps):
    """The ledger's components, replayed by dp_accounting's RDP accountant, give the plan's
    epsilon (the target): local mode accounts every local step of the smallest partition (the
    largest sampling rate), distributed mode one step per round at batch / all users."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    config = TrainConfig(mode=mode, epsilon=2.0, rounds=3, local_steps=4, batch_size=20)
    plan = plan_privacy(config, [400, 100, 250])
    assert plan.epsilon == pytest.approx(2.0, rel=1e-3)

    def rdp_epsilon(event) -> float:
        accountant = RdpAccountant()
        accountant.compose(event)
        return float(accountant.get_epsilon(config.delta))

    step = dp_event.PoissonSampledDpEvent(worst_rate, dp_event.GaussianDpEvent(plan.noise_multiplier))
    assert rdp_epsilon(dp_event.SelfComposedDpEvent(step, steps)) == pytest.approx(plan.epsilon, rel=1e-3)
    ledger = dp_event.ComposedDpEvent([c.to_dp_event() for c in training_components(config, plan)])
    assert rdp_epsilon(ledger) == pytest.approx(plan.epsilon, rel=1e-3)
    # The ledger's own (tight, PLD) composition of the same components is within the plan's.
    assert composed_epsilon(training_components(config, plan), config.delta) <= plan.epsilon * 1.001


def test_poisson_sampling_draws_users_at_the_accounted_rate():
    h = _histories(1000)
    config = TrainConfig(mode="local", epsilon=4.0, rounds=1, local_steps=8, batch_size=100, dim=4,
                         input_dropout=0.0)
    plan = plan_privacy(config, [h.users])
    assert plan.sampling_rates == [0.1]
    _, stats = partition_update(config, plan, flatten(new_model(config, V)), V, h, round_index=0, partition=0,
                                partitions=1, secret=b"s" * 32, run_id="run-1")
    # stats["sampled"]: mean users per step over 8 steps of Binomial(1000, 0.1) draws
    assert stats["sampled"] == pytest.approx(100, abs=5 * math.sqrt(1000 * 0.1 * 0.9 / 8))


def test_one_user_moves_a_partition_update_by_at_most_the_clip_norm():
    """Distributed mode, every user sampled, the noise share taken out of the plan: the
    partition's update is minus its clipped gradient sum / (q N), so adding any one user, however
    extreme, moves it by at most C / (q N) in L2 (the sensitivity the noise is calibrated to)."""
    clip, total = 0.05, 62  # C below most users' gradient norms: clipping is active
    config = TrainConfig(mode="distributed", epsilon=2.0, rounds=1, batch_size=1000, dim=8, clip_norm=clip,
                         input_dropout=0.0)
    plan = replace(plan_privacy(config, [31, 31]), noise_std_per_partition=0.0)
    assert plan.sampling_rates == [1.0, 1.0]
    normal = _histories(30, seed=5)
    start = flatten(new_model(config, V))

    def update(shard: Histories) -> np.ndarray:
        return partition_update(config, plan, start, V, shard, round_index=0, partition=0, partitions=2,
                                secret=b"s" * 32, run_id="run-1")[0]

    without = update(normal)
    rows = [normal.row(u).tolist() for u in range(normal.users)]
    weights = [normal.weights[normal.indptr[u]:normal.indptr[u + 1]].tolist() for u in range(normal.users)]
    for items, w in (([*range(V)], [100.0] * V), ([5], [1e6]), ([7, 8], [1e-6, 1e6])):
        moved = update(Histories.from_lists([*rows, items], [*weights, w])) - without
        assert np.linalg.norm(moved) <= clip / total * (1 + 1e-4)
        if len(items) < V:  # (a uniform history has a near-zero gradient at initialization)
            assert np.linalg.norm(moved) > 0.5 * clip / total  # clipped to C, not dropped


def test_every_local_step_hands_the_optimizer_a_gradient_with_the_full_noise(monkeypatch):
    """Local mode, P = 3: each step's gradient carries N(0, (sigma C)^2) / (q n) per coordinate in
    every partition (not a share of it). Two secrets, every user sampled, dropout off: the clipped
    sums are equal, so the difference of the two gradients is two noise draws."""
    recorded: list[np.ndarray] = []

    class Recorder:  # the optimizer sees the noisy gradient; it does not move the model
        def __init__(self, params, lr):
            self.params = list(params)

        def step(self):
            recorded.append(torch.cat([p.grad.reshape(-1) for p in self.params]).double().numpy().copy())

    monkeypatch.setattr(torch.optim, "Adam", Recorder)
    h, clip, steps = _histories(50, seed=6), 0.3, 3
    config = TrainConfig(mode="local", epsilon=3.0, rounds=1, local_steps=steps, batch_size=50, dim=16,
                         clip_norm=clip, input_dropout=0.0)
    plan = plan_privacy(config, [h.users] * 3)
    assert plan.sampling_rates == [1.0] * 3
    start = flatten(new_model(config, V))
    for secret in (b"1" * 32, b"2" * 32):
        partition_update(config, plan, start, V, h, round_index=0, partition=1, partitions=3, secret=secret, run_id="run-1")
    assert len(recorded) == 2 * steps
    difference = np.concatenate([recorded[s] - recorded[steps + s] for s in range(steps)])
    expected = math.sqrt(2) * plan.noise_multiplier * clip / (1.0 * h.users)
    assert difference.std() == pytest.approx(expected, rel=5 / math.sqrt(2 * difference.size))


def test_a_gaussian_sample_uses_four_keystream_words():
    """Each standard normal is the sum of four Box-Muller draws / 2 (two pairs of 53-bit
    uniforms; Holohan & Braghin 2021, Opacus' secure_mode): n samples take 4n keystream words,
    so telling which draws produced an observed float means searching about 2^159 combinations
    instead of 2^53 (the floating-point attack on a single draw)."""
    stream, reference = SecureRandom(b"k" * 32), SecureRandom(b"k" * 32)
    stream.standard_normal(100)
    reference.words(4 * 100)
    assert np.array_equal(stream.words(4), reference.words(4))


def test_a_pad_comes_from_the_pairs_shared_secret():
    """Same run, round, partition and update, other partition secrets: an entirely different
    masked vector. A pad computable from public data (run, round, partition numbers, public
    keys) would let the aggregator strip it."""
    def masked(first: int) -> np.ndarray:
        keys = [secure_agg.RoundKeys.derive(bytes([first + k]) * 32, "run-1", 0, k) for k in range(3)]
        public = {k: keys[k].public_bytes() for k in range(3)}
        return secure_agg.mask_update(np.zeros(1000), keys[0], public, "run-1", 0)

    assert np.array_equal(masked(1), masked(1))
    assert np.mean(masked(1) == masked(7)) < 0.01
