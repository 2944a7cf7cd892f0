"""build_partitions and the training tasks on a tiny validated day: disjoint partitions over the
DP vocabulary, the protocol's hold-out, and rounds of masked updates that fail closed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import DAY, released_day
from privrec_pipeline import lake as lk
from privrec_pipeline.errors import PrivrecError
from privrec_pipeline.training import tasks
from privrec_pipeline.training.artifact import read_model
from privrec_pipeline.training.federated import TrainConfig
from privrec_pipeline.training.partitions import PartitionParams, run_build_partitions, training_uri
from privrec_pipeline.training.secure_agg import SecureAggregationError

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def partitioned(spark, tmp_path_factory, keyring):
    root = tmp_path_factory.mktemp("training") / "lake"
    lake = str(root)
    released_day(spark, lake, keyring, {"events": 4000, "users": 150, "items": 60, "seed": 3})
    manifest = run_build_partitions(spark, lake, DAY, PartitionParams(window_days=3, partitions=2,
                                                                      max_items_per_user=12, holdout_user_share=0.2))
    return root, manifest


def manifest_categories(lake: str) -> int:
    return json.loads(lk.path(lk.manifest_uri(lake, "build_partitions", DAY)).read_text())["categories"]


def _rows(folder: Path):
    return ds.dataset(str(folder), format="parquet", partitioning="hive").to_table().to_pandas()


def test_partitions_are_disjoint_over_the_dp_vocabulary_with_the_protocol_holdout(partitioned):
    root, manifest = partitioned
    folder = lk.path(training_uri(str(root), DAY))
    vocab = _rows(folder / "vocabulary")
    released = ds.dataset(str(lk.path(lk.partition_uri(str(root), "dp_stats", DAY)) / "items.parquet")).to_table()
    assert set(vocab["item_id"]) == set(released.column("item_id").to_pylist())
    assert sorted(vocab["item_index"]) == list(range(len(vocab))) == list(range(manifest.vocabulary_size))
    # The generator's lake has a catalog: every vocabulary item carries its catalog category.
    from privrec_pipeline.catalog import read_items, snapshot_for

    catalog = read_items(snapshot_for(str(root), DAY)).to_pandas().set_index("item_id")["category"]
    names = _rows(folder / "categories").sort_values("category_index")
    assert names["category_index"].tolist() == list(range(len(names))) and len(names) == manifest.categories > 1
    assert names["category"].tolist() == sorted(names["category"])
    category = dict(zip(names["category_index"], names["category"], strict=True))
    assert all(category[c] == catalog.get(item, "") for item, c in zip(vocab["item_id"], vocab["category_index"],
                                                                        strict=True))
    shards = [_rows(folder / f"partition={k}") for k in range(2)]
    users = [set(s["user_pseudonym"]) for s in shards]
    assert users[0] and users[1] and not users[0] & users[1]  # disjoint
    assert [manifest.partitions[str(k)]["users"] for k in range(2)] == [len(u) for u in users]
    assert manifest.window == ["2026-01-13", "2026-01-14", "2026-01-15"] and manifest.days_used == ["2026-01-15"]
    for shard in shards:
        assert shard.groupby("user_pseudonym").size().max() <= 12  # the L most recent items
        assert shard["item_index"].between(0, manifest.vocabulary_size - 1).all()
    holdout = _rows(folder / "holdout")
    held_out = set(holdout.loc[~holdout["trained"], "user_pseudonym"])
    assert held_out and not held_out & (users[0] | users[1])  # held-out users are never trained on
    for _, rows in holdout.groupby("user_pseudonym"):
        n = len(rows)
        assert n >= 5 and (rows["role"] == "test").sum() == max(1, int(0.2 * n))
        # Test items are the user's last ones in time; training shards never hold them.
        assert rows.sort_values("position")["role"].tolist()[-1] == "test"
    trained_tests = holdout[(holdout["role"] == "test") & holdout["trained"]]
    pairs = {(u, i) for s in shards for u, i in zip(s["user_pseudonym"], s["item_index"], strict=True)}
    assert not pairs & set(zip(trained_tests["user_pseudonym"], trained_tests["item_index"], strict=True))


def test_training_tasks_write_an_accounted_candidate_and_fail_closed(partitioned, tmp_path, monkeypatch):
    root, _ = partitioned
    lake = str(root)
    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRIVREC_BUDGET_EPSILON", "1000")
    config = TrainConfig(mode="distributed", epsilon=6.0, delta=1e-7, rounds=2, batch_size=20, dim=8)
    state = tasks.prepare_training(lake, DAY, config, run_id="run-1", dag_id="privrec_nightly")
    assert state["status"] == "new" and state["plan"]["epsilon"] <= 6.0 * 1.001
    published = [tasks.publish_keys(lake, DAY, k) for k in range(2)]
    roster = tasks.seal_keys(lake, DAY, published)  # the digest the DAG passes on through XCom
    tasks.train_partition(lake, DAY, 0, 0, roster)
    with pytest.raises(SecureAggregationError, match=r"partition\(s\) \[1\] are missing"):
        tasks.aggregate_round(lake, DAY, 0, roster)  # fails closed: nothing unmasked, no next model
    run = tasks.candidate_folder(lake, DAY) / "run"
    assert not (run / "round=1" / "model.npz").exists()
    masked = run / "round=0" / "masked" / "partition=0.npz"
    first = np.load(masked)["masked"]
    assert tasks.train_partition(lake, DAY, 0, 0, roster)["update"] == "reused"  # a retry reuses the update
    assert np.array_equal(np.load(masked)["masked"], first)
    for r in range(2):
        for k in range(2):
            tasks.train_partition(lake, DAY, r, k, roster)
        tasks.aggregate_round(lake, DAY, r, roster)
    result = tasks.finish_training(lake, DAY, run_id="run-1")
    model, items, report = read_model(Path(result["candidate"]))
    assert len(items) == model.config.vocab_size == report["vocabulary_size"]
    assert model.config.categories == manifest_categories(lake) > 1 and len(model.item_category) == len(items)
    assert report["plan"]["mode"] == "distributed" and report["release_id"] == state["release_id"]
    from privrec_pipeline.privacy.ledger import open_ledger

    training = [r for r in open_ledger(lake).releases() if r.release_key == "training"]
    assert [(r.state, r.window_start.isoformat()) for r in training] == [("committed", "2026-01-13")]
    assert training[0].components[0].mechanism == "gaussian"
    # A rerun of the day reuses the committed model: nothing is spent or retrained.
    again = tasks.prepare_training(lake, DAY, config, run_id="run-2", dag_id="privrec_nightly")
    assert again["status"] == "reuse" and tasks.finished(lake, DAY)
    assert json.loads((Path(result["candidate"]) / "training.json").read_text())["run_id"] == "run-1"
    import shutil

    shutil.rmtree(tasks.candidate_folder(lake, DAY))  # a committed model whose files are lost
    with pytest.raises(PrivrecError, match="rerun with force_release"):
        tasks.prepare_training(lake, DAY, config, run_id="run-3", dag_id="privrec_nightly")


def test_a_window_without_a_dp_release_is_refused(spark, partitioned):
    root, _ = partitioned
    with pytest.raises(PrivrecError, match="no validated day in the training window"):
        run_build_partitions(spark, str(root), DAY.replace(day=1), PartitionParams(window_days=2))


def test_privrec_train_is_accounted_in_the_ledger_unless_synthetic_and_opted_out(partitioned, tmp_path,
                                                                                    monkeypatch):
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app
    from privrec_pipeline.config import ledger_url
    from privrec_pipeline.privacy.ledger import Ledger

    root, manifest = partitioned
    monkeypatch.setenv("PRIVREC_BUDGET_EPSILON", "1000")  # the fixture's DP release took 30
    ledger = Ledger(ledger_url(str(root)))
    before = len(ledger.releases())
    out = tmp_path / "model"
    args = ["train", "--data", DAY.isoformat(), "--lake", str(root), "--epsilon", "3", "--rounds", "1",
            "--local-steps", "2", "--batch-size", "10", "--dim", "8"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "epsilon per partition" in result.output and "accounted in the privacy ledger as release" in result.output
    assert "held-out users" in result.output and "recall@20" in result.output
    _, items, report = read_model(out)
    assert report["plan"]["epsilon"] <= 3 * 1.001 and len(items) == report["model"]["vocab_size"]
    [release] = ledger.releases()[before:]
    assert (release.release_key, release.state, release.epsilon) == (
        "training_experiment", "committed", pytest.approx(report["plan"]["epsilon"]))
    assert [release.window_start.isoformat(), release.window_end.isoformat()] == [manifest.window[0],
                                                                                  manifest.window[-1]]
    assert report["ledger"] == {"release_id": release.id}

    # opting out is for synthetic data only, and the output says so
    opted_out = CliRunner().invoke(app, [*args, "--no-ledger"], catch_exceptions=False)
    assert opted_out.exit_code == 0 and "NOT accounted in the privacy ledger" in opted_out.output, opted_out.output
    assert len(ledger.releases()) == before + 1
    marker = lk.partition(str(root), "landing", DAY) / "_generation.json"
    marker.rename(marker.with_name("_generation.json.bak"))
    try:
        real = CliRunner().invoke(app, [*args, "--no-ledger"])
    finally:
        marker.with_name("_generation.json.bak").rename(marker)
    assert real.exit_code == 1 and "synthetic data only" in real.output and str(DAY) in real.output
    nonprivate = CliRunner().invoke(app, [*args, "--mode", "nonprivate"])
    assert nonprivate.exit_code == 1 and "cannot be accounted" in nonprivate.output
    assert len(ledger.releases()) == before + 1
    bad = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and "holds no training shards" in bad.output


def test_a_window_spanning_a_pseudonym_key_rotation_is_refused(spark, partitioned, tmp_path):
    import shutil

    root, _ = partitioned
    lake = tmp_path / "lake"
    shutil.copytree(root, lake)
    day_before = DAY.replace(day=DAY.day - 1)
    for zone in ("silver", "reports", "dp_stats"):  # a copy of the day as the day before ...
        shutil.copytree(lk.path(lk.partition_uri(str(lake), zone, DAY)),
                        lk.path(lk.partition_uri(str(lake), zone, day_before)))
    manifest = json.loads(lk.path(lk.manifest_uri(str(lake), "pseudonymize", DAY)).read_text())
    rotated = lk.path(lk.manifest_uri(str(lake), "pseudonymize", day_before))
    rotated.write_text(json.dumps({**manifest, "pseudonym_key_version": "v0"}))  # ... under an older key
    with pytest.raises(PrivrecError, match="spans a pseudonym key rotation"):
        run_build_partitions(spark, str(lake), DAY, PartitionParams(window_days=2))


def _copy_lake(partitioned, tmp_path, monkeypatch) -> str:
    import shutil

    root, _ = partitioned
    lake = tmp_path / "lake"
    shutil.copytree(root, lake)
    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRIVREC_BUDGET_EPSILON", "1000")
    monkeypatch.setenv("PRIVREC_LEASE_SECONDS", "0")  # every lease has expired: the owner looks dead
    return str(lake)


def test_a_training_resume_under_a_new_run_proves_its_plan_and_draws_no_fresh_noise(partitioned, tmp_path,
                                                                                     monkeypatch):
    from privrec_pipeline.errors import LeaseLost, ReleaseMismatch
    from privrec_pipeline.privacy.ledger import open_ledger

    lake = _copy_lake(partitioned, tmp_path, monkeypatch)
    config = TrainConfig(mode="local", epsilon=2.0, delta=1e-7, rounds=1, local_steps=2, batch_size=20, dim=8)
    first = tasks.prepare_training(lake, DAY, config, run_id="run-a", dag_id="d", force=True)
    published = [tasks.publish_keys(lake, DAY, k) for k in range(2)]
    roster = tasks.seal_keys(lake, DAY, published)
    tasks.train_partition(lake, DAY, 0, 0, roster)  # run-a dies after partition 0's update
    plan_file = tasks.candidate_folder(lake, DAY) / "run" / "plan.json"
    masked = tasks.candidate_folder(lake, DAY) / "run" / "round=0" / "masked" / "partition=0.npz"
    plan_bytes, update = plan_file.read_bytes(), np.load(masked)["masked"]

    # run-b with another epsilon must not continue (the ledger holds run-a's epsilon 2)
    with pytest.raises(ReleaseMismatch, match=r"config\.epsilon: reserved 2\.0, now 50\.0"):
        tasks.prepare_training(lake, DAY, TrainConfig(**{**config.__dict__, "epsilon": 50.0}), run_id="run-b",
                               dag_id="d")
    assert plan_file.read_bytes() == plan_bytes
    # nor over another catalog's categories (build_partitions rerun): the model would have another shape
    manifest_file = lk.path(lk.manifest_uri(lake, "build_partitions", DAY))
    manifest_bytes = manifest_file.read_bytes()
    manifest = json.loads(manifest_bytes)
    assert manifest["categories"] > 0
    manifest_file.write_text(json.dumps({**manifest, "categories": manifest["categories"] + 1}))
    with pytest.raises(ReleaseMismatch, match=rf"categories: reserved {manifest['categories']}, now "):
        tasks.prepare_training(lake, DAY, config, run_id="run-b", dag_id="d")
    manifest_file.write_bytes(manifest_bytes)
    # with the reserved settings it takes over run-a's state: same run id for keys and noise
    resumed = tasks.prepare_training(lake, DAY, config, run_id="run-b", dag_id="d")
    assert resumed["status"] == "resume" and resumed["release_id"] == first["release_id"]
    assert resumed["run_id"] == "run-a" and plan_file.read_bytes() == plan_bytes
    assert tasks.train_partition(lake, DAY, 0, 0, roster)["update"] == "reused"
    assert np.array_equal(np.load(masked)["masked"], update)
    tasks.train_partition(lake, DAY, 0, 1, roster)
    tasks.aggregate_round(lake, DAY, 0, roster)
    with pytest.raises(LeaseLost):  # the dead run, come back, cannot publish the model
        tasks.finish_training(lake, DAY, run_id="run-a")
    assert not (tasks.candidate_folder(lake, DAY) / "model").exists()
    tasks.finish_training(lake, DAY, run_id="run-b")
    [release] = [r for r in open_ledger(lake).releases() if r.id == first["release_id"]]
    assert release.state == "committed" and release.epsilon == pytest.approx(first["plan"]["epsilon"])


def test_killed_after_writing_the_model_the_retry_commits_it(partitioned, tmp_path, monkeypatch, killed_before_commit):
    from privrec_pipeline.privacy.ledger import open_ledger

    lake = _copy_lake(partitioned, tmp_path, monkeypatch)
    config = TrainConfig(mode="local", epsilon=2.0, delta=1e-7, rounds=1, local_steps=2, batch_size=20, dim=8)
    state = tasks.prepare_training(lake, DAY, config, run_id="run-a", dag_id="d", force=True)
    roster = tasks.seal_keys(lake, DAY, [tasks.publish_keys(lake, DAY, k) for k in range(2)])
    for k in range(2):
        tasks.train_partition(lake, DAY, 0, k, roster)
    tasks.aggregate_round(lake, DAY, 0, roster)
    with killed_before_commit():
        tasks.finish_training(lake, DAY, run_id="run-a")
    model = tasks.candidate_folder(lake, DAY) / "model" / "model.safetensors"
    written = model.read_bytes()
    assert tasks.finished(lake, DAY)
    assert [r.state for r in open_ledger(lake).releases() if r.id == state["release_id"]] == ["reserved"]
    result = tasks.finish_training(lake, DAY, run_id="run-a")  # the retry
    assert "reused" not in result and model.read_bytes() == written
    assert [r.state for r in open_ledger(lake).releases() if r.id == state["release_id"]] == ["committed"]


def test_the_content_prior_starts_the_item_tables_from_the_catalogs_text(partitioned, tmp_path, monkeypatch):
    """content_prior: the round-0 model's item tables are the catalog texts' projection (public
    data only), in the vocabulary's order; the rest of the model is the usual random start."""
    import torch

    from privrec_pipeline.catalog import read_items, snapshot_for
    from privrec_pipeline.training.content_prior import item_init, item_texts
    from privrec_pipeline.training.data import read_vocabulary
    from privrec_pipeline.training.federated import load_flat, new_model

    lake = _copy_lake(partitioned, tmp_path, monkeypatch)
    config = TrainConfig(mode="local", epsilon=2.0, delta=1e-7, rounds=1, local_steps=2, batch_size=20, dim=8,
                         content_prior=True)
    state = tasks.prepare_training(lake, DAY, config, run_id="run-prior", dag_id="d", force=True)
    vocabulary = read_vocabulary(lk.path(training_uri(lake, DAY)) / "vocabulary", state["vocabulary_size"])
    texts = item_texts(read_items(snapshot_for(lake, DAY)), vocabulary.items)
    assert all(texts) and len(set(texts)) > 1
    expected = item_init(texts, 8, 0.05)
    params = np.load(tasks.candidate_folder(lake, DAY) / "run" / "round=0" / "model.npz")["params"]
    assert not params[-config.audit_canaries:].any()  # the canary block starts at 0
    params = params[:-config.audit_canaries]
    model = new_model(config, state["vocabulary_size"], vocabulary.item_category)
    load_flat(model, params)
    assert torch.equal(model.item_in.weight.detach(), expected)
    assert torch.equal(model.item_out.weight.detach(), expected)
    plain = new_model(TrainConfig(**{**config.__dict__, "content_prior": False}), state["vocabulary_size"],
                      vocabulary.item_category)
    assert torch.equal(model.cat_in.weight.detach(), plain.cat_in.weight.detach())


def test_the_python_half_runs_on_a_lake_without_renames(partitioned, tmp_path, monkeypatch):
    """Training, evaluation, publication, batch scoring and the run summary on an fsspec lake
    (``memory://``, an object store's semantics: no rename, no link), from the Spark half's output."""
    import shutil
    import uuid

    from privrec_pipeline.models.batch import score_latest_holdout
    from privrec_pipeline.models.evaluate import GateSettings
    from privrec_pipeline.models.publish import publish
    from privrec_pipeline.models.recommend import resolve_version
    from privrec_pipeline.privacy.ledger import open_ledger
    from privrec_pipeline.reporting import load_candidate, load_manifest

    root, _ = partitioned
    lake = f"memory://lake-{uuid.uuid4().hex[:8]}"
    lk.copy_folder(root, lk.path(lake), skip=("ledger.db",))
    shutil.copy(root / "_ledger" / "ledger.db", tmp_path / "ledger.db")  # the window's DP releases
    monkeypatch.setenv("PRIVREC_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRIVREC_BUDGET_EPSILON", "1000")
    config = TrainConfig(mode="local", epsilon=4.0, delta=1e-7, rounds=1, local_steps=2, batch_size=20, dim=8)
    state = tasks.prepare_training(lake, DAY, config, run_id="run-m", dag_id="privrec_nightly", force=True)
    roster = tasks.seal_keys(lake, DAY, [tasks.publish_keys(lake, DAY, k) for k in range(2)])
    for k in range(2):
        assert tasks.train_partition(lake, DAY, 0, k, roster)["update"] == "new"
    assert tasks.train_partition(lake, DAY, 0, 0, roster)["update"] == "reused"  # write-once holds
    tasks.aggregate_round(lake, DAY, 0, roster)
    result = tasks.finish_training(lake, DAY, run_id="run-m")
    assert result["candidate"].startswith(lake) and tasks.finished(lake, DAY)
    assert not lk.atomic(tasks.candidate_folder(lake, DAY))
    outcome = publish(lake, DAY, gate=GateSettings(min_gain_over_dp_popularity=-1.0), run_id="run-m")
    assert outcome["published"], outcome["reason"]
    folder = resolve_version(lake, "privrec-recommender")
    assert str(folder).startswith(lake) and read_model(folder)[2]["release_id"] == state["release_id"]
    scored = score_latest_holdout(lake)
    assert scored["path"].startswith(lake) and lk.dataset(lk.path(scored["path"])).count_rows() > 0
    assert load_candidate(lake, DAY)["release_id"] == state["release_id"]
    assert load_manifest(lake, "build_partitions", DAY)["vocabulary_size"] == state["vocabulary_size"]
    committed = {r.release_key for r in open_ledger(lake).releases() if r.state == "committed"}
    assert {"population", "training", f"evaluation-r{state['release_id']}"} <= committed


def test_a_host_whose_dag_has_another_shape_than_the_run_fails_closed_naming_both(partitioned, tmp_path,
                                                                                  monkeypatch):
    lake = _copy_lake(partitioned, tmp_path, monkeypatch)
    tasks.check_dag_shape(lake, DAY, 2, 3, prepared=False)  # build_partitions made 2 partitions
    with pytest.raises(PrivrecError, match=r"parsed the DAG with 3 training partition\(s\) x 3 round\(s\) \("
                                           r"PRIVREC_TRAIN_PARTITIONS=3, PRIVREC_TRAIN_ROUNDS=3\), but "
                                           r"build_partitions' manifest has 2 x 3"):
        tasks.check_dag_shape(lake, DAY, 3, 3, prepared=False)
    config = TrainConfig(mode="local", epsilon=2.0, delta=1e-7, rounds=2, local_steps=1, batch_size=20, dim=8)
    tasks.prepare_training(lake, DAY, config, run_id="run-s", dag_id="d", force=True)
    tasks.check_dag_shape(lake, DAY, 2, 2)
    with pytest.raises(PrivrecError, match=r"but the run's training plan \(made on .+\) has 2 x 2: the DAG's shape "
                                           r"must be the same on every host"):
        tasks.check_dag_shape(lake, DAY, 2, 3)  # a worker with PRIVREC_TRAIN_ROUNDS=3
    assert not (tasks.run_folder(lake, DAY) / "keys").exists()  # it checked before anything was done
