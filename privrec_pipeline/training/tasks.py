"""The training tasks of the nightly DAG, each one call from a task body.

    prepare_training     plan the noise, reserve the run's release in the ledger, round-0 model
    publish_keys (x P)   each partition publishes its X25519 public keys for every round
    seal_keys            the orchestrator records the roster (key fingerprints) -> its digest (XCom)
    train_partition (x P per round)  the partition's update, masked -> rounds/round=R/masked/
    aggregate_round      sum of the checked masked updates (fails closed) -> the next global model
    finish_training      the candidate model + training.json, commit the release

State lives in ``models/_candidates/dt=D/run/`` (any lake, ``lake.path``): the plan, each round's
global model (``round=R/model.npz``), public keys, the sealed roster and masked updates; the
candidate model goes to ``models/_candidates/dt=D/model/``. Each partition's secret (from
which its key pairs and its noise derive) stays in the partition worker's own folder,
``$PRIVREC_HOME/partition-secrets/`` (see ``partition_secrets``), which the aggregator never
reads: the aggregator sees masked vectors and their sum only.

The lake is not trusted to say who takes part: seal_keys returns the roster's digest, which
the DAG passes to train_partition and aggregate_round through XCom (the Airflow database);
they refuse a roster file or a key file that no longer matches it, a partition whose secret
no longer derives its sealed key, and masked updates of another partition, round, run, key
or length (see ``secure_agg``). Every task can be retried: keys derive from the secret, and
a masked update already written is reused, never written again.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import socket
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from privrec_pipeline import lake as lk
from privrec_pipeline.errors import PrivrecError
from privrec_pipeline.training.canaries import Canaries
from privrec_pipeline.training.data import Histories
from privrec_pipeline.training.federated import (
    PrivacyPlan,
    ServerState,
    TrainConfig,
    apply_round,
    canary_audit,
    flatten,
    new_model,
    partition_update,
    plan_privacy,
)
from privrec_pipeline.training.partitions import training_uri

if TYPE_CHECKING:
    from pathlib import Path

    import torch

log = logging.getLogger(__name__)

RELEASE_KEY = "training"
RUN_DIR = "run"


def training_folder(lake: str, day: dt.date) -> "lk.UPath":
    """build_partitions' output for day D: the partitions' shards, the hold-out, the vocabulary."""
    return lk.path(training_uri(lake, day))


def candidate_folder(lake: str, day: dt.date) -> "lk.UPath":
    """Training state and the candidate model of day D (outside build_partitions' folder, which
    a rerun replaces): ``models/_candidates/dt=D/{run,model}``."""
    return lk.path(lk.partition_uri(lake, "candidates", day))


def run_folder(lake: str, day: dt.date) -> "lk.UPath":
    return candidate_folder(lake, day) / RUN_DIR


def load_shard(folder: "lk.UPath") -> Histories:
    """A partition's rows (user_pseudonym, item_index, weight, position) as histories in time order."""
    table = lk.dataset(folder, format="parquet").to_table(
        columns=["user_pseudonym", "item_index", "weight", "position"])
    if table.num_rows == 0:
        return Histories(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
    frame = table.to_pandas().sort_values(["user_pseudonym", "position"], kind="stable")
    users = frame["user_pseudonym"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    indptr = np.r_[starts, len(users)].astype(np.int64)
    return Histories(indptr, frame["item_index"].to_numpy(np.int64), frame["weight"].to_numpy(np.float32))


def item_category(lake: str, day: dt.date, size: int) -> np.ndarray | None:
    """The vocabulary's public item -> category map (None: build_partitions had no catalog)."""
    from privrec_pipeline.training.data import read_vocabulary

    folder = training_folder(lake, day) / "vocabulary"
    if not folder.exists():
        return None  # finish_training, which writes the vocabulary into the model, names the problem
    try:
        return read_vocabulary(folder, size).item_category
    except ValueError as error:
        raise PrivrecError(f"{error}: run build_partitions again") from None


def _content_prior(lake: str, day: dt.date, config: TrainConfig, size: int) -> "torch.Tensor":
    """The public initial item vectors of the window's vocabulary: the catalog's text encoded
    (``content_prior.item_init``). The catalog in force on the window's last day names the items."""
    from privrec_pipeline.catalog import read_items, snapshot_for
    from privrec_pipeline.training.content_prior import item_init, item_texts
    from privrec_pipeline.training.data import read_vocabulary
    from privrec_pipeline.training.model import ModelConfig

    snapshot = snapshot_for(lake, day)
    if snapshot is None:
        raise PrivrecError(f"content_prior needs the item catalog's text, and the lake has no catalog for {day}: "
                           "load one with privrec catalog load, or train without content_prior")
    items = read_vocabulary(training_folder(lake, day) / "vocabulary", size).items
    return item_init(item_texts(read_items(snapshot), items), config.dim, ModelConfig.init_scale)


def _manifest(lake: str, day: dt.date) -> dict[str, Any]:
    uri = lk.manifest_uri(lake, "build_partitions", day)
    doc = lk.read_json_if_exists(lk.path(uri))
    if doc is None:
        raise PrivrecError(f"no build_partitions manifest for {day} ({uri}): run build_partitions first")
    return doc


def _require_private(config: TrainConfig) -> None:
    if config.mode == "nonprivate":
        raise PrivrecError("a non-private model is never released by the pipeline (use `privrec train --no-ledger` "
                           "on synthetic data for baselines)")


def training_components(config: TrainConfig, plan: PrivacyPlan) -> list:
    """The ledger's description of a training run: ``plan.steps`` Poisson-sampled Gaussian
    steps at the largest sampling rate (the worst partition's guarantee)."""
    from privrec_pipeline.privacy.accounting import Component

    _require_private(config)
    return [Component("gaussian", count=plan.steps, noise_multiplier=plan.noise_multiplier,
                      sampling_rate=max(plan.sampling_rates), label=f"{config.mode} DP training")]


def prepare_training(lake: str, day: dt.date, config: TrainConfig, *, run_id: str, dag_id: str,
                     force: bool = False) -> dict[str, Any]:
    """Plan the noise from the partitions' sizes and reserve the release before any training.

    The run state's ``run_id`` (which keys, masks and noise derive from) is the id of the run
    that reserved the release, whichever run continues it: a run taking over a dead run's
    reservation (same description, else ``ReleaseMismatch``) reuses its round models and
    masked updates and regenerates exactly the same noise, never fresh noise under the same
    charge."""
    from privrec_pipeline.privacy.ledger import open_ledger
    from privrec_pipeline.training.population import release_population
    from privrec_pipeline.training.secure_agg import require_parties

    manifest = _manifest(lake, day)
    sizes = [manifest["partitions"][str(k)]["users"] for k in range(len(manifest["partitions"]))]
    require_parties(len(sizes))  # before anything is reserved: one party's "masked" update is in the clear
    _require_private(config)
    window = manifest["window"]
    span = (dt.date.fromisoformat(window[0]), dt.date.fromisoformat(window[-1]))
    ledger = open_ledger(lake)
    fingerprint = manifest.get("pseudonym_key_fingerprint")
    # The sampling rates come from DP counts of the partitions (their own release), never from
    # the exact sizes, which q, sigma and the card would otherwise publish.
    population = release_population(ledger, span, sizes, config.population_epsilon, run_id=run_id, dag_id=dag_id,
                                    force=force, parameters={"pseudonym_key_fingerprint": fingerprint})
    plan = plan_privacy(config, population.partition_users)
    components = training_components(config, plan)
    reservation = ledger.reserve(
        RELEASE_KEY, span[0], span[1], components,
        epsilon=plan.epsilon, delta=plan.delta, dag_id=dag_id, run_id=run_id, force=force,
        parameters={"config": asdict(config), "plan": plan.to_dict(), "partition_users": sizes,
                    "population_release": population.release_id,
                    "vocabulary_size": manifest["vocabulary_size"],
                    # The model's shape: a resume over another set of categories is another release.
                    "categories": manifest.get("categories", 0) if config.category_features else 0,
                    "pseudonym_key_fingerprint": fingerprint})
    release = reservation.release
    canaries = Canaries.new(config.audit_canaries)
    state = {"release_id": release.id, "status": reservation.status, "plan": plan.to_dict(),
             "planned_on": socket.gethostname(),
             "canaries": canaries.to_doc() if canaries else None,
             "config": asdict(config), "partitions": len(sizes), "population": population.to_dict(),
             "vocabulary_size": manifest["vocabulary_size"], "window": window, "run_id": release.run_id}
    run = run_folder(lake, day)
    if reservation.status == "reuse":
        if not finished(lake, day):
            raise PrivrecError(
                f"training release {release.id} of {window[0]}..{window[-1]} is committed, but its model "
                f"is not in {candidate_folder(lake, day)}: its noise cannot be drawn again for free; restore the "
                "folder, or rerun with force_release to train (and pay for) a new model")
        return state  # the window's model is already trained and committed: nothing to do
    existing = lk.read_json_if_exists(run / "plan.json")
    if existing is not None and existing.get("release_id") == release.id:
        return {**existing, "status": reservation.status}  # a resume continues the state it finds
    lk.remove(run)  # state of an earlier release of this day (a forced rerun starts over)
    lk.write_json(run / "plan.json", state)
    initial = run / "round=0" / "model.npz"
    if not initial.exists():
        size = manifest["vocabulary_size"]
        model = new_model(config, size, item_category(lake, day, size),
                          _content_prior(lake, day, config, size) if config.content_prior else None)
        lk.save_npz(initial, params=np.concatenate([flatten(model), np.zeros(canaries.count if canaries else 0)]))
    return state


def finished(lake: str, day: dt.date) -> bool:
    """The run's release already has its candidate model (a rerun has nothing to do)."""
    plan = lk.read_json_if_exists(run_folder(lake, day) / "plan.json")
    report = lk.read_json_if_exists(candidate_folder(lake, day) / "model" / "training.json")
    return plan is not None and report is not None and report.get("release_id") == plan["release_id"]


def _plan(lake: str, day: dt.date) -> tuple[dict[str, Any], TrainConfig, PrivacyPlan]:
    doc = lk.read_json(run_folder(lake, day) / "plan.json")
    return doc, TrainConfig(**doc["config"]), PrivacyPlan(**doc["plan"])


def check_dag_shape(lake: str, day: dt.date, partitions: int, rounds: int, *, prepared: bool = True) -> None:
    """The DAG this host parsed (``partitions`` x ``rounds``, from its ``PRIVREC_TRAIN_PARTITIONS`` /
    ``PRIVREC_TRAIN_ROUNDS``) must have the shape of the day's training: build_partitions' manifest
    and, once prepared, the run's plan. The scheduler creates the tasks of its own parse and each
    worker runs them from its own, so hosts that disagree would train, seal or aggregate another
    number of partitions or rounds than the plan: every training task checks first and fails
    closed, naming both shapes and the settings. ``prepared`` false (prepare_training itself):
    the manifest only (a plan left by an earlier release is replaced)."""
    manifest = _manifest(lake, day)
    planned = {"partitions": len(manifest["partitions"]), "rounds": rounds, "where": "build_partitions' manifest"}
    doc = lk.read_json_if_exists(run_folder(lake, day) / "plan.json")
    if prepared and doc is not None and not finished(lake, day):
        planned = {"partitions": doc["partitions"], "rounds": doc["config"]["rounds"],
                   "where": f"the run's training plan (made on {doc.get('planned_on', 'an unknown host')})"}
    if (planned["partitions"], planned["rounds"]) != (partitions, rounds):
        raise PrivrecError(
            f"this host ({socket.gethostname()}) parsed the DAG with {partitions} training partition(s) x {rounds} "
            f"round(s) (PRIVREC_TRAIN_PARTITIONS={partitions}, PRIVREC_TRAIN_ROUNDS={rounds}), but {planned['where']} "
            f"has {planned['partitions']} x {planned['rounds']}: the DAG's shape must be the same on every host "
            "(scheduler, DAG processor and every worker). Set both variables to the same values everywhere, then "
            "rerun the day; nothing was trained by this task")


def _keys_file(lake: str, day: dt.date, partition: int) -> "lk.UPath":
    return run_folder(lake, day) / "keys" / f"partition={partition}.json"


def _roster_file(lake: str, day: dt.date) -> "lk.UPath":
    return run_folder(lake, day) / "roster.json"


def _masked_file(lake: str, day: dt.date, round_index: int, partition: int) -> "lk.UPath":
    return run_folder(lake, day) / f"round={round_index}" / "masked" / f"partition={partition}.npz"


def publish_keys(lake: str, day: dt.date, partition: int) -> dict[str, Any]:
    """Derive the partition's public key of every round from its secret and publish them. Returns
    their fingerprints (public; the DAG hands them to seal_keys outside the lake)."""
    from privrec_pipeline.training.partition_secrets import load_or_create
    from privrec_pipeline.training.secure_agg import (
        RoundKeys,
        SecureAggregationError,
        fingerprint,
        require_parties,
    )

    if finished(lake, day):
        return {}
    doc, config, _ = _plan(lake, day)
    require_parties(doc["partitions"])
    secret = load_or_create(partition)
    public = [RoundKeys.derive(secret, doc["run_id"], r, partition).public_bytes() for r in range(config.rounds)]
    document = {"partition": partition, "run_id": doc["run_id"], "public": [p.hex() for p in public]}
    path = _keys_file(lake, day, partition)
    if _roster_file(lake, day).exists():  # sealed: the published keys may no longer change
        if not path.exists() or json.loads(path.read_text(encoding="utf-8")) != document:
            raise SecureAggregationError(
                f"the keys of this run are sealed ({_roster_file(lake, day)}) and partition {partition}'s secret on "
                f"this worker derives other keys than {path} holds: run partition {partition}'s tasks on the worker "
                "holding its secret, or train again in a new run")
    else:
        lk.write_json(path, document)
    return {"partition": partition, "fingerprints": [fingerprint(p) for p in public]}


def seal_keys(lake: str, day: dt.date, published: list[dict[str, Any]] | None = None) -> str:
    """The orchestrator's step after every publish_keys: record the roster (each partition's
    key fingerprints per round) in ``run/roster.json``, once, and return its digest (the DAG
    passes it to every partition and aggregation task through XCom, outside the lake).
    ``published``: the publish_keys results; the key files must still hold those keys."""
    from privrec_pipeline.training.secure_agg import (
        Roster,
        SecureAggregationError,
        fingerprint,
        require_parties,
    )

    path = _roster_file(lake, day)
    if finished(lake, day):
        return Roster.digest_of(path.read_bytes()) if path.exists() else ""
    doc, config, _ = _plan(lake, day)
    partitions = doc["partitions"]
    require_parties(partitions)
    keys = {}
    for k in range(partitions):
        source = _keys_file(lake, day, k)
        if not source.exists():
            raise SecureAggregationError(f"partition {k} has not published its keys ({source}): run publish_keys")
        published_doc = json.loads(source.read_text(encoding="utf-8"))
        if (published_doc.get("partition"), published_doc.get("run_id"), len(published_doc.get("public", []))) != (
                k, doc["run_id"], config.rounds):
            raise SecureAggregationError(
                f"{source} is not partition {k}'s keys of run {doc['run_id']!r} for {config.rounds} rounds: "
                "run publish_keys of this run again")
        keys[k] = [bytes.fromhex(h) for h in published_doc["public"]]
    if published is not None:
        announced = {int(p["partition"]): p["fingerprints"] for p in published if p}
        for k in range(partitions):
            if announced.get(k) != [fingerprint(p) for p in keys[k]]:
                raise SecureAggregationError(
                    f"the keys in {_keys_file(lake, day, k)} are not the ones partition {k}'s publish_keys task "
                    "published: the file was replaced in the lake; nothing is sealed. Find out who wrote it, "
                    f"then run partition {k}'s publish_keys again")
    data = Roster.seal(doc["run_id"], keys).to_bytes()
    if not lk.write_once(path, data) and path.read_bytes() != data:
        raise SecureAggregationError(
            f"this run's roster is already sealed ({path}) with other keys than the published ones: keys changed "
            "after sealing. The run fails closed; train again in a new run")
    return Roster.digest_of(data)


def _sealed_roster(lake: str, day: dt.date, doc: dict[str, Any], config: TrainConfig, digest: str):
    """run/roster.json, checked against the digest seal_keys returned, and against the plan."""
    from privrec_pipeline.training.secure_agg import Roster, SecureAggregationError

    path = _roster_file(lake, day)
    if not path.exists():
        raise SecureAggregationError(f"no sealed roster at {path}: run seal_keys after every publish_keys")
    roster = Roster.verified(path.read_bytes(), digest, str(path))
    if (roster.run_id, roster.partitions, roster.rounds) != (doc["run_id"], doc["partitions"], config.rounds):
        raise SecureAggregationError(
            f"the sealed roster is for run {roster.run_id!r} ({roster.partitions} partitions, {roster.rounds} rounds), "
            f"the plan for run {doc['run_id']!r} ({doc['partitions']} partitions, {config.rounds} rounds): "
            "train again in a new run")
    return roster


def _public_keys(lake: str, day: dt.date, roster, round_index: int) -> dict[int, bytes]:
    """Every partition's public key of the round, each checked against the sealed roster."""
    from privrec_pipeline.training.secure_agg import SecureAggregationError

    keys = {}
    for k in range(roster.partitions):
        path = _keys_file(lake, day, k)
        if not path.exists():
            raise SecureAggregationError(f"partition {k}'s published keys are missing ({path})")
        keys[k] = bytes.fromhex(json.loads(path.read_text(encoding="utf-8"))["public"][round_index])
        roster.check_public(k, round_index, keys[k], str(path))
    return keys


def _existing_update(path: "lk.UPath", roster, roster_digest: str, partition: int, round_index: int, size: int):
    """An already written masked update of (round, partition): reused if it is this roster's
    (a retry), refused otherwise. Never replaced: two vectors under the same masks would
    give the aggregator the difference of two updates."""
    from privrec_pipeline.training.secure_agg import MaskedUpdate, SecureAggregationError

    update = MaskedUpdate.load(io.BytesIO(path.read_bytes()), str(path))
    try:
        update.check(roster, roster_digest, partition, round_index, size, str(path))
    except SecureAggregationError as error:
        raise SecureAggregationError(
            f"{error}. A masked update is written once and never replaced (two vectors under the same masks "
            "would reveal the difference of two updates): train again in a new run") from None
    return update


def _worker_record(run_id: str, round_index: int, partition: int) -> "Path":
    """Where this partition's worker notes the digest of each masked update it wrote: beside its
    secret, outside the lake (a lake writer can delete the lake's copy, not this note). The
    round's exact diagnostics go beside it (``.diagnostics.json``): as private as the secret."""
    import hashlib

    from privrec_pipeline.training.partition_secrets import secret_path

    run = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:16]
    return secret_path(partition).parent / "masked" / f"run-{run}-round={round_index}-partition={partition}.sha256"


def train_partition(lake: str, day: dt.date, round_index: int, partition: int, roster_digest: str) -> dict[str, Any]:
    """The partition's DP update of the round, masked with its sealed keys, written once to
    ``round=R/masked/partition=K.npz`` with its metadata. ``roster_digest``: seal_keys' result.

    Returns (to XCom, the Airflow database) only public facts: the partition, the round and
    whether the update was new or reused. The round's exact diagnostics (mean loss, clipped
    share, Poisson batch sizes, whose secrecy the sampling analysis assumes) stay with the
    worker, beside its secret (``_worker_diagnostics``).

    Under one set of masks a partition publishes one update, ever. Its worker notes the
    update's digest outside the lake before publishing it; a retry (or a run taking the
    release over) reuses the lake's copy only if it matches the note, republishes a lost copy
    only if recomputing gives the noted update, and refuses otherwise: if a lake writer
    deleted the update and changed the shard or the round model, a second update under the
    same masks and noise would give away the difference of the two, without noise."""
    from privrec_pipeline.durable_files import write_once
    from privrec_pipeline.training.partition_secrets import load_or_create, secret_path
    from privrec_pipeline.training.secure_agg import (
        MaskedUpdate,
        RoundKeys,
        SecureAggregationError,
        mask_update,
    )

    done = {"partition": partition, "round": round_index}
    if finished(lake, day):
        return {**done, "update": "finished"}
    doc, config, plan = _plan(lake, day)
    roster = _sealed_roster(lake, day, doc, config, roster_digest)
    public = _public_keys(lake, day, roster, round_index)
    state = lk.load_npz(run_folder(lake, day) / f"round={round_index}" / "model.npz")["params"]
    target = _masked_file(lake, day, round_index, partition)
    record = _worker_record(doc["run_id"], round_index, partition)
    noted = record.read_text(encoding="ascii").strip() if record.exists() else None
    if target.exists():  # a retry after the update was written: reuse it, if it is the one this worker wrote
        existing = _existing_update(target, roster, roster_digest, partition, round_index, state.size)
        if noted != existing.digest():
            raise SecureAggregationError(
                f"{target} is not the masked update partition {partition}'s worker wrote "
                f"({'it has no note of writing one' if noted is None else 'its note says otherwise'}; {record}): "
                "it was put or replaced in the lake by someone else. Nothing is masked again and it is not used; "
                "find out who writes the lake, then train again in a new run")
        return {**done, "update": "reused"}
    secret = load_or_create(partition)
    keys = RoundKeys.derive(secret, doc["run_id"], round_index, partition)
    roster.check_own(keys, round_index, hint=(
        f"Run partition {partition}'s tasks on the worker holding its secret ({secret_path(partition)}); if that "
        "secret is lost, this run cannot finish: train again in a new run (force_release)"))
    shard = load_shard(training_folder(lake, day) / f"partition={partition}")
    delta, stats = partition_update(config, plan, state, doc["vocabulary_size"], shard, round_index=round_index,
                                    partition=partition, partitions=doc["partitions"],
                                    secret=secret, run_id=doc["run_id"], canaries=Canaries.from_doc(doc.get("canaries")),
                                    item_category=item_category(lake, day, doc["vocabulary_size"]))
    masked = mask_update(delta, keys, public, doc["run_id"], round_index)
    update = MaskedUpdate(partition, round_index, doc["run_id"], roster.sealed(partition, round_index), roster_digest,
                          masked)
    if noted is not None and noted != update.digest():
        raise SecureAggregationError(
            f"partition {partition} already published a masked update for round {round_index} of run "
            f"{doc['run_id']} ({record}), which is gone from the lake, and recomputing it gives another one: its "
            "shard or the round's model changed. Publishing a second update under the same masks and noise would "
            "reveal the difference of the two without noise; refused. Train again in a new run")
    record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_once(record, update.digest().encode("ascii"), mode=0o600)  # noted before it is published
    if not lk.write_once(target, update.to_bytes()):  # another attempt wrote it first: keep that one
        if _existing_update(target, roster, roster_digest, partition, round_index, state.size).digest() != \
                update.digest():
            raise SecureAggregationError(f"{target} appeared in the lake while partition {partition} was "
                                         "training and is not its update: refused; train again in a new run")
        return {**done, "update": "reused"}
    diagnostics = _worker_record(doc["run_id"], round_index, partition).with_suffix(".diagnostics.json")
    diagnostics.write_text(json.dumps(stats, sort_keys=True), encoding="utf-8")
    diagnostics.chmod(0o600)
    return {**done, "update": "new"}


def aggregate_round(lake: str, day: dt.date, round_index: int, roster_digest: str) -> None:
    """Sum the masked updates (all partitions or nothing, each checked against the sealed
    roster and the model's size) and step the global model."""
    from privrec_pipeline.training.secure_agg import MaskedUpdate, aggregate

    if finished(lake, day):
        return
    doc, config, _ = _plan(lake, day)
    roster = _sealed_roster(lake, day, doc, config, roster_digest)
    run = run_folder(lake, day)
    server = lk.load_npz(run / f"round={round_index}" / "model.npz")
    masked = {}
    for k in range(doc["partitions"]):
        path = _masked_file(lake, day, round_index, k)
        if path.exists():
            update = MaskedUpdate.load(io.BytesIO(path.read_bytes()), str(path))
            update.check(roster, roster_digest, k, round_index, server["params"].size, str(path))
            masked[k] = update.masked
    total = aggregate(masked, doc["partitions"])
    state = ServerState(server["params"], round_index, server["m"] if "m" in server else None,
                        server["v"] if "v" in server else None)
    state = apply_round(config, state, total, doc["partitions"])
    extra = {"m": state.m, "v": state.v} if state.m is not None else {}
    lk.save_npz(run / f"round={round_index + 1}" / "model.npz", params=state.params, **extra)


def finish_training(lake: str, day: dt.date, *, run_id: str) -> dict[str, Any]:
    """Write the candidate model (safetensors) and training.json and commit the ledger release,
    as one step fenced by the release's lease (``run_id`` must hold it): the model is written
    under the ledger lock, so a run whose reservation was taken over never writes one. Killed
    after the model was written and before the commit, the retry commits it as it is."""
    from privrec_pipeline.privacy.ledger import COMMITTED, open_ledger
    from privrec_pipeline.training.artifact import write_model

    doc, config, plan = _plan(lake, day)
    candidate = candidate_folder(lake, day) / "model"
    ledger = open_ledger(lake)
    state = next((r.state for r in ledger.releases() if r.id == doc["release_id"]), None)
    written = finished(lake, day)
    if written and state == COMMITTED:
        return {"candidate": str(candidate), "epsilon": plan.epsilon, "delta": plan.delta, "reused": True}

    def write() -> None:
        if written:
            return  # an earlier attempt wrote this release's model and died before committing
        final = lk.load_npz(run_folder(lake, day) / f"round={config.rounds}" / "model.npz")["params"]
        params, audit = canary_audit(config, plan, Canaries.from_doc(doc.get("canaries")), final)
        report = {"release_id": doc["release_id"], "run_id": doc["run_id"], "window": doc["window"],
                  "plan": doc["plan"], "config": doc["config"], "partitions": doc["partitions"],
                  "population": doc["population"], "vocabulary_size": doc["vocabulary_size"],
                  "audit": audit.to_dict() if audit else None}
        write_model(candidate, config, doc["vocabulary_size"], params, training_folder(lake, day) / "vocabulary", report)

    ledger.commit(doc["release_id"], {"uri": str(candidate)}, run_id=run_id, publish=write)
    audit = lk.read_json(candidate / "training.json").get("audit")
    if audit is not None:
        log.info("training audit: %s; empirical epsilon >= %.3g at confidence %g, claimed %.3g (%s)",
                 "passed" if audit["passed"] else "FAILED", audit["epsilon_lower"], audit["confidence"],
                 audit["claimed_epsilon"], audit["method"])
    # The audit's numbers come from the canary coordinates only, which no user's data touches.
    return {"candidate": str(candidate), "epsilon": plan.epsilon, "delta": plan.delta,
            "audit": None if audit is None else {k: audit[k] for k in ("passed", "epsilon_lower", "confidence")}}


def closes_training_window(day: dt.date, window_days: int) -> bool:
    """Training windows are tumbling blocks of ``window_days`` days (counted from 0001-01-01),
    trained once, on the run of their last day: a user's day of data is in one training
    release, not in ``window_days`` overlapping ones (which would multiply its privacy cost)."""
    return (day.toordinal() + 1) % window_days == 0


def train_config(settings: dict[str, Any], rounds: int) -> TrainConfig:
    """The TrainConfig of a DAG run: its Params' settings, the deployment's number of rounds."""
    from privrec_pipeline.settings import from_settings

    values = {k: v for k, v in settings.items() if v is not None}
    if "rounds" in values and values["rounds"] != rounds:
        raise PrivrecError(f"rounds is set by the deployment (PRIVREC_TRAIN_ROUNDS={rounds}), not per run")
    return from_settings(TrainConfig, {**values, "rounds": rounds}, "training setting")


def load_holdout(folder: "lk.UPath", vocab_size: int, *, trained: bool | None = None):
    """The hold-out as an evaluation ``Split``: each user's history rows in time order and
    their test items (``trained`` selects training users or held-out users; None: both)."""
    from privrec_pipeline.training.evaluation import Split

    frame = lk.dataset(lk.path(folder), format="parquet").to_table().to_pandas()
    if trained is not None:
        frame = frame[frame["trained"] == trained]
    frame = frame.sort_values(["user_pseudonym", "position"], kind="stable")
    rows, weights, tests = [], [], []
    for _, user in frame.groupby("user_pseudonym", sort=True):
        history = user[user["role"] == "history"]
        rows.append(history["item_index"].tolist())
        weights.append(history["weight"].astype(float).tolist())
        tests.append(user.loc[user["role"] == "test", "item_index"].to_numpy(np.int64))
    return Split(Histories.from_lists(rows, weights), tests, vocab_size)
