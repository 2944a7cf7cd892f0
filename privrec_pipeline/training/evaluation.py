"""The evaluation protocol of DESIGN.md and the baselines, on in-memory interactions.

Protocol: implicit feedback; dedupe (user, item) keeping the first time; keep users with at
least 5 items; per user, sorted by time, the last 20% (at least 1) are test; score all
items, exclude the user's train items, rank. Recall@20 = hits / min(20, |test|), NDCG@10
(binary relevance), HR@10, averaged over users.

Baselines: popularity, DP popularity (Laplace on per-user-bounded counts, PyDP), EASE
(Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW; closed form) and
ALS (Hu, Koren & Volinsky 2008, the ``implicit`` package).
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
    return {"recall@20": float(np.mean(recall)), "ndcg@10": float(np.mean(ndcg)), "hr@10": float(np.mean(hr))}


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


def dp_popularity_counts(split: Split, epsilon: float, max_items_per_user: int) -> np.ndarray:
    """Popularity with user-level DP: each user counts on at most K items (L1 sensitivity K),
    PyDP Laplace noise of scale K / epsilon on every item's count (the vocabulary is public
    here: the benchmark's items)."""
    from privrec_pipeline.privacy.mechanisms import LaplaceNoise

    noise = LaplaceNoise(epsilon, float(max_items_per_user))
    counts = item_user_counts(split, max_items_per_user)
    return np.array([noise.sum(c) for c in counts])


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
