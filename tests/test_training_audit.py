"""The training audit (``training.canaries`` + ``privacy.one_run_audit``) through the training
code itself: a correct run at epsilon 1 passes, the same run with its noise turned off fails,
the canaries never change the model's parameters, and a canary's gradient is clipped, sampled
and noised like a user's."""

from __future__ import annotations

import numpy as np
import pytest
from test_training import V, _histories

from privrec_pipeline.training import federated as fed
from privrec_pipeline.training.canaries import Canaries, CanaryBlock
from privrec_pipeline.training.federated import (
    TrainConfig,
    flatten,
    new_model,
    partition_update,
    plan_privacy,
    train_in_process,
)

SHARDS = [_histories(60, seed=s) for s in (1, 2)]


def _config(mode: str, **overrides) -> TrainConfig:
    # q = 1 (every user, and every included canary, in every step): the strongest canary signal.
    values = {"mode": mode, "epsilon": 1.0, "rounds": 4, "local_steps": 3, "dim": 4, "audit_canaries": 500,
              "batch_size": 60 if mode == "local" else 120, **overrides}
    return TrainConfig(**values)


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_a_correct_run_at_epsilon_1_passes_and_without_noise_it_fails(mode, monkeypatch):
    result = train_in_process(_config(mode), SHARDS, V)
    assert result.audit.passed and result.audit.epsilon_lower <= 1.0, result.audit.to_dict()
    assert result.audit.claimed_epsilon == pytest.approx(result.plan.epsilon)
    monkeypatch.setattr(fed, "noise_std_share", lambda *args: 0.0)  # a run that forgot its noise
    broken = train_in_process(_config(mode), SHARDS, V)
    assert broken.plan.noise_std_per_partition == 0.0
    assert not broken.audit.passed and broken.audit.epsilon_lower > 2.5, broken.audit.to_dict()


def test_a_large_claim_is_not_refuted_and_nonprivate_runs_have_no_audit():
    result = train_in_process(_config("local", epsilon=8.0), SHARDS, V)
    assert result.audit.passed and 0 < result.audit.epsilon_lower < 8.0
    assert train_in_process(_config("nonprivate"), SHARDS, V).audit is None
    assert train_in_process(_config("local", audit_canaries=0), SHARDS, V).audit is None
    with pytest.raises(Exception, match="audit_canaries"):
        _config("local", audit_canaries=5)


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_canaries_leave_the_model_parameters_bit_for_bit_unchanged(mode):
    config = _config(mode, batch_size=6)
    plan = plan_privacy(config, [60, 60])
    start = flatten(new_model(config, V))
    canaries = Canaries.new(500)
    common = {"round_index": 0, "partition": 1, "partitions": 2, "secret": b"k" * 32, "run_id": "run-1"}
    plain, _ = partition_update(config, plan, start, V, SHARDS[1], **common)
    audited, _ = partition_update(config, plan, np.concatenate([start, np.zeros(500)]), V, SHARDS[1],
                                  canaries=canaries, **common)
    assert audited.size == start.size + 500
    np.testing.assert_array_equal(audited[:start.size], plain)
    moved = np.flatnonzero(audited[start.size:])
    assert moved.size == 500  # the block's noise reaches every coordinate, in both partitions' blocks


def test_a_canary_gradient_is_clipped_sampled_and_only_of_its_partition():
    canaries = Canaries(100, b"c" * 32)
    included = canaries.included()
    assert 30 < included.sum() < 70  # about half
    block = CanaryBlock(canaries, np.zeros(100), secret=b"s" * 32, run_id="r", round_index=0, partition=1,
                        partitions=3)
    assert set(block.members) == {c for c in range(1, 100, 3) if included[c]}
    block.step_gradient(1.0, clip_norm=0.1, noise_std=0.0, denominator=4.0)
    grad = block.gradient()
    np.testing.assert_allclose(grad[block.members], 0.1 / 4.0, rtol=1e-6)  # C / denominator, clipped from 10
    assert np.count_nonzero(grad) == block.members.size
    block.step_gradient(0.3, clip_norm=0.1, noise_std=0.0, denominator=1.0)
    assert 0 < np.count_nonzero(block.gradient()) < block.members.size  # Poisson-sampled at q
    block.step_gradient(0.0, clip_norm=0.1, noise_std=2.0, denominator=1.0)
    assert np.std(block.gradient()) == pytest.approx(2.0, rel=0.5)  # the noise of every coordinate
    assert "key" not in repr(canaries) and canaries.to_doc()["count"] == 100
    assert Canaries.from_doc(canaries.to_doc()) == canaries and Canaries.from_doc(None) is None
