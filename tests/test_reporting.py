"""The run summary (privrec_pipeline.reporting): what a user reads after `privrec run`."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from rich.console import Console

from privrec_pipeline import lake as lk
from privrec_pipeline.reporting import print_run_summary

DAY = dt.date(2026, 2, 7)
WINDOW = [str(DAY - dt.timedelta(days=1)), str(DAY)]


def _write(path: str | Path, doc: dict) -> None:
    path = lk.path(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")


def test_the_summary_names_the_model_the_baseline_its_bound_and_the_lift(tmp_path):
    from privrec_pipeline.models.publish import operator_record

    lake = str(tmp_path / "lake")
    _write(lk.manifest_uri(lake, "collect", DAY),
           {"landing_records": 10, "bronze_records": 10, "duplicates": 0, "quarantined_total": 0, "quarantined": {},
            "bronze_uri": "b", "quarantine_uri": "q"})
    for day, k in zip(WINDOW, (4, 6), strict=True):
        _write(f"{lk.partition_uri(lake, 'dp_stats', dt.date.fromisoformat(day))}/release.json",
               {"release_id": 1, "epsilon": 0.5, "delta": 0.0, "released": {"items": 9742},
                "keys": {"source": "catalog (public partitions)"}, "bounds": {"max_items_per_user": k}})
    candidate = lk.path(lk.partition_uri(lake, "candidates", DAY)) / "model" / "training.json"
    _write(candidate, {"release_id": 3, "plan": {"mode": "local", "epsilon": 4.0, "delta": 1e-7,
                                                 "noise_multiplier": 1.7},
                       "partitions": 2, "config": {"rounds": 10}, "vocabulary_size": 9742, "window": WINDOW,
                       "audit": {"passed": True, "epsilon_lower": 0.4321, "confidence": 0.99, "canaries": 1000}})
    _write(operator_record(lake, DAY),
           {"evaluation": {"dp": {"candidate": {"recall@20": 0.12, "ndcg@10": 0.1}, "dp_popularity": {"recall@20": 0.08},
                                  "epsilon": 0.2},
                           "exact": {"candidate": {"recall@20": 0.1234, "ndcg@10": 0.1},
                                     "dp_popularity": {"recall@20": 0.0789}}},
            "published": True, "version": "2026-02-07-r3", "reason": "beats DP popularity"})
    console = Console(record=True, width=200)
    print_run_summary(console, lake, DAY, None)
    text = console.export_text()
    assert "9,742 items / 1.7" in text  # the vocabulary: the whole catalog
    assert "DP popularity Recall@20 (K 4, 6)" in text  # the bounds DP popularity's counts were taken with
    # The DP evaluation (what the card shows and the gate used), the exact numbers marked as the operator's.
    assert "0.0800 (lift +50.0%)" in text and "0.1200 / 0.1000" in text and "epsilon 0.2" in text
    assert "0.1234 / 0.0789 (operator only)" in text
    assert "training audit" in text and "passed: epsilon >= 0.432 at confidence 0.99 (1000 canaries)" in text
    assert "2026-02-07-r3" in text
