"""Evaluate a candidate model before publishing: metrics, the quality gate, a membership audit.

- Metrics under the DESIGN.md protocol on the run's hold-out (every user with >= 5 items:
  history -> test items): the candidate, the DP popularity baseline (the noisy user counts
  of the window's DP releases: post-processing, no extra budget) and the published model.
- Gate: publish only if the candidate's Recall@20 beats DP popularity and is not worse than
  the published model's by more than ``tolerance`` (relative).
- Membership-inference audit (loss threshold; Yeom et al. 2018, "Privacy Risk in Machine
  Learning", CSF): the attacker scores each user by the model's loss on the user's history;
  the AUC of telling training users from held-out users by that score. 0.5 = no signal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privrec_pipeline.training.evaluation import Split, metrics, popularity_scores
from privrec_pipeline.training.model import ItemModel, target_matrix


@dataclass(frozen=True)
class GateSettings:
    tolerance: float = 0.05
    """Largest relative drop of Recall@20 against the published model that still publishes."""
    min_gain_over_dp_popularity: float = 0.0
    """The candidate's Recall@20 must exceed DP popularity's x (1 + this); -1 disables the check."""
    mia_auc_warning: float = 0.6
    """Warn in the model card when the membership audit's AUC exceeds this."""


def gate_settings(tolerance: float, settings: dict[str, Any]) -> GateSettings:
    """The gate of a DAG run: ``publish_tolerance`` and the other ``publish_settings``."""
    from privrec_pipeline.errors import ConfigurationError
    from privrec_pipeline.settings import from_settings

    if "tolerance" in settings:
        raise ConfigurationError("the publish tolerance is the publish_tolerance Param, not a publish setting")
    return from_settings(GateSettings, {**settings, "tolerance": tolerance}, "publish setting")


@dataclass
class Evaluation:
    candidate: dict[str, float]
    dp_popularity: dict[str, float]
    published: dict[str, float] | None
    published_version: str | None
    mia_auc: float | None
    mia_users: dict[str, int]
    publish: bool
    reason: str
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_metrics(model: ItemModel, split: Split) -> dict[str, float]:
    def scores(users: np.ndarray) -> torch.Tensor:
        items, mask, _ = split.train.batch(users)
        with torch.no_grad():
            return model(items, mask)

    return metrics(scores, split)


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
             published: tuple[ItemModel, str] | None, gate: GateSettings,
             published_split: Split | None = None) -> Evaluation:
    """``published_split``: the same users in the published model's vocabulary (if it differs)."""
    cand = model_metrics(candidate, all_users)
    pop = metrics(popularity_scores(dp_counts), all_users)
    pub = model_metrics(published[0], published_split or all_users) if published else None
    # Lower loss on members than on non-members: the attacker's score is the negative loss.
    mia = auc(-user_losses(candidate, trained), -user_losses(candidate, held_out))
    warnings = []
    if mia is not None and mia > gate.mia_auc_warning:
        warnings.append(f"membership-inference AUC {mia:.3f} exceeds {gate.mia_auc_warning}")
    if cand["recall@20"] <= pop["recall@20"] * (1 + gate.min_gain_over_dp_popularity):
        publish, reason = False, (f"Recall@20 {cand['recall@20']:.4f} does not beat DP popularity "
                                  f"({pop['recall@20']:.4f})")
    elif pub is not None and cand["recall@20"] < (1 - gate.tolerance) * pub["recall@20"]:
        publish, reason = False, (f"Recall@20 {cand['recall@20']:.4f} is more than {gate.tolerance:.0%} below the "
                                  f"published model {published[1]} ({pub['recall@20']:.4f})")
    else:
        publish, reason = True, ("beats DP popularity" + (f" and is within {gate.tolerance:.0%} of the published model"
                                                          if pub is not None else "; no model published yet"))
    return Evaluation(cand, pop, pub, published[1] if published else None, mia,
                      {"trained": trained.train.users, "held_out": held_out.train.users}, publish, reason, warnings)


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
