"""The evaluation protocol of DESIGN.md and the baselines, on in-memory interactions.

Protocol: implicit feedback; dedupe (user, item) keeping the first time; keep users with at
least 5 items; per user, sorted by time, the last 20% (at least 1) are test; score all
items, exclude the user's train items, rank. Recall@20 = hits / min(20, |test|), NDCG@10
(binary relevance), HR@10, averaged over users.

Baselines: popularity, DP popularity (``dp_popularity_counts``: Gaussian on per-user
L2-normalized counts, or Laplace on counts bounded to K items per user with K chosen privately;
PyDP and PipelineDP), EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data",
WWW; closed form) and ALS (Hu, Koren & Volinsky 2008, the ``implicit`` package).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from privrec_pipeline.training.data import Histories

MIN_ITEMS = 5
TEST_SHARE = 0.2


@dataclass(frozen=True)
class Split:
    """Train histories (all users, vocabulary indices, time order) and test items of the same users."""

    train: Histories
    test: list[np.ndarray]
    vocab_size: int


def temporal_split(users: np.ndarray, items: np.ndarray, times: np.ndarray, vocab_size: int,
                   weights: np.ndarray | None = None) -> Split:
    """The protocol's split; ``items`` are vocabulary indices, ``times`` sortable."""
    w = np.ones(len(items), dtype=np.float32) if weights is None else weights.astype(np.float32)
    order = np.lexsort((times, users))
    users, items, times, w = users[order], items[order], times[order], w[order]
    # Dedupe (user, item): the first occurrence in time order.
    key = users.astype(np.int64) * (vocab_size + 1) + items
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)
    users, items, w = users[keep], items[keep], w[keep]
    train_rows, train_w, test_rows = [], [], []
    bounds = np.flatnonzero(np.diff(users)) + 1
    for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(users)], strict=True):
        n = end - start
        if n < MIN_ITEMS:
            continue
        n_test = max(1, int(TEST_SHARE * n))
        train_rows.append(items[start:end - n_test].tolist())
        train_w.append(w[start:end - n_test].tolist())
        test_rows.append(items[end - n_test:end])
    return Split(Histories.from_lists(train_rows, train_w), test_rows, vocab_size)


def _train_matrix(split: Split):
    from scipy.sparse import csr_matrix

    h = split.train
    return csr_matrix((np.ones(len(h.items), dtype=np.float32), h.items, h.indptr),
                      shape=(h.users, split.vocab_size))


def metrics(scores_for: "callable", split: Split, batch: int = 1024) -> dict[str, float]:
    """Recall@20, NDCG@10, HR@10 of ``scores_for(user_indices) -> [B, V] tensor`` over all users."""
    return {name: float(np.mean(values)) for name, values in per_user_metrics(scores_for, split, batch).items()}


def per_user_metrics(scores_for: "callable", split: Split, batch: int = 1024) -> dict[str, np.ndarray]:
    """Each user's Recall@20, NDCG@10 and HR@10 (each in [0, 1]), in the split's user order."""
    recall, ndcg, hr = [], [], []
    discounts = 1.0 / np.log2(np.arange(2, 12))
    for start in range(0, split.train.users, batch):
        users = np.arange(start, min(start + batch, split.train.users))
        scores = torch.as_tensor(scores_for(users), dtype=torch.float32).clone()
        for row, u in enumerate(users):
            scores[row, torch.from_numpy(split.train.row(int(u)))] = -math.inf  # exclude train items
        # A vocabulary smaller than 20 (a small DP release) ranks all of it.
        top = torch.topk(scores, min(20, scores.shape[1]), dim=1).indices.numpy()
        for row, u in enumerate(users):
            test = set(split.test[u].tolist())
            hits = np.array([i in test for i in top[row]])
            recall.append(hits.sum() / min(20, len(test)))
            dcg = float((hits[:10] * discounts[:len(hits[:10])]).sum())
            ndcg.append(dcg / float(discounts[:min(10, len(test))].sum()))
            hr.append(float(hits[:10].any()))
    return {"recall@20": np.asarray(recall, dtype=float), "ndcg@10": np.asarray(ndcg, dtype=float),
            "hr@10": np.asarray(hr, dtype=float)}


def item_user_counts(split: Split, max_items_per_user: int | None = None, seed: int = 0) -> np.ndarray:
    """Distinct users per item over the train histories, each user counted on at most
    ``max_items_per_user`` of their items (a random subset, chosen from the user's data only)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(split.vocab_size, dtype=np.float64)
    h = split.train
    for u in range(h.users):
        row = h.row(u)
        if max_items_per_user is not None and len(row) > max_items_per_user:
            row = rng.choice(row, max_items_per_user, replace=False)
        counts[row] += 1
    return counts


def popularity_scores(counts: np.ndarray) -> "callable":
    row = torch.as_tensor(counts, dtype=torch.float32)
    return lambda users: row.expand(len(users), -1)


@dataclass(frozen=True)
class DpPopularity:
    """DP item scores for the popularity baseline and how they were released."""

    counts: np.ndarray  # [V] noisy scores (only their order matters for ranking)
    mechanism: str  # "gaussian" or "laplace"
    epsilon: float  # the whole release's, bound selection included
    delta: float
    noise_std: float  # per item
    max_items_per_user: int | None  # K (laplace); None: every item, L2-normalized (gaussian)
    description: dict


DP_POPULARITY_MECHANISMS = ("gaussian", "laplace")


def dp_popularity_counts(split: Split, epsilon: float, delta: float = 1e-6, *, mechanism: str = "gaussian",
                         max_items_per_user: int | None = None, selection_share: float = 0.1,
                         max_items_upper: int = 200) -> DpPopularity:
    """Popularity with user-level DP over the public vocabulary (the benchmark's items).

    ``gaussian`` ((epsilon, delta)-DP): each user's vector of distinct train items is scaled to
    L2 norm 1 (weight 1 / sqrt(n_u) on each of the user's n_u items), so adding or removing a
    user moves the vector of item sums by at most 1 in L2 and no user's items are dropped;
    Gaussian noise with the analytic calibration of Balle & Wang 2018 ("Improving the Gaussian
    Mechanism for Differential Privacy: Analytical Calibration and Optimal Denoising", ICML; the
    smallest std whose privacy profile meets (epsilon, delta)), PyDP's ``GaussianMechanism``
    (Google's differential-privacy library computes that std and samples securely).

    ``laplace`` (pure epsilon-DP): each user counts on at most K items (a random subset; L1
    sensitivity K), PyDP Laplace noise of scale K / epsilon_counts. K = ``max_items_per_user``,
    or if None chosen privately from the data: PipelineDP's exponential mechanism with its L0
    scoring (``dp_stats.bounds.choose_max_items``, candidates 1..``max_items_upper``) spending
    ``selection_share`` of epsilon, the counts the rest (basic composition)."""
    from privrec_pipeline.privacy.mechanisms import LaplaceNoise

    if mechanism not in DP_POPULARITY_MECHANISMS:
        raise ValueError(f"dp_popularity_counts: mechanism must be one of {DP_POPULARITY_MECHANISMS}, not {mechanism!r}")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"dp_popularity_counts: epsilon must be positive and finite, not {epsilon}")
    h = split.train
    lengths = np.diff(h.indptr)
    if mechanism == "gaussian":
        from pydp.algorithms.numerical_mechanisms import GaussianMechanism

        if not 0 < delta < 1:
            raise ValueError(f"dp_popularity_counts: the Gaussian mechanism needs delta in (0, 1), not {delta}")
        user_weight = 1.0 / np.sqrt(np.maximum(lengths, 1))  # ||user's vector||_2 = 1
        sums = np.bincount(h.items, weights=np.repeat(user_weight, lengths), minlength=split.vocab_size)
        gaussian = GaussianMechanism(epsilon, delta, 1.0)  # L2 sensitivity 1
        counts = np.array([gaussian.add_noise(float(c)) for c in sums])
        return DpPopularity(counts, "gaussian", epsilon, delta, float(gaussian.std), None, {
            "mechanism": "gaussian", "epsilon": epsilon, "delta": delta, "l2_sensitivity": 1.0,
            "noise_stddev": float(gaussian.std), "contribution": "each user's items scaled to L2 norm 1",
            "library": "PyDP GaussianMechanism (analytic calibration, Balle & Wang 2018)"})
    chosen = None
    epsilon_counts = epsilon
    if max_items_per_user is None:
        from collections import Counter

        from privrec_pipeline.dp_stats.bounds import choose_max_items

        if not 0 < selection_share < 1:
            raise ValueError(f"dp_popularity_counts: selection_share must be in (0, 1), not {selection_share}")
        epsilon_counts = epsilon * (1 - selection_share)
        histogram = Counter(np.minimum(lengths, max_items_upper).tolist())
        chosen = choose_max_items(histogram, split.vocab_size, epsilon * selection_share, epsilon_counts,
                                  max_items_upper)
        max_items_per_user = chosen.k
    noise = LaplaceNoise(epsilon_counts, float(max_items_per_user))
    counts = item_user_counts(split, max_items_per_user)
    return DpPopularity(np.array([noise.sum(c) for c in counts]), "laplace", epsilon, 0.0,
                        math.sqrt(noise.variance), max_items_per_user,
                        {**noise.describe(), "bound_selection": chosen.description if chosen else None})


def ease_scores(split: Split, l2: float = 500.0) -> "callable":
    """EASE: B = -P / diag(P) with zero diagonal, P = (X^T X + l2 I)^-1 (Steck 2019)."""
    x = _train_matrix(split)
    gram = torch.from_numpy((x.T @ x).toarray().astype(np.float32))
    gram += l2 * torch.eye(gram.shape[0])
    p = torch.linalg.inv(gram)
    b = -p / torch.diag(p)
    b.fill_diagonal_(0.0)
    x_dense_rows = x

    def scores(users: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(x_dense_rows[users].toarray())
        return rows @ b

    return scores


def als_scores(split: Split, factors: int = 64, regularization: float = 0.05, iterations: int = 15,
               alpha: float = 2.0, seed: int = 0) -> "callable":
    import threadpoolctl
    from implicit.cpu.als import AlternatingLeastSquares

    x = _train_matrix(split)
    with threadpoolctl.threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-threaded BLAS
        model = AlternatingLeastSquares(factors=factors, regularization=regularization, iterations=iterations,
                                        alpha=alpha, random_state=seed)
        model.fit(x, show_progress=False)
    users_f = torch.from_numpy(np.asarray(model.user_factors))
    items_f = torch.from_numpy(np.asarray(model.item_factors))
    return lambda users: users_f[torch.from_numpy(users)] @ items_f.T


def model_scores(model) -> "callable":
    """The item model's scores from each user's train history (no dropout)."""

    def scores(users: np.ndarray, split_train: Histories) -> torch.Tensor:
        items, mask, _ = split_train.batch(users)
        with torch.no_grad():
            return model(items, mask)

    return scores
