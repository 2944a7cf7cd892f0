"""The training's DP randomness comes from a CSPRNG keyed by the partition's secret: it is
deterministic for one key (retries), differs for every other key, round, run and partition,
has the right distribution, never comes from torch's generators, and one noisy gradient has
the planned per-coordinate scale."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from privrec_pipeline.training import federated
from privrec_pipeline.training.data import Histories
from privrec_pipeline.training.dp import Batch, dp_gradient
from privrec_pipeline.training.federated import (
    TrainConfig,
    flatten,
    load_flat,
    new_model,
    partition_update,
    plan_privacy,
)
from privrec_pipeline.training.secure_random import SecureRandom

V = 40
SECRET = b"s" * 32


def _histories(n_users: int, seed: int = 0) -> Histories:
    rng = np.random.default_rng(seed)
    rows = [rng.choice(V, size=int(rng.integers(1, 9)), replace=False).tolist() for _ in range(n_users)]
    return Histories.from_lists(rows, [rng.uniform(0.5, 3.0, size=len(r)).tolist() for r in rows])


def test_the_stream_is_deterministic_per_key_and_differs_for_every_other_key():
    def draw(secret=SECRET, purpose="noise", run="run-1", round_index=0, partition=0) -> np.ndarray:
        return SecureRandom.derive(secret, purpose, run, round_index, partition).words(64)

    assert np.array_equal(draw(), draw())  # a retried task draws the same
    others = [draw(secret=b"t" * 32), draw(purpose="dropout"), draw(run="run-2"), draw(round_index=1),
              draw(partition=1)]
    for other in others:
        assert not np.any(other == draw())  # 64 independent 64-bit words: no coincidence
    stream = SecureRandom(b"k" * 32)
    first = stream.words(8)
    assert not np.array_equal(stream.words(8), first)  # the stream moves on
    assert "k" * 8 not in repr(stream)


def test_gaussian_samples_are_standard_normal():
    from scipy import stats

    n = 200_000
    z = SecureRandom.derive(SECRET, "noise", "run-1", 0, 0).standard_normal(n)
    assert z.dtype == np.float64 and z.shape == (n,)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert z.var() == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)  # tails of a Gaussian, not just its variance


def test_uniforms_and_bernoulli_draws_have_53_random_bits_and_the_right_rate():
    from scipy import stats

    stream = SecureRandom(b"u" * 32)
    u = stream.uniform(100_000)
    assert u.min() >= 0.0 and u.max() < 1.0 and stats.kstest(u, "uniform").pvalue > 1e-3
    assert np.all((u * 2.0**53) == np.floor(u * 2.0**53))  # on the 2^-53 grid
    assert np.any((u * 2.0**52) % 1 != 0)  # using its last bit
    sampled = stream.bernoulli(100_000, 0.03)
    assert sampled.mean() == pytest.approx(0.03, abs=5 * math.sqrt(0.03 * 0.97 / 100_000))


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_training_noise_and_sampling_do_not_come_from_torch_generators(mode, monkeypatch):
    """Sampling and noise come from the secret's keystream: torch's random functions may all fail,
    the update still comes out, equal for equal secrets and different for different ones."""
    h = _histories(30)
    config = TrainConfig(mode=mode, epsilon=3.0, rounds=1, local_steps=2, batch_size=30, dim=8, input_dropout=0.0)
    plan = replace(plan_privacy(config, [h.users]), sampling_rates=[0.5])  # sampling too (the noise: q = 1's)
    model = new_model(config, V)  # the public initialization (the config's seed) may use torch
    start = flatten(model)
    monkeypatch.setattr(federated, "new_model", lambda config, vocab, item_category=None: copy.deepcopy(model))

    class Refused:  # a class, so that annotations such as ``torch.Generator | None`` still evaluate
        def __init__(self, *args, **kwargs):
            raise AssertionError("training randomness drawn from torch")

    for name in ("rand", "randn", "randint", "normal", "bernoulli", "poisson", "randperm", "Generator"):
        monkeypatch.setattr(torch, name, Refused)
    torch.manual_seed(0)  # and torch's global state does not matter either

    def update(secret: bytes) -> np.ndarray:
        return partition_update(config, plan, start, V, h, round_index=0, partition=0, partitions=1,
                                secret=secret, run_id="run-1")[0]

    first = update(SECRET)
    assert np.isfinite(first).all() and np.abs(first).max() > 0
    torch.manual_seed(1)
    assert np.array_equal(update(SECRET), first)
    assert not np.array_equal(update(b"t" * 32), first)


@pytest.mark.parametrize("tolerance", [0, 1])
def test_one_noisy_gradient_has_the_planned_per_coordinate_std(tolerance):
    """Distributed mode, P = 2, every user sampled (q = 1): the partition's update is minus its
    noisy gradient share (before the server optimizer). Minus the exact clipped sum, what is
    left is the noise: std sigma C / sqrt(P - t) / (q N) per coordinate."""
    shards = [_histories(25, seed=1), _histories(35, seed=2)]
    total = 60
    clip = 0.3  # C != 1: sigma and sigma C differ
    config = TrainConfig(mode="distributed", epsilon=2.0, rounds=3, batch_size=total, dim=32, clip_norm=clip,
                         input_dropout=0.0, collusion_tolerance=tolerance)
    plan = plan_privacy(config, [s.users for s in shards])
    assert plan.sampling_rates == [1.0, 1.0]
    start = flatten(new_model(config, V))
    update, stats = partition_update(config, plan, start, V, shards[0], round_index=0, partition=0, partitions=2,
                                     secret=SECRET, run_id="run-1")
    assert stats["sampled"] == 25
    clean_model = new_model(config, V)
    load_flat(clean_model, start)
    dp_gradient(clean_model, Batch(*shards[0].batch(np.arange(25))), clip_norm=clip, noise_std=0.0,
                denominator=total, generator=None, noise=None)
    clean = torch.cat([p.grad.reshape(-1) for p in clean_model.parameters()]).double().numpy()
    noise = -update - clean
    expected = plan.noise_multiplier * clip / math.sqrt(2 - tolerance) / (1.0 * total)
    n = noise.size
    assert n == V * 32 * 2 + 2 * V  # every trainable coordinate is noised
    assert noise.std() == pytest.approx(expected, rel=5 * math.sqrt(1 / (2 * n)))
    assert abs(noise.mean()) < 5 * expected / math.sqrt(n)
