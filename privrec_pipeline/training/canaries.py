"""Canary users of the training audit (``privacy.one_run_audit``), inserted in the run itself.

A run with ``TrainConfig.audit_canaries`` = m > 0 trains m extra parameters besides the
model's, the canary block, which the model's loss never touches: real users' gradients there
are exactly 0. Canary c belongs to partition c mod P and is included in the run with
probability 1/2 (S_c, from the run's canary key). An included canary is a user like any
other of its partition for the DP mechanism: Poisson-sampled at the partition's rate q in
every step (from the partition's secret, like real users), its gradient is a Dirac vector
CANARY_NORM e_c in the block, clipped to C like every user's (so it contributes C e_c, the
largest change one user can make, in one coordinate: Nasr et al. 2023, "Tight Auditing of
Differentially Private Machine Learning", USENIX Security, white-box Dirac canaries), and
the block gets the same Gaussian noise (its share, in distributed mode) and the same
denominator and optimizer as every parameter. The block's noise comes from its own stream,
and every optimizer involved (FedAvg, Adam) works coordinate by coordinate, so the model's
parameters are bit for bit those of the same run without canaries.

After the run the auditor reads only the final block (the released aggregates' canary
coordinates, so post-processing of the DP release): the score of canary c is minus its
coordinate (a gradient step moves an included canary's coordinate down), and the one-run
audit turns the scores and S into an epsilon lower bound at a confidence.

What it covers: the sampling rate, the noise scale and its shares, the fixed denominator,
the composition over steps, rounds and partitions, secure aggregation and the accountant's
calibration, end to end through ``partition_update``. What it does not: the clipping of real
users' gradients (the canary's norm is known; the closed-form norms are tested in
``tests/test_training.py``). The block depends on no real user's data, so the audit's result
reveals nothing about them and costs no budget; the model written for publication never
contains the block.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch

from privrec_pipeline.training.secure_random import SecureRandom

CANARY_NORM = 10.0
"""A canary's gradient norm before clipping (larger than any sensible C, so the clipping binds)."""


@dataclass(frozen=True)
class Canaries:
    count: int
    key: bytes  # S's key: not a user secret (S is about canaries only), kept with the run's plan

    @classmethod
    def new(cls, count: int) -> Canaries | None:
        return cls(count, secrets.token_bytes(32)) if count > 0 else None

    @classmethod
    def from_doc(cls, doc: dict | None) -> Canaries | None:
        return cls(int(doc["count"]), bytes.fromhex(doc["key"])) if doc else None

    def to_doc(self) -> dict:
        return {"count": self.count, "key": self.key.hex()}

    def __repr__(self) -> str:
        return f"Canaries(count={self.count})"

    def included(self) -> np.ndarray:
        """S: which canaries are in the run (each with probability 1/2)."""
        return SecureRandom.derive(self.key, "canary-inclusion", "", 0, 0).bernoulli(self.count, 0.5)

    def members(self, partition: int, partitions: int) -> np.ndarray:
        """The included canaries of ``partition`` (block coordinates)."""
        index = np.arange(partition, self.count, partitions)
        return index[self.included()[index]]


class CanaryBlock:
    """A partition's canary coordinates in one round: the torch parameter the optimizer steps,
    and the gradient of each step (sampled canaries, clipped, noised, divided)."""

    def __init__(self, canaries: Canaries, values: np.ndarray, *, secret: bytes, run_id: str, round_index: int,
                 partition: int, partitions: int) -> None:
        self.parameter = torch.nn.Parameter(torch.from_numpy(np.asarray(values)).float())
        self.members = canaries.members(partition, partitions)
        self.sampling = SecureRandom.derive(secret, "canary-sampling", run_id, round_index, partition)
        self.noise = SecureRandom.derive(secret, "canary-noise", run_id, round_index, partition)

    def step_gradient(self, sampling_rate: float, clip_norm: float, noise_std: float, denominator: float) -> None:
        """Set the block's gradient for one DP step (as ``dp.dp_gradient`` does for the model)."""
        sampled = self.members[self.sampling.bernoulli(self.members.size, sampling_rate)]
        grad = np.zeros(self.parameter.numel())
        # A Dirac gradient of norm CANARY_NORM, clipped by min(1, C / norm) (Abadi et al. 2016).
        grad[sampled] = CANARY_NORM * min(1.0, clip_norm / CANARY_NORM)
        if noise_std > 0:
            grad += self.noise.standard_normal(grad.size) * noise_std
        self.parameter.grad = torch.from_numpy(grad / denominator).to(self.parameter.dtype)

    def values(self) -> np.ndarray:
        return self.parameter.detach().double().numpy()

    def gradient(self) -> np.ndarray:
        return self.parameter.grad.double().numpy()


def audit_run(canaries: Canaries, block: np.ndarray, claimed_epsilon: float, delta: float,
              confidence: float = 0.99):
    """The one-run audit of a finished run from its final canary block (scores: minus each
    coordinate; the block started at 0)."""
    from privrec_pipeline.privacy.one_run_audit import audit

    return audit(-np.asarray(block, dtype=float), canaries.included(), claimed_epsilon, delta, confidence)
