"""DP evaluation metrics: what the publish gate decides on and the model card shows.

Exact hold-out metrics are functions of the users' data, and so is a publish decision made
from them (model selection on private data: Papernot & Steinke 2022, "Hyperparameter tuning
with Renyi differential privacy"). So the evaluation is a release of its own, accounted in
the ledger before it is computed (release key ``evaluation-r<training release id>``, the
training run's window; one per candidate, reused by every rerun):

- each hold-out user contributes a value in [0, 1] to each released sum: the candidate's
  Recall@20, NDCG@10 and HR@10, DP popularity's Recall@20 and, when a model is published, its
  Recall@20; and 1 to the user count. One user changes the vector of sums by at most its
  length in L1, so PyDP's Laplace mechanism with that L1 sensitivity on every coordinate is
  pure epsilon-DP (the vector Laplace mechanism, Dwork & Roth 2014, Thm 3.6);
- the means are noisy sum / max(noisy count, 1), clamped to [0, 1]; the gate compares
  those (post-processing of the release: the decision costs nothing more, and nothing
  exact decides what is published).

The noise is drawn when the release is computed and not written before it is committed, so a
retry after a crash draws again under the same charge (nothing of the first draw left the
process); after the commit every rerun reads the committed values.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from privrec_pipeline.errors import ConfigurationError

CANDIDATE = ("recall@20", "ndcg@10", "hr@10")


def release_key(training_release: int) -> str:
    return f"evaluation-r{training_release}"


@dataclass(frozen=True)
class DPEvaluation:
    candidate: dict[str, float]  # Recall@20, NDCG@10, HR@10 (noisy means)
    dp_popularity: dict[str, float]  # Recall@20
    published: dict[str, float] | None  # Recall@20 of the published model, when there is one
    published_version: str | None
    epsilon: float
    noise_scale: float  # of each noisy sum and of the count
    release_id: int
    status: str  # the ledger's: "new", "resume" or "reuse"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def statistics(published: bool) -> list[str]:
    """The released sums (``<model> <metric>``), in order, then ``users``."""
    return ([f"candidate {m}" for m in CANDIDATE] + ["dp_popularity recall@20"]
            + (["published recall@20"] if published else []) + ["users"])


def exact_sums(candidate: dict[str, np.ndarray], dp_popularity: dict[str, np.ndarray],
               published: dict[str, np.ndarray] | None) -> list[float]:
    """The sums of ``statistics(published is not None)``, each user's value clipped to [0, 1]."""
    parts = [candidate[m] for m in CANDIDATE] + [dp_popularity["recall@20"]]
    if published is not None:
        parts.append(published["recall@20"])
    users = {len(p) for p in parts}
    if len(users) != 1:
        raise ValueError(f"per-user metrics of different lengths {sorted(users)}: not the same users")
    return [float(np.clip(p, 0.0, 1.0).sum()) for p in parts] + [float(users.pop())]


def _means(names: list[str], noisy: list[float]) -> dict[str, dict[str, float]]:
    count = max(noisy[-1], 1.0)
    out: dict[str, dict[str, float]] = {}
    for name, value in zip(names[:-1], noisy[:-1], strict=True):
        model, metric = name.split(" ")
        out.setdefault(model, {})[metric] = min(max(value / count, 0.0), 1.0)
    return out


def release_evaluation(ledger: Any, window: tuple[dt.date, dt.date], training_release: int,
                       sums: list[float], published: str | None, epsilon: float, *, run_id: str, dag_id: str,
                       force: bool, parameters: dict[str, Any]) -> DPEvaluation:
    """Reserve, compute and commit (or reuse) the noisy evaluation of one candidate against
    DP popularity and the ``published`` model version (if any). A committed release is reused
    as it was made: the statistics (and the published version) it holds, whatever was
    published since (``force`` evaluates, and pays, again)."""
    from privrec_pipeline.privacy.accounting import Component
    from privrec_pipeline.privacy.mechanisms import LaplaceNoise

    if not (epsilon > 0 and np.isfinite(epsilon)):
        raise ConfigurationError(f"GateSettings: epsilon must be positive and finite, not {epsilon!r}")
    names = statistics(published is not None)
    if len(sums) != len(names):
        raise ValueError(f"release_evaluation: {len(sums)} sums for the statistics {names}")
    noise = LaplaceNoise(epsilon, float(len(names)))
    reservation = ledger.reserve(
        release_key(training_release), window[0], window[1],
        [Component("laplace", noise_multiplier=1.0 / epsilon, label="evaluation metrics")],
        epsilon=epsilon, delta=0.0, dag_id=dag_id, run_id=run_id, force=force,
        parameters={**parameters, "statistics": names, "published_version": published,
                    "l1_sensitivity": len(names), "epsilon": epsilon})
    release = reservation.release
    if reservation.status == "reuse":
        result = release.result or {}
        names, noisy, published = result.get("statistics") or [], result.get("noisy_sums") or [], \
            result.get("published_version")
        if not names or len(noisy) != len(names):
            raise ConfigurationError(
                f"the committed evaluation release {release.id} holds no usable values: rerun with force_release to "
                "evaluate (and pay for) the candidate again")
    else:
        noisy = [noise.sum(value) for value in sums]
        ledger.commit(release.id, {"statistics": names, "noisy_sums": noisy, "published_version": published},
                      run_id=run_id)
    means = _means(names, noisy)
    return DPEvaluation(means["candidate"], means["dp_popularity"], means.get("published"), published, epsilon,
                        float(len(names)) / epsilon, release.id, reservation.status)
