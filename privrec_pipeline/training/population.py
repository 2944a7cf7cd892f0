"""The population a training run samples from: a DP count of each partition's users.

DP-SGD's amplification by sampling holds for the Poisson rate q the run samples users with
(Mironov, Talwar & Zhang 2019, "Renyi differential privacy of the sampled Gaussian
mechanism"), whatever public number q is. Set from the exact partition size n, q = batch / n
would publish n (the model card and ``training.json`` show q), and so would a gradient
normalized by the exact q n. So the run first releases a DP count n^ of every partition's
users, on its own in the ledger (release key ``population``, the training run's window):

- Laplace noise of scale 1 / epsilon on each count (PyDP). The partitions hold disjoint
  users, so one user changes one count by 1: the vector of counts has L1 sensitivity 1
  (parallel composition, Dwork & Roth 2014, Sec. 3.3), one pure epsilon-DP component.
- q_k = min(1, batch / n^_k) and the gradient's denominator q_k n^_k (the expected batch: the
  fixed lot size of Abadi et al. 2016) are post-processing of n^, and the accountant is told
  the q the run actually samples with: the guarantee is exact for any n^. The count's error
  only moves the expected batch (q n, not q n^).
- Noise is drawn when the release is computed and never written before it is committed: a
  retry after a crash draws again under the same charge (nothing of the first draw left the
  process); a committed release is reused by every later run of the window.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from privrec_pipeline.errors import ConfigurationError

RELEASE_KEY = "population"


@dataclass(frozen=True)
class Population:
    partition_users: list[int]  # the DP counts n^_k (>= 1)
    epsilon: float
    release_id: int
    status: str  # the ledger's: "new", "resume" or "reuse"

    def to_dict(self) -> dict[str, Any]:
        return {"partition_users": self.partition_users, "epsilon": self.epsilon, "release_id": self.release_id,
                "mechanism": "Laplace, L1 sensitivity 1 over the partitions' counts (disjoint users)",
                "library": "PyDP LaplaceMechanism"}


def components(epsilon: float) -> list:
    from privrec_pipeline.privacy.accounting import Component

    return [Component("laplace", noise_multiplier=1.0 / epsilon, label="partition user counts")]


def noisy_counts(sizes: list[int], epsilon: float) -> list[int]:
    """n^_k = max(1, round(n_k + Laplace(1 / epsilon))): rounding and the floor at 1 (a
    sampling rate needs a positive population) are post-processing."""
    from privrec_pipeline.privacy.mechanisms import LaplaceNoise

    noise = LaplaceNoise(epsilon, 1.0)
    return [max(1, noise.count(int(n))) for n in sizes]


def release_population(ledger: Any, window: tuple[dt.date, dt.date], sizes: list[int], epsilon: float, *,
                       run_id: str, dag_id: str, force: bool, parameters: dict[str, Any]) -> Population:
    """Reserve, compute and commit (or reuse) the window's DP partition counts."""
    if not (epsilon > 0):
        raise ConfigurationError(f"TrainConfig: population_epsilon must be positive, not {epsilon!r}")
    reservation = ledger.reserve(RELEASE_KEY, window[0], window[1], components(epsilon), epsilon=epsilon, delta=0.0,
                                 dag_id=dag_id, run_id=run_id, force=force,
                                 parameters={**parameters, "partitions": len(sizes), "epsilon": epsilon})
    release = reservation.release
    if reservation.status == "reuse":
        counts = list((release.result or {}).get("partition_users") or [])
        if len(counts) != len(sizes):
            raise ConfigurationError(
                f"the committed population release {release.id} of {window[0]}..{window[1]} counts {len(counts)} "
                f"partitions, this run has {len(sizes)}: rerun with force_release to count (and pay for) them again")
        return Population(counts, epsilon, release.id, reservation.status)
    counts = noisy_counts(sizes, epsilon)
    ledger.commit(release.id, {"partition_users": counts}, run_id=run_id)
    return Population(counts, epsilon, release.id, reservation.status)
