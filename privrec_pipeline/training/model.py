"""The recommender: item-side parameters only (privacy contract point 5).

A user is represented by nothing but their own history: the user vector is an attention-
weighted mean of input item embeddings, with one learned weight (logit) per item,

    alpha_j = softmax_{j in H}(a_j),   u = sum_{j in H} alpha_j * E_in[j],

and items are scored by ``s = E_out u + b``. Every trainable parameter belongs to an item
(``E_in``, ``a``, ``E_out``, ``b``), so publishing the model publishes no user vector; a
user's vector is computed at serving time from that user's history.

With a public item -> category map c (the catalog's categories, ``ModelConfig.categories``
K > 0), each item's representation also has a category component shared by the items of its
category, so an item nobody interacted with is still scored by its category (and rare items
share signal under DP noise):

    e_j = E_in[j] + C_in[c(j)],   s_i = (E_out[i] + C_out[c(i)]) . u + b_i + cb[c(i)]

``C_in``, ``C_out`` [K, d] and ``cb`` [K, 1] are category-side parameters (public structure,
nothing per user); the map itself is a non-trainable buffer. K = 0 is the model without them
(the same parameters, in the same order).

Training loss per user (multinomial likelihood of the history, as Mult-DAE: Liang et al.
2018, "Variational Autoencoders for Collaborative Filtering", WWW): with input dropout on
the history, ``L_u = -(1 / |H|) sum_{i in H} w_i log softmax(s)_i`` over the full vocabulary,
where ``w_i`` are the event-type weights normalized to mean 1 over the history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int = 64
    input_dropout: float = 0.5
    init_scale: float = 0.05
    categories: int = 0
    """K: number of item categories (0: no category component)."""


class ItemModel(nn.Module):
    """Item embeddings in and out, item biases, item pooling logits (nn.Embedding / nn.Linear,
    so Opacus can wrap the same model for the benchmark); with ``config.categories`` K > 0,
    category embeddings in and out and category biases, and ``item_category`` (int [V], values
    in 0..K-1) maps each item to its category. ``item_init`` ([V, d], optional): public initial
    values of both item tables (``E_in`` and ``E_out``) instead of the random draw; it only sets
    starting values (no parameter is added or frozen), so the DP norms and noise are unchanged."""

    def __init__(self, config: ModelConfig, seed: int = 0, item_category=None,
                 item_init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        self.item_in = nn.Embedding(config.vocab_size, config.dim)
        self.pool_logit = nn.Embedding(config.vocab_size, 1)
        self.item_out = nn.Linear(config.dim, config.vocab_size)
        with torch.no_grad():
            for weight in (self.item_in.weight, self.item_out.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * config.init_scale)
            self.pool_logit.weight.zero_()
            self.item_out.bias.zero_()
            if item_init is not None:
                # Public initial item vectors (e.g. ``content_prior``: the catalog's text): both
                # tables start from them instead of the random draw (drawn anyway, so the
                # category parameters below get the same values as without an init).
                init = torch.as_tensor(item_init, dtype=torch.float32)
                if tuple(init.shape) != (config.vocab_size, config.dim) or not bool(torch.isfinite(init).all()):
                    raise ValueError(f"ItemModel: item_init must be a finite [{config.vocab_size}, {config.dim}] "
                                     f"matrix, not {tuple(init.shape)}")
                self.item_in.weight.copy_(init)
                self.item_out.weight.copy_(init)
        if config.categories:
            if item_category is None:
                raise ValueError(f"ItemModel: {config.categories} categories need an item_category map")
            category = torch.as_tensor(item_category, dtype=torch.long).reshape(-1)
            if len(category) != config.vocab_size or (len(category) and (
                    int(category.min()) < 0 or int(category.max()) >= config.categories)):
                raise ValueError(f"ItemModel: item_category must map {config.vocab_size} items to "
                                 f"0..{config.categories - 1}")
            # Registered after the item parameters: parameters() lists the item ones first, as without categories.
            self.cat_in = nn.Embedding(config.categories, config.dim)
            self.cat_out = nn.Embedding(config.categories, config.dim)
            self.cat_bias = nn.Embedding(config.categories, 1)
            with torch.no_grad():
                self.cat_in.weight.zero_()  # items start as their own embedding alone
                self.cat_out.weight.copy_(torch.randn(self.cat_out.weight.shape, generator=generator)
                                          * config.init_scale)
                self.cat_bias.weight.zero_()
            self.register_buffer("item_category", category.clone(), persistent=False)
        elif item_category is not None:
            raise ValueError("ItemModel: an item_category map needs config.categories > 0")
        else:
            self.item_category = None

    def input_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """e_j for item indices ``items`` (any shape) -> [..., d]."""
        e = self.item_in(items)
        if self.item_category is not None:
            e = e + self.cat_in(self.item_category[items])
        return e

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective output weights [V, d] and biases [V]: E_out[i] + C_out[c(i)], b_i + cb[c(i)]."""
        if self.item_category is None:
            return self.item_out.weight, self.item_out.bias
        return (self.item_out.weight + self.cat_out.weight[self.item_category],
                self.item_out.bias + self.cat_bias.weight[self.item_category, 0])

    def scores(self, u: torch.Tensor) -> torch.Tensor:
        """Scores [B, V] of every item for user vectors u [B, d]."""
        if self.item_category is None:
            return self.item_out(u)
        # Gathering [V, d] rows is cheaper than gathering [B, V] per-category scores (B > d).
        weight, bias = self.output_layer()
        return nn.functional.linear(u, weight, bias)

    def user_vectors(self, items: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [B, d] and the pooling weights alpha [B, L] for padded histories ``items`` [B, L]
        whose valid positions are ``mask`` (a row with no valid position gets u = 0)."""
        logits = self.pool_logit(items).squeeze(-1).masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(logits, dim=-1)
        alpha = torch.nan_to_num(alpha, nan=0.0)  # empty rows: all -inf
        u = torch.einsum("bl,bld->bd", alpha, self.input_embeddings(items))
        return u, alpha

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores [B, V] of every item for each padded history."""
        u, _ = self.user_vectors(items, mask)
        return self.scores(u)


def dropout_mask(mask: torch.Tensor, keep: float, generator: torch.Generator | None) -> torch.Tensor:
    """Input dropout on histories, keeping at least one item per non-empty row."""
    if keep >= 1.0:
        return mask
    kept = mask & (torch.rand(mask.shape, generator=generator) < keep)
    empty = ~kept.any(dim=1) & mask.any(dim=1)
    return torch.where(empty.unsqueeze(1), mask, kept)


def target_matrix(items: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """y [B, V]: each history item's weight, normalized so a row sums to 1 (0 for empty rows)."""
    w = weights * mask
    total = w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    y = torch.zeros(items.shape[0], vocab, dtype=torch.float32)
    y.scatter_add_(1, items, (w / total).float())
    return y
