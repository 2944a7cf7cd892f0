"""Evaluate a candidate model before publishing: metrics, the quality gate, a membership audit.

- Metrics under the DESIGN.md protocol on the run's hold-out (every user with >= 5 items:
  history -> test items): the candidate, the DP popularity baseline (the noisy user counts
  of the window's DP releases: post-processing, no extra budget) and the published model.
  Computed exactly for the operator's record, and released with DP
  (``models.dp_evaluation``) for the gate and the model card.
- Gate (``decide``): publish only if the candidate's DP Recall@20 beats DP popularity's and
  is not worse than the published model's by more than ``tolerance`` (relative): a function
  of the DP release only.
- Membership-inference audit (loss threshold; Yeom et al. 2018, "Privacy Risk in Machine
  Learning", CSF): the attacker scores each user by the model's loss on the user's history;
  the AUC of telling training users from held-out users by that score. 0.5 = no signal.
  Exact, so it stays in the operator's record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privrec_pipeline.training.evaluation import Split, per_user_metrics, popularity_scores
from privrec_pipeline.training.model import ItemModel, target_matrix


@dataclass(frozen=True)
class GateSettings:
    tolerance: float = 0.05
    """Largest relative drop of Recall@20 against the published model that still publishes."""
    min_gain_over_dp_popularity: float = 0.0
    """The candidate's Recall@20 must exceed DP popularity's x (1 + this); -1 disables the check."""
    mia_auc_warning: float = 0.6
    """Warn in the operator's record when the membership audit's AUC exceeds this."""
    epsilon: float = 0.2
    """Epsilon of the DP evaluation release (``models.dp_evaluation``) the gate and the card use."""


def gate_settings(tolerance: float, settings: dict[str, Any]) -> GateSettings:
    """The gate of a DAG run: ``publish_tolerance`` and the other ``publish_settings``."""
    from privrec_pipeline.errors import ConfigurationError
    from privrec_pipeline.settings import from_settings

    if "tolerance" in settings:
        raise ConfigurationError("the publish tolerance is the publish_tolerance Param, not a publish setting")
    return from_settings(GateSettings, {**settings, "tolerance": tolerance}, "publish setting")


@dataclass
class Evaluation:
    dp: dict[str, Any]  # the DP evaluation release (``DPEvaluation.to_dict``): what the gate and the card use
    exact: dict[str, Any]  # exact metrics, membership AUC and user counts: the operator's record only
    publish: bool
    reason: str
    warnings: list[str]  # about exact numbers: the operator's record only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExactEvaluation:
    """Exact hold-out metrics (means and per user) and the membership audit: never published."""

    candidate: dict[str, np.ndarray]
    dp_popularity: dict[str, np.ndarray]
    published: dict[str, np.ndarray] | None
    mia_auc: float | None
    mia_users: dict[str, int]

    def means(self) -> dict[str, Any]:
        def mean(values: dict[str, np.ndarray] | None) -> dict[str, float] | None:
            return None if values is None else {k: float(np.mean(v)) if len(v) else 0.0 for k, v in values.items()}

        return {"candidate": mean(self.candidate), "dp_popularity": mean(self.dp_popularity),
                "published": mean(self.published), "mia_auc": self.mia_auc, "mia_users": self.mia_users}


def model_metrics(model: ItemModel, split: Split) -> dict[str, np.ndarray]:
    """Each user's metrics (``training.evaluation.per_user_metrics``)."""
    def scores(users: np.ndarray) -> torch.Tensor:
        items, mask, _ = split.train.batch(users)
        with torch.no_grad():
            return model(items, mask)

    return per_user_metrics(scores, split)


def user_losses(model: ItemModel, split: Split) -> np.ndarray:
    """The model's loss on each user's whole history (what a loss-threshold attacker computes)."""
    out = []
    for start in range(0, split.train.users, 512):
        users = np.arange(start, min(start + 512, split.train.users))
        items, mask, weights = split.train.batch(users)
        with torch.no_grad():
            log_p = torch.log_softmax(model(items, mask), dim=-1)
        out.append(-(target_matrix(items, mask, weights, model.config.vocab_size) * log_p).sum(1).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def auc(members: np.ndarray, non_members: np.ndarray) -> float | None:
    """P(score(member) > score(non-member)) with ties counted half (Mann-Whitney U / n1 n2)."""
    if len(members) == 0 or len(non_members) == 0:
        return None
    scores = np.concatenate([members, non_members])
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="mergesort")
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[: len(members)].sum() - len(members) * (len(members) + 1) / 2
    return float(u / (len(members) * len(non_members)))


def evaluate(candidate: ItemModel, all_users: Split, trained: Split, held_out: Split, dp_counts: np.ndarray,
             published: ItemModel | None, published_split: Split | None = None) -> ExactEvaluation:
    """The exact evaluation; ``published_split``: the same users in the published model's
    vocabulary (if it differs)."""
    cand = model_metrics(candidate, all_users)
    pop = per_user_metrics(popularity_scores(dp_counts), all_users)
    pub = model_metrics(published, published_split or all_users) if published is not None else None
    # Lower loss on members than on non-members: the attacker's score is the negative loss.
    mia = auc(-user_losses(candidate, trained), -user_losses(candidate, held_out))
    return ExactEvaluation(cand, pop, pub, mia, {"trained": trained.train.users, "held_out": held_out.train.users})


def decide(dp: Any, gate: GateSettings) -> tuple[bool, str]:
    """The publish decision from the DP evaluation (``DPEvaluation``) only."""
    cand, pop, pub, published_version = (dp.candidate["recall@20"], dp.dp_popularity["recall@20"], dp.published,
                                         dp.published_version)
    if cand <= pop * (1 + gate.min_gain_over_dp_popularity):
        return False, f"DP Recall@20 {cand:.4f} does not beat DP popularity ({pop:.4f})"
    if pub is not None and cand < (1 - gate.tolerance) * pub["recall@20"]:
        return False, (f"DP Recall@20 {cand:.4f} is more than {gate.tolerance:.0%} below the published model "
                       f"{published_version} ({pub['recall@20']:.4f})")
    return True, ("beats DP popularity" + (f" and is within {gate.tolerance:.0%} of the published model"
                                           if pub is not None else "; no model published yet"))


def operator_warnings(exact: ExactEvaluation, gate: GateSettings) -> list[str]:
    if exact.mia_auc is not None and exact.mia_auc > gate.mia_auc_warning:
        return [f"membership-inference AUC {exact.mia_auc:.3f} exceeds {gate.mia_auc_warning}"]
    return []


def dp_popularity_counts(release_items: list[Path], vocabulary: list[str]) -> np.ndarray:
    """Summed noisy user counts of the window's DP releases, per vocabulary item."""
    import pyarrow.parquet as pq

    index = {item: i for i, item in enumerate(vocabulary)}
    counts = np.zeros(len(vocabulary))
    for path in release_items:
        table = pq.read_table(path, columns=["item_id", "users"])
        for item, users in zip(table.column("item_id").to_pylist(), table.column("users").to_pylist(), strict=True):
            if item in index and users is not None:
                counts[index[item]] += users
    return counts
