"""The catalog-wide model: a category component scores items nobody interacted with, survives
write_model/read_model, and serves through the Recommender; the vocabulary's category map
is read from build_partitions' folders (no Spark here)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.training.artifact import model_vocabulary, read_model, write_model
from privrec_pipeline.training.data import Histories, Vocabulary, read_vocabulary
from privrec_pipeline.training.federated import (
    TrainConfig,
    flatten,
    load_flat,
    new_model,
    train_in_process,
)
from privrec_pipeline.training.model import ItemModel, ModelConfig

# 30 items: 0..14 in category "a" (index 0), 15..29 in "b" (index 1). Items 12..14 and 27..29
# never occur in any history.
V, SEEN_A, SEEN_B, UNSEEN_A, UNSEEN_B = 30, range(0, 12), range(15, 27), [12, 13, 14], [27, 28, 29]
ITEM_CATEGORY = np.array([0] * 15 + [1] * 15)
VOCAB = Vocabulary([f"item-{i:02d}" for i in range(V)], ["a", "b"], ITEM_CATEGORY)


def _shards(users: int = 400, seed: int = 0) -> list[Histories]:
    """Users like category a: 5 a-items each, and one b-item for a third of them."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        row = rng.choice(list(SEEN_A), size=5, replace=False).tolist()
        if u % 3 == 0:
            row.append(int(rng.choice(list(SEEN_B))))
        rows.append(row)
    return [Histories.from_lists(rows[0::2]), Histories.from_lists(rows[1::2])]


def test_without_categories_the_model_and_its_parameter_layout_are_unchanged():
    config = TrainConfig(mode="nonprivate", dim=8)
    plain, switched_off = new_model(config, V), new_model(TrainConfig(mode="nonprivate", dim=8,
                                                                         category_features=False), V, ITEM_CATEGORY)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in switched_off.named_parameters()] == [
        "item_in.weight", "pool_logit.weight", "item_out.weight", "item_out.bias"]
    assert plain.config.categories == 0 and plain.item_category is None
    with_categories = new_model(config, V, ITEM_CATEGORY)
    assert with_categories.config.categories == 2
    # the item parameters come first and initialize as without categories; 3 category tensors follow
    names = [n for n, _ in with_categories.named_parameters()]
    assert names == [*[n for n, _ in plain.named_parameters()], "cat_in.weight", "cat_out.weight", "cat_bias.weight"]
    assert np.array_equal(flatten(with_categories)[:flatten(plain).size], flatten(plain))
    assert flatten(with_categories).size == flatten(plain).size + 2 * 8 + 2 * 8 + 2
    assert "item_category" not in with_categories.state_dict()  # the map is not a weight
    with pytest.raises(ConfigurationError, match="does not fit"):  # a vector of the other layout is refused
        load_flat(with_categories, flatten(plain))
    with pytest.raises(ValueError, match="item_category"):
        ItemModel(ModelConfig(vocab_size=V, categories=2), item_category=np.array([0, 5]))


@pytest.mark.parametrize("mode", ["nonprivate", "local"])
def test_an_item_never_interacted_with_is_scored_by_its_category(mode):
    # local DP (Adam): pure-noise coordinates of unseen items walk ~lr per step, hence the smaller lr
    config = TrainConfig(mode=mode, epsilon=50.0, rounds=6, local_steps=10, batch_size=100, dim=8,
                         input_dropout=0.2, local_lr=0.05 if mode == "nonprivate" else 0.01, clip_norm=1.0)
    result = train_in_process(config, _shards(), V, run_id=f"categories-{mode}", item_category=ITEM_CATEGORY)
    model = result.model
    history = torch.tensor([[0, 1, 2, 3]])
    with torch.no_grad():
        scores = model(history, torch.ones_like(history, dtype=torch.bool))[0]
    # every never-seen a-item scores above every never-seen b-item: only the category tells them apart
    # (under DP noise, measured margins 0.44..0.70 over 3 runs at these settings)
    assert float(scores[UNSEEN_A].min()) > float(scores[UNSEEN_B].max())
    # ... and the category's learned part is what carries it: without it, they are not told apart that way
    with torch.no_grad():
        u, _ = model.user_vectors(history, torch.ones_like(history, dtype=torch.bool))
        category_part = (u @ model.cat_out.weight.T + model.cat_bias.weight.T)[0]
    assert float(category_part[0]) > float(category_part[1])


def test_write_and_read_model_keep_the_categories_and_the_scores(tmp_path):
    config = TrainConfig(mode="nonprivate", dim=8, rounds=1, local_steps=3)
    result = train_in_process(config, _shards(60), V, secure=False, item_category=ITEM_CATEGORY)
    folder = write_model(tmp_path / "model", config, V, flatten(result.model), VOCAB, {"plan": {}})
    doc = json.loads((folder / "vocabulary.json").read_text())
    assert doc["items"] == VOCAB.items and doc["categories"] == ["a", "b"] and doc["item_category"] == ITEM_CATEGORY.tolist()
    model, items, report = read_model(folder)
    assert items == VOCAB.items and report["model"]["categories"] == 2
    assert torch.equal(model.item_category, torch.as_tensor(ITEM_CATEGORY))
    history = torch.tensor([[0, 16, 5]])
    mask = torch.ones_like(history, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(model(history, mask), result.model(history, mask))
    again = model_vocabulary(folder)
    assert again.categories == ["a", "b"] and np.array_equal(again.item_category, ITEM_CATEGORY)
    # a model without categories keeps the plain list format (read by older code too)
    plain = write_model(tmp_path / "plain", config, V, flatten(new_model(config, V)), VOCAB.items, {"plan": {}})
    assert json.loads((plain / "vocabulary.json").read_text()) == VOCAB.items
    assert read_model(plain)[0].config.categories == 0


def test_the_recommender_serves_a_model_with_categories(tmp_path):
    from privrec_pipeline.models.recommend import Recommender, recommend_batch

    config = TrainConfig(mode="nonprivate", dim=8, rounds=3, local_steps=10, local_lr=0.05)
    result = train_in_process(config, _shards(), V, secure=False, item_category=ITEM_CATEGORY)
    folder = write_model(tmp_path / "model", config, V, flatten(result.model), VOCAB, {"plan": {}})
    recommender = Recommender.load(folder)
    history = ["item-00", "item-01", "item-02", "not-an-item"]
    recs, ignored = recommender.recommend(history, k=V)
    assert ignored == ["not-an-item"] and len(recs) == V - 3
    assert not {r.item_id for r in recs} & set(history)
    ranked = [r.item_id for r in recs]
    assert max(ranked.index(f"item-{i:02d}") for i in UNSEEN_A) < min(ranked.index(f"item-{i:02d}") for i in UNSEEN_B)
    rows = recommend_batch(recommender, {"u1": history[:2], "u2": ["nothing"]}, k=3)
    assert [(r["key"], r["rank"]) for r in rows] == [("u1", 1), ("u1", 2), ("u1", 3)]


def test_the_vocabulary_folder_carries_the_category_map(tmp_path):
    training = tmp_path / "training" / "dt=2024-01-01"
    (training / "vocabulary").mkdir(parents=True)
    (training / "categories").mkdir()
    pq.write_table(pa.table({"item_id": ["x", "y", "z"], "item_index": [2, 0, 1], "category_index": [1, 0, 0]}),
                   training / "vocabulary" / "part-0.parquet")
    pq.write_table(pa.table({"category_index": [1, 0], "category": ["shoes", ""]}),
                   training / "categories" / "part-0.parquet")
    vocabulary = read_vocabulary(training / "vocabulary", 3)
    assert vocabulary.items == ["y", "z", "x"] and vocabulary.categories == ["", "shoes"]
    assert vocabulary.item_category.tolist() == [0, 0, 1]
    # without category_index (no catalog): items only
    pq.write_table(pa.table({"item_id": ["x", "y"], "item_index": [0, 1]}), tmp_path / "v.parquet")
    (tmp_path / "plain").mkdir()
    (tmp_path / "v.parquet").rename(tmp_path / "plain" / "v.parquet")
    assert read_vocabulary(tmp_path / "plain") == Vocabulary(["x", "y"])
    with pytest.raises(ValueError, match="does not index"):
        read_vocabulary(training / "vocabulary", 4)
