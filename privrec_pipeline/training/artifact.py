"""The trained model on disk: item-side weights as safetensors, the vocabulary, a report.

    <folder>/model.safetensors   item_in, pool_logit, item_out.weight, item_out.bias (float32)
    <folder>/vocabulary.json     item ids in index order (the DP item vocabulary)
    <folder>/training.json       the run's privacy plan, settings, window and release id

Only item-side parameters exist in the model, so nothing in the folder belongs to a user.
The folder is written next to the target and renamed into place: it is complete or absent.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from privrec_pipeline.errors import PrivrecError
from privrec_pipeline.training.federated import TrainConfig, load_flat, new_model
from privrec_pipeline.training.model import ItemModel, ModelConfig

WEIGHTS, VOCABULARY, REPORT = "model.safetensors", "vocabulary.json", "training.json"


def _vocabulary(folder: Path, size: int) -> list[str]:
    import pyarrow.dataset as ds

    table = ds.dataset(str(folder), format="parquet").to_table().to_pandas().sort_values("item_index")
    items = table["item_id"].tolist()
    if table["item_index"].tolist() != list(range(size)):
        raise PrivrecError(f"vocabulary at {folder} does not index 0..{size - 1}")
    return items


def write_model(target: Path, config: TrainConfig, vocab_size: int, params: np.ndarray, vocabulary: Path | list[str],
                report: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    model = new_model(config, vocab_size)
    load_flat(model, params)
    items = vocabulary if isinstance(vocabulary, list) else _vocabulary(vocabulary, vocab_size)
    tmp = target.parent / f".{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file({name: p.detach().float().contiguous() for name, p in model.named_parameters()}, str(tmp / WEIGHTS),
                  metadata={"format": "privrec-item-model", "dim": str(config.dim), "vocab_size": str(vocab_size)})
        (tmp / VOCABULARY).write_text(json.dumps(items), encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps({**report, "model": asdict(model.config)}, indent=2, sort_keys=True),
                                  encoding="utf-8")
        if target.exists():
            old = target.parent / f".{target.name}-old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_model(folder: Path) -> tuple[ItemModel, list[str], dict[str, Any]]:
    from safetensors.torch import load_file

    if not (folder / WEIGHTS).exists():
        raise PrivrecError(f"no model at {folder} ({WEIGHTS} missing)")
    report = json.loads((folder / REPORT).read_text(encoding="utf-8"))
    items = json.loads((folder / VOCABULARY).read_text(encoding="utf-8"))
    model = ItemModel(ModelConfig(**report["model"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model, items, report
