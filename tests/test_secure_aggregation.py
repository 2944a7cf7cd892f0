"""Privacy guarantees of the training tasks that must hold under retries, failures and several
workers (no Spark: a tiny build_partitions output written by hand):

- a partition secret is never empty, never silently replaced, and the same for racing writers;
- secure aggregation checks who takes part: keys bound to a roster sealed outside the lake,
  at least two parties, a partition's own secret against its sealed key, every masked
  update's partition, round, run, key and length, and masked updates written once."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DAY
from privrec_pipeline import lake as lk
from privrec_pipeline.training import secure_agg, tasks
from privrec_pipeline.training.canaries import Canaries
from privrec_pipeline.training.federated import PrivacyPlan, TrainConfig, partition_update
from privrec_pipeline.training.partition_secrets import (
    PartitionSecretError,
    load_or_create,
    secret_path,
)
from privrec_pipeline.training.partitions import training_uri
from privrec_pipeline.training.secure_agg import MaskedUpdate, SecureAggregationError

V = 12
CONFIG = TrainConfig(mode="local", epsilon=8.0, delta=1e-6, rounds=2, local_steps=1, batch_size=6, dim=4)


# -- partition secrets ---------------------------------------------------------------------


def test_a_secret_is_32_random_bytes_in_a_0600_file_and_a_readable_one_is_refused(tmp_path):
    secret = load_or_create(0, tmp_path)
    path = secret_path(0, tmp_path)
    assert len(secret) == 32 and load_or_create(0, tmp_path) == secret
    assert load_or_create(1, tmp_path) != secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    path.chmod(0o644)  # readable by others: refused, not used
    with pytest.raises(PartitionSecretError, match=r"mode 0644.*chmod 600") as error:
        load_or_create(0, tmp_path)
    assert secret.hex() not in str(error.value) and str(path) in str(error.value)


def test_a_worker_with_its_partition_connection_uses_it_and_writes_no_file(tmp_path, monkeypatch):
    """A deployment gives partition K's secret to K's worker only, as the connection
    privrec_partition_K; a worker without it (another partition's, the aggregator's) has none."""
    import json

    configured = "0f" * 32
    monkeypatch.setenv("AIRFLOW_CONN_PRIVREC_PARTITION_1", json.dumps({"conn_type": "generic",
                                                                        "password": configured}))
    assert load_or_create(1, tmp_path) == bytes.fromhex(configured)
    assert not secret_path(1, tmp_path).exists()  # nothing written beside it
    assert load_or_create(0, tmp_path) != bytes.fromhex(configured)  # partition 0: its own file
    monkeypatch.setenv("AIRFLOW_CONN_PRIVREC_PARTITION_1", json.dumps({"conn_type": "generic", "password": "ab" * 16}))
    with pytest.raises(PartitionSecretError, match=r"privrec_partition_1.*exactly 64 hex") as error:
        load_or_create(1, tmp_path)
    assert "ab" * 16 not in str(error.value)


@pytest.mark.parametrize("content", [b"", b"ab" * 16, b"zz" * 32, b"ab" * 33, b"ab" * 32 + b"\n\n"],
                         ids=["empty", "truncated", "not-hex", "too-long", "trailing-junk"])
def test_a_crash_between_create_and_write_never_yields_an_empty_or_short_secret(tmp_path, content):
    folder = tmp_path / "partition-secrets"
    folder.mkdir(mode=0o700)
    # A crashed writer's temporary files never become the secret: a new one is created in full.
    (folder / ".partition-0.key.abc123.tmp").write_bytes(b"")
    (folder / ".partition-0.key.def456.tmp").write_bytes(b"ab" * 10)
    created = load_or_create(0, tmp_path)
    assert len(created) == 32 and secret_path(0, tmp_path).read_bytes() == created.hex().encode()
    # A target left empty or partial (create, then crash before the write) fails closed.
    path = secret_path(1, tmp_path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(PartitionSecretError, match=r"malformed: .* expected exactly 64 hex characters") as error:
        load_or_create(1, tmp_path)
    message = str(error.value)
    assert str(path) in message and f"delete {path}" in message
    if content:
        assert content.decode().strip() not in message  # the content is never shown
    assert path.read_bytes() == content  # and never silently replaced


def _race(home: str, barrier, queue, partitions: int) -> None:
    barrier.wait()  # both processes start creating at the same moment
    queue.put([load_or_create(k, Path(home)).hex() for k in range(partitions)])


def test_two_processes_racing_to_create_a_secret_get_the_same_32_bytes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_race, args=(str(tmp_path), barrier, queue, 300)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert all(len(bytes.fromhex(s)) == 32 for result in results for s in result)
    assert results[0] == results[1]
    assert results[0] == [secret_path(k, tmp_path).read_text() for k in range(300)]


# -- a tiny training run, without Spark ----------------------------------------------------


def _tiny_lake(root: Path, partitions: int, users: int = 6) -> str:
    """What build_partitions writes, by hand: the manifest and one shard per partition."""
    lake = str(root / "lake")
    manifest = lk.path(lk.manifest_uri(lake, "build_partitions", DAY))
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"partitions": {str(k): {"users": users} for k in range(partitions)},
                                    "window": [DAY.isoformat()], "vocabulary_size": V}))
    rng = np.random.default_rng(0)
    for k in range(partitions):
        rows = [(f"u{k}-{u}", int(i), float(rng.uniform(1, 3)), p) for u in range(users)
                for p, i in enumerate(rng.choice(V, size=3, replace=False))]
        user, item, weight, position = zip(*rows, strict=True)
        folder = lk.path(training_uri(lake, DAY)) / f"partition={k}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"user_pseudonym": list(user), "item_index": pa.array(item, pa.int64()),
                                 "weight": pa.array(weight, pa.float32()), "position": list(position)}),
                       folder / "part-0.parquet")
    return lake


@pytest.fixture()
def training(tmp_path, monkeypatch):
    """prepare_training on a tiny lake of P partitions; returns (lake, run folder)."""
    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path / "worker"))
    monkeypatch.setenv("PRIVREC_BUDGET_EPSILON", "1000")
    monkeypatch.delenv("PRIVREC_LEDGER_URL", raising=False)

    def start(partitions: int = 2, config: TrainConfig = CONFIG) -> tuple[str, Path]:
        lake = _tiny_lake(tmp_path, partitions)
        tasks.prepare_training(lake, DAY, config, run_id="run-1", dag_id="privrec_nightly")
        return lake, tasks.candidate_folder(lake, DAY) / "run"

    return start


def _sealed(lake: str, partitions: int = 2) -> str:
    published = [tasks.publish_keys(lake, DAY, k) for k in range(partitions)]
    return tasks.seal_keys(lake, DAY, published)


def test_a_tiny_run_aggregates_the_exact_sum_of_the_partitions_updates(training):
    lake, run = training(3)
    digest = _sealed(lake, 3)
    assert json.loads(run.joinpath("roster.json").read_text())["run_id"] == "run-1"
    start = np.load(run / "round=0" / "model.npz")["params"]
    for k in range(3):
        tasks.train_partition(lake, DAY, 0, k, digest)
    tasks.aggregate_round(lake, DAY, 0, digest)
    # The run's own plan: its sampling rates come from the DP partition counts, not from 6, 6, 6.
    plan = PrivacyPlan(**json.loads(run.joinpath("plan.json").read_text())["plan"])
    assert plan.population == json.loads(run.joinpath("plan.json").read_text())["population"]["partition_users"]
    deltas = [partition_update(CONFIG, plan, start, V, tasks.load_shard(lk.path(training_uri(lake, DAY))
                                                                        / f"partition={k}"),
                               round_index=0, partition=k, partitions=3, secret=load_or_create(k), run_id="run-1",
                               canaries=Canaries.from_doc(json.loads(run.joinpath("plan.json").read_text())["canaries"]))[0]
              for k in range(3)]
    after = np.load(run / "round=1" / "model.npz")["params"]
    assert np.abs((after - start) - sum(deltas) / 3).max() <= 2.0 ** -secure_agg.FRACTION_BITS  # FedAvg
    update = MaskedUpdate.load(run / "round=0" / "masked" / "partition=2.npz", "partition 2")
    roster = secure_agg.Roster.verified(run.joinpath("roster.json").read_bytes(), digest, "roster")
    assert (update.partition, update.round, update.run_id, update.masked.size) == (2, 0, "run-1", start.size)
    assert update.key_fingerprint == roster.sealed(2, 0) and update.roster_digest == digest


# -- partition secrets through the tasks ---------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"0f" * 20], ids=["empty", "truncated"])
def test_an_empty_or_truncated_secret_fails_publish_and_train(training, content):
    lake, run = training()
    path = secret_path(0)
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(PartitionSecretError, match=f"{path}.*malformed"):
        tasks.publish_keys(lake, DAY, 0)
    assert not (run / "keys" / "partition=0.json").exists()
    path.unlink()
    digest = _sealed(lake)
    secret_path(1).write_bytes(content)  # the secret is damaged after publishing: training stops
    with pytest.raises(PartitionSecretError, match=f"{secret_path(1)}.*malformed"):
        tasks.train_partition(lake, DAY, 0, 1, digest)
    assert not (run / "round=0" / "masked" / "partition=1.npz").exists()


# -- secure aggregation: who takes part ----------------------------------------------------


def _other_keys(run: Path, partition: int) -> dict:
    public = [secure_agg.RoundKeys.derive(b"x" * 32, "run-1", r, partition).public_bytes().hex()
              for r in range(CONFIG.rounds)]
    return {"partition": partition, "run_id": "run-1", "public": public}


def test_a_public_key_replaced_in_the_lake_after_sealing_fails_the_round(training):
    lake, run = training()
    digest = _sealed(lake)
    keys = run / "keys" / "partition=1.json"
    keys.write_text(json.dumps(_other_keys(run, 1)))  # a lake writer swaps partition 1's key
    with pytest.raises(SecureAggregationError, match=r"public key of partition 1 for round 0 .* not the sealed one"):
        tasks.train_partition(lake, DAY, 0, 0, digest)
    assert not (run / "round=0" / "masked" / "partition=0.npz").exists()
    # ... and the roster too (sealing it again from the swapped file): the XCom digest differs.
    (run / "roster.json").unlink()
    tasks.seal_keys(lake, DAY)
    with pytest.raises(SecureAggregationError, match=r"roster.json does not match the roster sealed"):
        tasks.train_partition(lake, DAY, 0, 0, digest)
    with pytest.raises(SecureAggregationError, match=r"roster.json does not match the roster sealed"):
        tasks.aggregate_round(lake, DAY, 0, digest)


def test_a_key_replaced_between_publishing_and_sealing_is_not_sealed(training):
    lake, run = training()
    published = [tasks.publish_keys(lake, DAY, k) for k in range(2)]
    (run / "keys" / "partition=0.json").write_text(json.dumps(_other_keys(run, 0)))
    with pytest.raises(SecureAggregationError, match=r"not the ones partition 0's publish_keys task published"):
        tasks.seal_keys(lake, DAY, published)
    assert not (run / "roster.json").exists()


def test_a_single_party_is_refused(training, tmp_path):
    keys = secure_agg.RoundKeys.derive(b"s" * 32, "run-1", 0, 0)
    with pytest.raises(SecureAggregationError, match=r"at least 2 partitions, got 1: a single party's update"):
        secure_agg.mask_update(np.ones(4), keys, {0: keys.public_bytes()}, "run-1", 0)
    with pytest.raises(SecureAggregationError, match=r"at least 2 partitions, got 1.*PRIVREC_TRAIN_PARTITIONS"):
        secure_agg.aggregate({0: np.zeros(4, dtype=np.uint64)}, 1)
    with pytest.raises(SecureAggregationError, match=r"at least 2 partitions, got 1"):
        training(1)  # refused by prepare_training, before anything is reserved or any secret is made
    from privrec_pipeline.privacy.ledger import open_ledger

    lake = str(tmp_path / "lake")
    assert open_ledger(lake).releases() == []
    assert not (tmp_path / "worker" / "partition-secrets").exists()


def test_a_partition_whose_secret_changed_after_publishing_fails_before_masking(training, tmp_path, monkeypatch):
    lake, run = training()
    digest = _sealed(lake)
    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path / "another-worker"))  # a retry elsewhere: a fresh secret
    with pytest.raises(SecureAggregationError,
                       match=r"partition 0's secret on this worker derives another public key for round 0") as error:
        tasks.train_partition(lake, DAY, 0, 0, digest)
    assert "another-worker" in str(error.value)  # says which secret, and what to do
    assert not (run / "round=0" / "masked" / "partition=0.npz").exists()
    with pytest.raises(SecureAggregationError, match=r"keys of this run are sealed"):
        tasks.publish_keys(lake, DAY, 0)  # nor can it publish other keys now


def _bare(masked: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, masked=masked)  # a masked vector without its metadata
    return buffer.getvalue()


def _rewrite(path: Path, **changes) -> None:
    update = MaskedUpdate.load(path, str(path))
    fields = {f: getattr(update, f) for f in ("partition", "round", "run_id", "key_fingerprint", "roster_digest",
                                              "masked")}
    path.write_bytes(MaskedUpdate(**{**fields, **changes}).to_bytes())


@pytest.mark.parametrize("tamper, problem", [
    (lambda p, u: _rewrite(p, masked=u.masked[:-1]), r"size \d+ \(expected \d+\)"),
    (lambda p, u: _rewrite(p, masked=np.r_[u.masked, u.masked]), r"size \d+ \(expected \d+\)"),
    (lambda p, u: _rewrite(p, round=1), r"round 1 \(expected 0\)"),
    (lambda p, u: _rewrite(p, key_fingerprint="0" * 64), r"key_fingerprint '0{64}'"),
    (lambda p, u: _rewrite(p, run_id="run-0"), r"run_id 'run-0' \(expected 'run-1'\)"),
    (lambda p, u: p.write_bytes(p.with_name("partition=0.npz").read_bytes()), r"partition 0 \(expected 1\)"),
    (lambda p, u: p.write_bytes(_bare(u.masked)), r"lacks \['partition'"),
], ids=["shorter", "longer", "round", "key", "run", "another-partition", "no-metadata"])
def test_the_aggregator_rejects_an_update_of_the_wrong_length_round_key_or_partition(training, tamper, problem):
    lake, run = training()
    digest = _sealed(lake)
    for k in range(2):
        tasks.train_partition(lake, DAY, 0, k, digest)
    path = run / "round=0" / "masked" / "partition=1.npz"
    tamper(path, MaskedUpdate.load(path, "partition 1"))
    with pytest.raises(SecureAggregationError, match=problem):
        tasks.aggregate_round(lake, DAY, 0, digest)
    assert not (run / "round=1" / "model.npz").exists()  # nothing unmasked, no next model


def test_a_retry_reuses_the_masked_update_and_never_overwrites_it(training, monkeypatch):
    lake, run = training()
    digest = _sealed(lake)
    returned = tasks.train_partition(lake, DAY, 0, 0, digest)
    path = run / "round=0" / "masked" / "partition=0.npz"
    written, inode = path.read_bytes(), path.stat().st_ino
    # XCom gets public facts only; the exact diagnostics (loss, clipped share, Poisson batch
    # sizes) stay with the worker, beside its secret.
    assert returned == {"partition": 0, "round": 0, "update": "new"}
    [diagnostics] = (secret_path(0).parent / "masked").glob("*.diagnostics.json")
    assert set(json.loads(diagnostics.read_text())) == {"loss", "clipped", "sampled"}
    assert diagnostics.stat().st_mode & 0o077 == 0

    def other_noise(*args, **kwargs):  # a retry whose update is not the same (non-reproducible noise)
        delta, s = partition_update(*args, **kwargs)
        return delta + 0.01, s

    monkeypatch.setattr(tasks, "partition_update", other_noise)
    assert tasks.train_partition(lake, DAY, 0, 0, digest) == {"partition": 0, "round": 0, "update": "reused"}
    assert path.read_bytes() == written and path.stat().st_ino == inode
    # An update written under another roster is refused, not replaced.
    _rewrite(path, roster_digest="f" * 64)
    with pytest.raises(SecureAggregationError, match=r"written once and never replaced"):
        tasks.train_partition(lake, DAY, 0, 0, digest)


def test_a_deleted_update_is_never_recomputed_from_changed_inputs(training):
    """A lake writer reads partition 0's masked update, deletes it and changes the shard: a second
    update under the same masks and noise would give away the difference (one user's clipped
    gradient) without noise. The worker's note outside the lake refuses it. (Distributed mode
    with every user sampled: the update is the noisy gradient itself, so a changed user always
    changes it; a local Adam step can hide a small change in its signs.)"""
    lake, run = training(config=TrainConfig(mode="distributed", epsilon=8.0, delta=1e-6, rounds=2,
                                            batch_size=100, dim=4))
    digest = _sealed(lake)
    tasks.train_partition(lake, DAY, 0, 0, digest)
    path = run / "round=0" / "masked" / "partition=0.npz"
    first = path.read_bytes()
    path.unlink()
    assert tasks.train_partition(lake, DAY, 0, 0, digest)["update"] == "new"  # same inputs: recomputed, as noted
    assert np.array_equal(np.load(path)["masked"], np.load(io.BytesIO(first))["masked"])  # the same update again
    path.unlink()
    shard = lk.path(training_uri(lake, DAY)) / "partition=0" / "part-0.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(1), shard)  # one user's row removed
    with pytest.raises(SecureAggregationError, match=r"recomputing it gives another one"):
        tasks.train_partition(lake, DAY, 0, 0, digest)
    assert not path.exists()  # nothing published


def test_an_update_the_partition_did_not_write_is_not_used(training, tmp_path, monkeypatch):
    lake, run = training()
    digest = _sealed(lake)
    tasks.train_partition(lake, DAY, 0, 0, digest)
    path = run / "round=0" / "masked" / "partition=0.npz"
    planted = path.read_bytes()
    path.unlink()
    for note in (tmp_path / "worker" / "partition-secrets" / "masked").iterdir():
        note.unlink()  # as if partition 0 had never trained this round
    path.write_bytes(planted)  # a well-formed update put there by someone else
    with pytest.raises(SecureAggregationError, match=r"has no note of writing one"):
        tasks.train_partition(lake, DAY, 0, 0, digest)


def test_what_a_partition_writes_is_masked(training, monkeypatch):
    """The lake holds the update plus a one-time pad over Z_2^64: uniform bits, uncorrelated
    with the update, nothing like its fixed-point encoding."""
    lake, run = training()
    digest = _sealed(lake)
    plain = {}

    def capture(*args, **kwargs):
        delta, stats = partition_update(*args, **kwargs)
        plain["delta"] = delta
        return delta, stats

    monkeypatch.setattr(tasks, "partition_update", capture)
    tasks.train_partition(lake, DAY, 0, 0, digest)
    masked = np.load(run / "round=0" / "masked" / "partition=0.npz")["masked"]
    encoded = secure_agg.encode(plain["delta"], 2)
    assert masked.size == encoded.size >= 100 and not np.any(masked == encoded)
    bits = np.unpackbits(masked.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 4 * 0.5 / np.sqrt(bits.size)  # uniform
    top = (masked >> np.uint64(40)).astype(float)  # high bits: where the pad's randomness dominates
    r = np.corrcoef(top, plain["delta"])[0, 1]
    assert abs(r) < 4 / np.sqrt(masked.size)  # uncorrelated with the update
    assert np.abs(secure_agg.decode(masked) - plain["delta"]).max() > 1e6  # decoding alone reveals nothing
