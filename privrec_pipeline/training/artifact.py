"""The trained model on disk: item-side weights as safetensors, the vocabulary, a report.

    <folder>/model.safetensors   item_in, pool_logit, item_out.weight, item_out.bias (float32), with
                                 categories also cat_in, cat_out, cat_bias
    <folder>/vocabulary.json     item ids in index order (the DP item vocabulary); with categories
                                 {"items": [...], "categories": [...], "item_category": [...]}
    <folder>/training.json       the run's privacy plan, settings, window and release id

Only item-side parameters exist in the model, so nothing in the folder belongs to a user.
The folder replaces the target in one swap on a local lake (``lake.replacing``); on an object
store ``training.json`` is written last and readers (``tasks.finished``) decide on it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from privrec_pipeline import lake as lk
from privrec_pipeline.errors import PrivrecError
from privrec_pipeline.training.data import Vocabulary, read_vocabulary
from privrec_pipeline.training.federated import TrainConfig, load_flat, new_model
from privrec_pipeline.training.model import ItemModel, ModelConfig

WEIGHTS, VOCABULARY, REPORT = "model.safetensors", "vocabulary.json", "training.json"


def write_model(target: "Path | lk.UPath", config: TrainConfig, vocab_size: int, params: np.ndarray,
                vocabulary: Path | list[str] | Vocabulary, report: dict[str, Any]) -> Path:
    """``vocabulary``: build_partitions' vocabulary folder, the item ids, or a ``Vocabulary``
    (its item -> category map builds the model with categories, as ``new_model`` did in training)."""
    from safetensors.torch import save_file

    if isinstance(vocabulary, list):
        vocabulary = Vocabulary(vocabulary)
    elif not isinstance(vocabulary, Vocabulary):
        try:
            vocabulary = read_vocabulary(vocabulary, vocab_size)
        except ValueError as error:
            raise PrivrecError(str(error)) from None
    model = new_model(config, vocab_size, vocabulary.item_category)
    load_flat(model, params)
    items: Any = vocabulary.items
    if model.item_category is not None:
        items = {"items": vocabulary.items, "categories": vocabulary.categories,
                 "item_category": [int(c) for c in vocabulary.item_category]}
    target = lk.path(target)
    with lk.replacing(target, last=REPORT) as tmp:
        save_file({name: p.detach().float().contiguous() for name, p in model.named_parameters()}, str(tmp / WEIGHTS),
                  metadata={"format": "privrec-item-model", "dim": str(config.dim), "vocab_size": str(vocab_size),
                            "categories": str(model.config.categories)})
        (tmp / VOCABULARY).write_text(json.dumps(items), encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps({**report, "model": asdict(model.config)}, indent=2, sort_keys=True),
                                  encoding="utf-8")
    return target


def read_model(folder: "Path | lk.UPath") -> tuple[ItemModel, list[str], dict[str, Any]]:
    from safetensors.torch import load

    folder = lk.path(folder)
    if not (folder / WEIGHTS).exists():
        raise PrivrecError(f"no model at {folder} ({WEIGHTS} missing)")
    report = json.loads((folder / REPORT).read_text(encoding="utf-8"))
    vocabulary = model_vocabulary(folder)  # with categories or (the item-only format) without
    config = ModelConfig(**report["model"])
    model = ItemModel(config, item_category=vocabulary.item_category if config.categories else None)
    model.load_state_dict(load((folder / WEIGHTS).read_bytes()))
    return model, vocabulary.items, report


def model_vocabulary(folder: "Path | lk.UPath") -> Vocabulary:
    """A saved model's vocabulary: item ids and, with categories, the category names and the
    item -> category map (what ``write_model`` needs to write the same model again)."""
    vocabulary = json.loads((lk.path(folder) / VOCABULARY).read_text(encoding="utf-8"))
    if isinstance(vocabulary, dict):
        return Vocabulary(vocabulary["items"], vocabulary["categories"],
                          np.asarray(vocabulary["item_category"], dtype=np.int64))
    return Vocabulary(vocabulary)
