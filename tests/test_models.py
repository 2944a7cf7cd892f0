"""Evaluate, publish and serve: the quality gate both ways, an atomic and idempotent publish,
a model card that agrees with the ledger, the recommend command and batch scoring."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from conftest import DAY, released_day
from privrec_pipeline import lake as lk
from privrec_pipeline.errors import PrivrecError
from privrec_pipeline.models import publish as pub
from privrec_pipeline.models.evaluate import GateSettings
from privrec_pipeline.models.recommend import LATEST, Recommender, models_root, resolve_version
from privrec_pipeline.privacy.ledger import open_ledger
from privrec_pipeline.training import tasks
from privrec_pipeline.training.federated import TrainConfig
from privrec_pipeline.training.partitions import PartitionParams, run_build_partitions

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory, keyring):
    """A day through dp_stats, build_partitions and two rounds of training (a candidate model)."""
    root = tmp_path_factory.mktemp("models") / "lake"
    lake = str(root)
    released_day(spark, lake, keyring, {"events": 8000, "users": 300, "items": 200, "seed": 9})
    run_build_partitions(spark, lake, DAY, PartitionParams(window_days=1, partitions=2, holdout_user_share=0.3))
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_HOME", str(home))
        mp.setenv("PRIVREC_BUDGET_EPSILON", "1000")
        config = TrainConfig(mode="local", epsilon=50.0, delta=1e-6, rounds=3, local_steps=25, batch_size=60,
                             dim=16, local_lr=0.05)
        tasks.prepare_training(lake, DAY, config, run_id="run-1", dag_id="privrec_nightly")
        roster = tasks.seal_keys(lake, DAY, [tasks.publish_keys(lake, DAY, k) for k in range(2)])
        for r in range(3):
            for k in range(2):
                tasks.train_partition(lake, DAY, r, k, roster)
            tasks.aggregate_round(lake, DAY, r, roster)
        tasks.finish_training(lake, DAY, run_id="run-1")
    return root


@pytest.fixture()
def lake(trained, tmp_path, monkeypatch):
    target = tmp_path / "lake"
    shutil.copytree(trained, target)
    monkeypatch.setenv("PRIVREC_BUDGET_EPSILON", "1000")
    return str(target)


# On a tiny synthetic day (users without lasting tastes) popularity is hard to beat; the
# publishing mechanics are tested with the popularity check off, the check itself below.
MECHANICS = GateSettings(min_gain_over_dp_popularity=-1.0)


def test_publish_writes_a_version_with_a_card_that_agrees_with_the_ledger(lake):
    outcome = pub.publish(lake, DAY, gate=MECHANICS)
    assert outcome["published"], outcome["reason"]
    folder = Path(outcome["path"])
    assert (models_root(lake) / "privrec-recommender" / LATEST).read_text().strip() == folder.name
    card = json.loads((folder / "model_card.json").read_text())
    [release] = [r for r in open_ledger(lake).releases() if r.release_key == "training"]
    assert card["created_from"]["ledger_release"] == release.id and folder.name == f"{DAY}-r{release.id}"
    privacy = card["privacy"]
    assert (privacy["model"]["epsilon"], privacy["model"]["delta"]) == (release.epsilon, release.delta)
    assert privacy["noise_multiplier"] == release.components[0].noise_multiplier
    assert privacy["steps"] == release.components[0].count and privacy["partitions"] == 2
    for field in ("accountant", "clipping_norm", "sampling_rates", "rounds", "contribution_bounds", "window_per_ledger"):
        assert privacy[field] is not None, field
    assert card["data"]["window"] == [DAY.isoformat()]
    assert set(card["metrics"]["candidate"]) == {"recall@20", "ndcg@10", "hr@10"}
    assert card["code_version"] and "membership_inference" not in card and "warnings" not in card
    # The card's metrics are the DP evaluation release's, accounted in the ledger; the exact
    # ones are the operator's. The training audit (canary coordinates only) is in the card.
    record = json.loads(pub.operator_record(lake, DAY).read_text())["evaluation"]
    [evaluation] = [r for r in open_ledger(lake).releases() if r.release_key == f"evaluation-r{release.id}"]
    assert record["dp"]["release_id"] == evaluation.id and evaluation.state == "committed"
    assert card["metrics"]["candidate"] == record["dp"]["candidate"] != record["exact"]["candidate"]
    assert set(record["exact"]["users"]) == {"trained", "held_out"}
    audit = privacy["audit"]
    assert audit["passed"] and audit["canaries"] == 1000 and audit["claimed_epsilon"] == pytest.approx(release.epsilon)
    assert "### Audit" in (folder / "model_card.md").read_text() and "Empirical lower bound" in \
        (folder / "model_card.md").read_text()
    assert "Model card" in (folder / "model_card.md").read_text()
    # A rerun of the same run publishes nothing new.
    again = pub.publish(lake, DAY, gate=MECHANICS)
    assert again["reused"] and sorted(p.name for p in (models_root(lake) / "privrec-recommender").iterdir()
                                      if not p.name.startswith(".")) == sorted([LATEST, folder.name])


# What a model card may hold, pinned: every key is public configuration, a DP release the
# ledger accounted, or a description. A new key must be added here, with its reason.
CARD_KEYS = {
    "name", "version", "created_from.run_id", "created_from.ledger_release", "created_from.data_window",
    "privacy.unit", "privacy.model.epsilon", "privacy.model.delta", "privacy.model.mode",
    "privacy.model.epsilon_per_partition", "privacy.window_per_ledger.start", "privacy.window_per_ledger.end",
    "privacy.window_per_ledger.epsilon_spent", "privacy.window_per_ledger.basic_epsilon",
    "privacy.window_per_ledger.cap_epsilon", "privacy.window_per_ledger.cap_delta",
    "privacy.window_per_ledger.releases", "privacy.accountant", "privacy.clipping_norm", "privacy.noise_multiplier",
    "privacy.sampling_rates", "privacy.steps", "privacy.rounds", "privacy.local_steps", "privacy.partitions",
    "privacy.population.partition_users", "privacy.population.epsilon", "privacy.population.release_id",
    "privacy.population.mechanism", "privacy.population.library", "privacy.population.sampling_rates",
    "privacy.epsilon_with_population",
    "privacy.trust_model.mode", "privacy.trust_model.partitions", "privacy.trust_model.collusion_tolerance",
    "privacy.trust_model.noise_std_per_partition", "privacy.trust_model.assumption",
    "privacy.trust_model.secure_aggregation", "privacy.trust_model.noise_source",
    "privacy.contribution_bounds.max_items_per_user", "privacy.contribution_bounds.per_user_gradient_norm",
    "privacy.vocabulary", "privacy.published_parameters", "data.window", "data.dp_releases",
    "metrics.protocol", "metrics.dp", "metrics.candidate.recall@20", "metrics.candidate.ndcg@10",
    "metrics.candidate.hr@10", "metrics.dp_popularity.recall@20", "metrics.previously_published",
    "metrics.previous_version", "code_version",
    # The one-run audit: computed from the canary coordinates, which no user's data touches.
    *(f"privacy.audit.{k}" for k in ("claimed_epsilon", "delta", "epsilon_lower", "confidence", "canaries",
                                     "guesses", "correct", "method", "passed")),
}


# Keys whose numbers are configuration or accounted ledger values, never counts of the data.
PUBLIC_CARD_KEYS = ("privacy.model.", "privacy.window_per_ledger.", "privacy.clipping_norm", "privacy.steps",
                    # DP counts (a release of their own) and the ledger's epsilons: a count may
                    # equal an exact one by chance (noise within 0.5: about 1 in 40).
                    "privacy.population.", "privacy.epsilon_with_population",
                    "privacy.rounds", "privacy.local_steps", "privacy.partitions", "privacy.trust_model.partitions",
                    "privacy.trust_model.collusion_tolerance", "privacy.contribution_bounds.", "created_from.",
                    "privacy.audit.")


def _leaves(value, path=""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, f"{path}.{key}" if path else key)
    else:
        yield path, value


def _numbers(value):
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, list | tuple):
        for inner in value:
            yield from _numbers(inner)
    elif isinstance(value, dict):
        for inner in value.values():
            yield from _numbers(inner)


def test_the_model_card_holds_only_allowed_keys_and_no_exact_count_of_the_data(lake):
    import re

    outcome = pub.publish(lake, DAY, gate=MECHANICS)
    folder = Path(outcome["path"])
    card = json.loads((folder / "model_card.json").read_text())
    assert {path for path, _ in _leaves(card)} == CARD_KEYS
    # The exact numbers of the training data: users and items per partition, in total, held out.
    manifest = json.loads(lk.path(lk.manifest_uri(lake, "build_partitions", DAY)).read_text())
    sizes = manifest["partitions"].values()
    exact = {n for p in sizes for n in p.values()} | set(manifest["holdout"].values())
    exact |= {sum(p["users"] for p in sizes), sum(p["users"] for p in sizes) + manifest["holdout"]["held_out_users"]}
    assert min(exact) > 30, exact  # the fixture's counts are not small numbers a setting could equal
    # Ledger values and settings are public (accounted or configured): the fixture's epsilon 50
    # (or the window's 30 + 50) may equal a count by chance (partitions follow the session's key).
    leaked = {path: v for path, v in _leaves(card) if not path.startswith(PUBLIC_CARD_KEYS)
              for n in _numbers(v) if n in exact}
    assert not leaked, f"exact counts in the model card: {leaked}"
    # The sampling rates publish the DP partition counts (batch / q), not the exact sizes.
    report = json.loads((folder / "training.json").read_text())
    rates, dp_counts = card["privacy"]["sampling_rates"], card["privacy"]["population"]["partition_users"]
    assert [round(report["config"]["batch_size"] / q) for q in rates if q < 1] == [
        n for n, q in zip(dp_counts, rates, strict=True) if q < 1]
    assert report["plan"]["population"] == dp_counts
    markdown = (folder / "model_card.md").read_text()
    assert markdown == pub.model_card_markdown(card)  # nothing in it beyond the checked card
    # Nothing that tells two neighbouring training sets apart with certainty (a data hash).
    for text in (json.dumps(card), markdown):
        assert not re.search(r"\b[0-9a-f]{64}\b", text)
    # The exact numbers stay with the operator, outside the published folder.
    assert not (folder / "evaluation.json").exists()
    record = json.loads(pub.operator_record(lake, DAY).read_text())
    assert record["evaluation"]["exact"]["users"]["held_out"] == manifest["holdout"]["held_out_users"]
    assert len(record["training_data_sha256"]) == 64


def test_the_gate_refuses_a_candidate_worse_than_the_published_model(lake):
    first = pub.publish(lake, DAY, gate=MECHANICS)
    # The same model against itself (a new, forced evaluation release: the first one was made
    # with no model published), at an epsilon where the noise is negligible: within any
    # tolerance >= 0 ...
    exact = GateSettings(tolerance=0.05, min_gain_over_dp_popularity=-1, epsilon=100.0)
    evaluation, _ = pub.evaluate_candidate(lake, DAY, gate=exact, run_id="run-2", force=True)
    assert evaluation.publish and evaluation.dp["published_version"] == first["version"]
    assert evaluation.dp["published"]["recall@20"] == pytest.approx(evaluation.dp["candidate"]["recall@20"], abs=5e-3)
    # ... and refused when it must be 50% better than the published one.
    strict = GateSettings(tolerance=-0.5, min_gain_over_dp_popularity=-1, epsilon=100.0)
    evaluation, _ = pub.evaluate_candidate(lake, DAY, gate=strict, run_id="run-3", force=True)
    assert not evaluation.publish and "below the published model" in evaluation.reason
    # A rerun of a run reuses its committed evaluation (and pays nothing more).
    spent = open_ledger(lake).spend_at(DAY).basic_epsilon
    again, _ = pub.evaluate_candidate(lake, DAY, gate=strict, run_id="run-3")
    assert again.dp == {**evaluation.dp, "status": "reuse"} and open_ledger(lake).spend_at(DAY).basic_epsilon == spent


def test_the_gate_refuses_a_candidate_that_does_not_beat_dp_popularity(lake):
    import torch

    from privrec_pipeline.training.artifact import model_vocabulary, read_model, write_model
    from privrec_pipeline.training.federated import flatten

    candidate = tasks.candidate_folder(lake, DAY) / "model"
    model, items, report = read_model(candidate)
    assert model.config.categories > 0  # the synthetic lake has a catalog: the model has a category component
    from privrec_pipeline.models.evaluate import dp_popularity_counts

    # The candidate ranks exactly like DP popularity: every parameter zero, the biases its
    # counts. (All-equal scores would rank by item index, which can beat noisy popularity.)
    counts = dp_popularity_counts([lk.path(lk.partition_uri(lake, "dp_stats", DAY)) / "items.parquet"], items)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.item_out.bias.copy_(torch.as_tensor(counts, dtype=torch.float32))
    write_model(candidate, TrainConfig(**report["config"]), len(items), flatten(model), model_vocabulary(candidate),
                {k: v for k, v in report.items() if k != "model"})
    # The DP means of equal exact metrics differ by their noise: negligible at this epsilon.
    outcome = pub.publish(lake, DAY, gate=GateSettings(min_gain_over_dp_popularity=0.05, epsilon=100.0))
    assert not outcome["published"] and "does not beat 1.05 x DP popularity" in outcome["reason"]
    assert not (models_root(lake) / "privrec-recommender" / LATEST).exists()


def test_a_publish_killed_before_the_rename_leaves_nothing_visible(lake, monkeypatch):
    def killed(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Path, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        pub.publish(lake, DAY, gate=MECHANICS)
    monkeypatch.undo()
    root = models_root(lake) / "privrec-recommender"
    assert not (root / LATEST).exists() and not [p for p in root.iterdir() if not p.name.startswith(".")]
    assert pub.publish(lake, DAY, gate=MECHANICS)["published"]  # the retry publishes normally


def test_a_publish_killed_before_latest_moves_is_finished_by_the_retry(lake, monkeypatch):
    import os

    real_replace = os.replace

    def killed(src, dst):
        if Path(dst).name == LATEST:
            raise KeyboardInterrupt("killed after the version's rename, before LATEST moved")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        pub.publish(lake, DAY, gate=MECHANICS)
    monkeypatch.undo()
    root = models_root(lake) / "privrec-recommender"
    [version] = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    assert not (root / LATEST).exists()
    retry = pub.publish(lake, DAY, gate=MECHANICS)
    assert retry["reused"] and (root / LATEST).read_text().strip() == version == retry["version"]
    (root / LATEST).write_text("2999-01-01-r99\n")  # a version published since is never moved back
    pub.publish(lake, DAY, gate=MECHANICS)
    assert (root / LATEST).read_text().strip() == "2999-01-01-r99"


def test_recommend_uses_the_history_and_rejects_bad_input(lake):
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app

    pub.publish(lake, DAY, gate=MECHANICS)
    recommender = Recommender.load(resolve_version(lake, "privrec-recommender"))
    history = recommender.items[:3]
    recs, ignored = recommender.recommend([*history, "not-an-item"], k=5)
    assert ignored == ["not-an-item"] and len(recs) == 5
    assert not {r.item_id for r in recs} & set(history)  # the history is excluded
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    runner = CliRunner()
    ok = runner.invoke(app, ["recommend", "--history", ",".join(history), "-k", "3", "--lake", lake])
    assert ok.exit_code == 0 and recs[0].item_id in ok.output
    for args, message in ((["--history", " "], "the history is empty"),
                          (["--history", "x", "--model", "nope"], "has no version 'nope'"),
                          (["--history", "x"], "none of the 1 history item(s) is in the model's vocabulary")):
        bad = runner.invoke(app, ["recommend", *args, "--lake", lake])
        assert bad.exit_code == 1 and message in bad.output, bad.output
    empty = runner.invoke(app, ["recommend", "--history", "a", "--lake", str(Path(lake) / "nothing")])
    assert empty.exit_code == 1 and "no published model" in empty.output


def test_batch_scoring_of_the_latest_model(lake):
    import pyarrow.parquet as pq

    from privrec_pipeline.models.batch import score_latest_holdout

    pub.publish(lake, DAY, gate=MECHANICS)
    old = lk.path(lk.partition_uri(lake, "serving", DAY - dt.timedelta(days=31)))
    kept = lk.path(lk.partition_uri(lake, "serving", DAY - dt.timedelta(days=30)))
    for folder in (old, kept):
        folder.mkdir(parents=True)
    result = score_latest_holdout(lake, k=5)
    version = resolve_version(lake, "privrec-recommender")
    # Per-user output: in the restricted serving zone, never in the published folder.
    assert result["path"] == str(lk.path(lk.partition_uri(lake, "serving", DAY)) / f"{version.name}.parquet")
    assert not (version / "batch").exists()
    table = pq.read_table(result["path"])
    assert table.num_rows > 0 and set(table.column("rank").to_pylist()) <= {1, 2, 3, 4, 5}
    # What the task returns (XCom) counts nothing of the data.
    assert set(result) == {"version", "path", "retention_days", "pruned"}
    # Retention: partitions more than 30 days before the newest are deleted, the others kept.
    assert result["pruned"] == [old.name] and not old.exists() and kept.exists()
    with pytest.raises(PrivrecError):
        resolve_version(lake, "privrec-recommender", "1999-01-01-r1")


def test_a_bad_serving_retention_gets_a_clear_error(monkeypatch):
    from privrec_pipeline.errors import ConfigurationError
    from privrec_pipeline.models.batch import retention_days

    assert retention_days({}) == 30 and retention_days({"PRIVREC_SERVING_RETENTION_DAYS": "7"}) == 7
    for bad in ("0", "-3", "a week"):
        with pytest.raises(ConfigurationError, match="PRIVREC_SERVING_RETENTION_DAYS must be a positive number"):
            retention_days({"PRIVREC_SERVING_RETENTION_DAYS": bad})


def test_gate_settings_come_from_the_dag_params():
    from privrec_pipeline.errors import ConfigurationError
    from privrec_pipeline.models.evaluate import gate_settings

    gate = gate_settings(0.1, {"min_gain_over_dp_popularity": -1, "epsilon": 0.3})
    assert gate == GateSettings(tolerance=0.1, min_gain_over_dp_popularity=-1.0, epsilon=0.3)
    with pytest.raises(ConfigurationError, match="publish_tolerance Param"):
        gate_settings(0.1, {"tolerance": 0.2})
    with pytest.raises(ConfigurationError, match="unknown publish setting"):
        gate_settings(0.1, {"min_gain": 0.1})


def test_a_model_whose_training_audit_failed_is_never_published_nor_evaluated(lake):
    from privrec_pipeline.training.tasks import candidate_folder

    path = candidate_folder(lake, DAY) / "model" / "training.json"
    report = json.loads(path.read_text())
    report["audit"] = {**report["audit"], "epsilon_lower": 3.2, "passed": False}
    path.write_text(json.dumps(report))
    outcome = pub.publish(lake, DAY, gate=MECHANICS)
    assert not outcome["published"] and "the training audit refutes the model's guarantee: epsilon >= 3.2" in \
        outcome["reason"]
    assert not (models_root(lake) / "privrec-recommender" / LATEST).exists()
    assert not [r for r in open_ledger(lake).releases() if r.release_key.startswith("evaluation-")]
    assert json.loads(pub.operator_record(lake, DAY).read_text())["audit"]["passed"] is False
