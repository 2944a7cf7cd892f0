"""Real data through the whole pipeline: ml-latest-small imported with its catalog, replayed onto a
window of consecutive days, run day by day through the nightly DAG (``privrec backfill``) on the
embedded default, and trained on the window.

The steps are the user's own commands, in a fresh ``PRIVREC_HOME``, lake and key file under
``--out`` (SQLite ledger and Airflow metadata, local Spark): ``privrec keys init``,
``privrec import movielens --replay-days N --replay-end D`` (D is the first day from
2026-02-01 on that closes a training window of N days, so the last run trains), and
``privrec backfill`` with ``train_window_days=N``. Read afterwards from the lake: each day's DP
statistics release (K, bias), the training release, and the operator's evaluation record of the
window's candidate (Recall@20 of the model and of DP popularity on the held-out users, whether it
was published and why).

Target (issue 15): the published model covers the catalog and is never worse than DP popularity.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.ingest import machine, shown_path, write_result

if TYPE_CHECKING:
    from rich.console import Console

NAME = "movielens_pipeline"
SECTION = ("<!-- bench:movielens_pipeline:start -->", "<!-- bench:movielens_pipeline:end -->")
FIRST_DAY = dt.date(2026, 2, 1)
TRAIN_SETTINGS = {"local_steps": 10, "batch_size": 64, "dim": 128, "input_dropout": 0.7, "local_lr": 0.005,
                  "clip_norm": 0.1}
"""The training benchmark's local-mode settings for ml-latest-small (610 users)."""
ROUNDS = 10


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--ml-replay-days", type=int, default=7,
                       help="days the MovieLens ratings are replayed onto, = the training window (default: 7)")
    group.add_argument("--ml-train-epsilon", type=float, default=4.0,
                       help="epsilon of the MovieLens model (default: 4)")


def window_end(days: int, start: dt.date = FIRST_DAY) -> dt.date:
    """The first day on or after ``start`` + days - 1 that closes a tumbling window of ``days``."""
    from privrec_pipeline.training.tasks import closes_training_window

    end = start + dt.timedelta(days=days - 1)
    while not closes_training_window(end, days):
        end += dt.timedelta(days=1)
    return end


def _privrec(args: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ privrec {' '.join(args)}\n")
        fh.flush()
        code = subprocess.run([str(Path(sys.executable).with_name("privrec")), *args], env=env, stdout=fh,
                              stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise RuntimeError(f"privrec {args[0]} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def run(args: argparse.Namespace, console: "Console", command: str) -> int:
    if not (args.movielens / "ratings.csv").exists():
        console.print(f"{args.movielens}/ratings.csv not found: this benchmark needs ml-latest-small",
                      markup=False)
        return 1
    days = args.ml_replay_days
    end = window_end(days)
    start = end - dt.timedelta(days=days - 1)
    work = args.out / "movielens-pipeline"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    lake = work / "lake"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVREC_")}  # the embedded default
    env.update({"PRIVREC_HOME": str(work / "home"), "PRIVREC_LAKE": str(lake),
                "PRIVREC_KEY_FILE": str(work / "keys.json"), "PRIVREC_TRAIN_ROUNDS": str(ROUNDS),
                "PRIVREC_TRAIN_PARTITIONS": "2"})
    log = work / "commands.log"
    result: dict[str, Any] = {"benchmark": NAME, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "command": command, "machine": machine(), "window": [str(start), str(end)],
                              "train_epsilon": args.ml_train_epsilon, "train_settings": TRAIN_SETTINGS,
                              "rounds": ROUNDS, "log": str(log)}
    _privrec(["keys", "init"], env, log)
    seconds = {"import": _privrec(["import", "movielens", str(args.movielens), "--replay-days", str(days),
                                   "--replay-end", str(end)], env, log)}
    console.print(f"imported ml-latest-small onto {start} .. {end}; backfilling (log: {log})", markup=False)
    seconds["backfill"] = _privrec(
        ["backfill", "--start", str(start), "--end", str(end), "-p", f"train_window_days={days}",
         "-p", f"train_epsilon={args.ml_train_epsilon}", "-p", "train_settings=" + json.dumps(TRAIN_SETTINGS)],
        env, log)
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    result.update(read_outcome(str(lake), start, end))
    json_path = args.out / "bench-movielens-pipeline.json"
    result["json"] = shown_path(json_path)
    write_result(result, json_path, markdown(result), SECTION, console, args.no_markdown)
    return 0


def read_outcome(lake: str, start: dt.date, end: dt.date) -> dict[str, Any]:
    """What the lake holds after the backfill: each day's DP statistics release, the window's
    training release and evaluation (the operator's record: exact hold-out metrics)."""
    from privrec_pipeline import lake as lk
    from privrec_pipeline.models.publish import operator_record
    from privrec_pipeline.training.tasks import candidate_folder

    releases = []
    for n in range((end - start).days + 1):
        day = start + dt.timedelta(days=n)
        doc = json.loads((lk.path(lk.partition_uri(lake, "dp_stats", day)) / "release.json").read_text())
        releases.append({"day": str(day), "epsilon": doc["epsilon"], "delta": doc["delta"],
                         "items": doc["released"]["items"], "keys": doc["keys"]["source"],
                         "max_items_per_user": doc["bounds"]["max_items_per_user"],
                         "chosen": doc["bounds"]["chosen"],
                         "dropped_share": doc["bounding"].get("dropped_share")})
    training = json.loads((candidate_folder(lake, end) / "model" / "training.json").read_text())
    outcome = json.loads(operator_record(lake, end).read_text())
    evaluation = outcome["evaluation"]["exact"]  # the exact metrics (the gate read the DP ones)
    return {"dp_stats": releases,
            "training": {"epsilon": training["plan"]["epsilon"], "delta": training["plan"]["delta"],
                         "mode": training["plan"]["mode"], "noise_multiplier": training["plan"]["noise_multiplier"],
                         "vocabulary_size": training["vocabulary_size"],
                         "categories": training.get("model", {}).get("categories")},
            "evaluation": {"candidate": evaluation["candidate"], "dp_popularity": evaluation["dp_popularity"],
                           "published": outcome["published"], "reason": outcome["reason"],
                           "version": outcome["version"], "users": evaluation["users"],
                           "dp": {k: outcome["evaluation"]["dp"][k] for k in ("epsilon", "population", "gains",
                                                                              "confidence", "candidate",
                                                                              "dp_popularity")}}}


def markdown(result: dict[str, Any]) -> str:
    m, ev, tr = result["machine"], result["evaluation"], result["training"]
    cand, pop = ev["candidate"], ev["dp_popularity"]
    lift = cand["recall@20"] / pop["recall@20"] - 1 if pop["recall@20"] > 0 else float("inf")
    ok = ev["published"] and cand["recall@20"] > pop["recall@20"]
    lines = [
        SECTION[0],
        "## MovieLens through the pipeline: a backfill of ml-latest-small and a model over its catalog",
        "",
        f"- Date: {result['date']}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM; load average at start {m['load_avg_start']}",
        f"- Command: `{result['command']}`",
        (f"- ml-latest-small (100,836 ratings, 610 users) replayed onto {result['window'][0]} .. "
         f"{result['window'][1]} (`privrec import movielens --replay-days`), movies.csv as the catalog; "
         f"`privrec backfill` over the window, embedded default (local Spark, SQLite); import "
         f"{result['seconds']['import']} s, backfill {result['seconds']['backfill']} s"),
        (f"- Model: {tr['mode']} mode, epsilon {tr['epsilon']:g}, delta {tr['delta']:g}, noise multiplier "
         f"{tr['noise_multiplier']:.2f}, {result['rounds']} rounds x 2 partitions, settings "
         f"`{json.dumps(result['train_settings'])}`; vocabulary {tr['vocabulary_size']:,} items, "
         f"{tr['categories'] or 0} categories"),
        "",
        "| day | DP stats epsilon | items released | keys | K (max items per user) | bound chosen | dropped share |",
        "|---|---:|---:|---|---:|---|---:|",
        *[f"| {r['day']} | {r['epsilon']:g} | {r['items']:,} | {r['keys']} | {r['max_items_per_user']} | "
          f"{r['chosen'] or 'set by hand'} | "
          f"{'-' if r['dropped_share'] is None else format(r['dropped_share'], '.1%')} |" for r in result["dp_stats"]],
        "",
        "| held-out users | Recall@20 | NDCG@10 | HR@10 |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {v['recall@20']:.4f} | {v['ndcg@10']:.4f} | {v['hr@10']:.4f} |"
          for name, v in (("model (candidate)", cand), ("DP popularity (the window's dp_stats)", pop))],
        "",
        (f"DP evaluation (what the gate decided on): epsilon {ev['dp']['epsilon']:.3g}"
         + (f", chosen for the DP population of {ev['dp']['population']:,.0f} training users"
            if ev["dp"]["population"] is not None else "")
         + f" (evaluated: {ev['users']['trained']:,} trained and {ev['users']['held_out']:,} held-out users); "
         f"DP Recall@20 {ev['dp']['candidate']['recall@20']:.4f} vs DP popularity "
         f"{ev['dp']['dp_popularity']['recall@20']:.4f}; "
         + "; ".join(f"paired gain over {name.replace('_', ' ')} {g['mean']:+.4f}, lower bound {g['lower']:+.4f} "
                     f"at confidence {ev['dp']['confidence']:g}" for name, g in ev["dp"]["gains"].items())),
        "",
        f"**Model vs DP popularity (Recall@20): {cand['recall@20']:.4f} vs {pop['recall@20']:.4f} "
        f"(lift {lift:+.1%}); published: {ev['published']} ({ev['reason']}) "
        f"(target: published and never worse than DP popularity: {'met' if ok else 'NOT met'})**",
        "",
        f"Raw numbers: `{result['json']}`; the commands' output: `{result['log']}`.",
        SECTION[1],
    ]
    return "\n".join(lines)
