"""Publish a candidate: evaluate it, and if it passes the gate, write a versioned model with a
model card and move the ``LATEST`` pointer.

    models/<name>/<version>/   model.safetensors, vocabulary.json, training.json,
                               model_card.json, model_card.md
    models/<name>/LATEST       the published version (a one-line text file)
    candidates/dt=D/evaluation.json
                               the operator's record: exact hold-out metrics, user counts and the
                               training shards' hash (private; never in the published folder)

The version is ``<day>-r<ledger release id>``: a rerun of the same run finds it and creates
no second version. The folder is complete before it is renamed into place, and ``LATEST``
moves only after that (write a temporary file, then an atomic rename), so a killed task
leaves either the previous state or the complete new version. On an object store
(``lake.replacing``) the version's files are copied with ``model_card.json`` last and
``LATEST`` is one PUT after that: readers follow ``LATEST`` and never see a partial version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import subprocess
from typing import Any

from privrec_pipeline import lake as lk
from privrec_pipeline.config import PROJECT_ROOT
from privrec_pipeline.errors import PrivrecError
from privrec_pipeline.models.evaluate import (
    Evaluation,
    GateSettings,
    decide,
    dp_popularity_counts,
    evaluate,
)
from privrec_pipeline.models.recommend import LATEST, models_root, resolve_version
from privrec_pipeline.training.artifact import read_model
from privrec_pipeline.training.data import Histories
from privrec_pipeline.training.evaluation import Split

DEFAULT_NAME = "privrec-recommender"
OPERATOR_RECORD = "evaluation.json"
CARD_FILE = "model_card.json"  # a published version's commit file: written last


def _code_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return f"git {out.stdout.strip()}"
    except OSError:
        pass
    from importlib.metadata import version

    return f"privrec {version('privrec')}"


def _fingerprint(folder: "lk.UPath") -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.parquet")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _remap(split: Split, source: list[str], target: list[str]) -> Split:
    """The same users and items in another model's vocabulary (unknown history items are
    dropped; unknown test items stay as misses)."""
    index = {item: i for i, item in enumerate(target)}
    rows, weights = [], []
    for u in range(split.train.users):
        row = split.train.row(u)
        w = split.train.weights[split.train.indptr[u]:split.train.indptr[u + 1]]
        kept = [(index[source[i]], float(x)) for i, x in zip(row, w, strict=True) if source[i] in index]
        rows.append([i for i, _ in kept])
        weights.append([x for _, x in kept])
    import numpy as np

    tests = [np.array([index.get(source[i], -1) for i in t], dtype=np.int64) for t in split.test]
    return Split(Histories.from_lists(rows, weights), tests, len(target))


def evaluate_candidate(lake: str, day: dt.date, name: str = DEFAULT_NAME, gate: GateSettings | None = None, *,
                       run_id: str = "manual", dag_id: str = "manual",
                       force: bool = False) -> tuple[Evaluation, dict[str, Any]]:
    """The candidate's exact evaluation (operator only), its DP evaluation release and the
    gate's decision on the latter."""
    from privrec_pipeline.models.dp_evaluation import release_evaluation
    from privrec_pipeline.privacy.ledger import open_ledger
    from privrec_pipeline.training.partitions import training_uri
    from privrec_pipeline.training.tasks import candidate_folder, load_holdout

    gate = gate or GateSettings()
    candidate = candidate_folder(lake, day) / "model"
    model, items, report = read_model(candidate)
    holdout = lk.path(training_uri(lake, day)) / "holdout"
    if not holdout.exists():
        raise PrivrecError(f"no hold-out for {day} ({holdout}): run build_partitions first")
    everyone = load_holdout(holdout, len(items))
    trained, held_out = load_holdout(holdout, len(items), trained=True), load_holdout(holdout, len(items), trained=False)
    releases = [p for d in report["window"]
                if (p := lk.path(lk.partition_uri(lake, "dp_stats", dt.date.fromisoformat(d))) / "items.parquet")
                .exists()]
    published = None
    try:
        folder = resolve_version(lake, name)
        pub_model, pub_items, _ = read_model(folder)
        published = (pub_model, folder.name, _remap(everyone, items, pub_items))
    except PrivrecError:
        published = None
    exact = evaluate(model, everyone, trained, held_out, dp_popularity_counts(releases, items),
                     published[0] if published else None, published[2] if published else None)
    window = (dt.date.fromisoformat(report["window"][0]), dt.date.fromisoformat(report["window"][-1]))
    population = float(sum(report["population"]["partition_users"])) if report.get("population") else None
    dp = release_evaluation(open_ledger(lake), window, report["release_id"],
                            (exact.candidate, exact.dp_popularity, exact.published),
                            published[1] if published else None, gate, population, run_id=run_id, dag_id=dag_id,
                            force=force, parameters={"training_release": report["release_id"]})
    publish_it, reason = decide(dp, gate)
    return Evaluation(dp.to_dict(), exact.means(), publish_it, reason), report


def publish(lake: str, day: dt.date, name: str = DEFAULT_NAME, gate: GateSettings | None = None, *,
            run_id: str = "manual", dag_id: str = "manual", force: bool = False) -> dict[str, Any]:
    """Evaluate the day's candidate (a DP evaluation release: ``run_id``, ``dag_id`` and
    ``force`` as for every release) and publish it if it passes; the outcome as a dict."""
    from privrec_pipeline.privacy.ledger import open_ledger
    from privrec_pipeline.training.partitions import training_uri
    from privrec_pipeline.training.tasks import candidate_folder

    candidate = candidate_folder(lake, day) / "model"
    report = lk.read_json(candidate / "training.json")
    version = f"{day.isoformat()}-r{report['release_id']}"
    root = models_root(lake) / name
    target = root / version
    if (target / CARD_FILE).exists():
        # Published before; a kill between the version's rename and the pointer's move leaves
        # LATEST behind: the retry finishes the publication (never moving LATEST back past a
        # version published since).
        if _version_order(_latest(root)) < _version_order(version):
            _point_latest(root, version)
        return {"published": True, "version": version, "path": str(target), "reused": True,
                "reason": "this run's model was already published"}
    audit = report.get("audit")
    if audit is not None and not audit["passed"]:
        # A refuted guarantee is never published (nor evaluated: no budget is spent on it).
        refused = {"published": False, "version": None, "audit": audit,
                   "reason": f"the training audit refutes the model's guarantee: epsilon >= {audit['epsilon_lower']:.3g} "
                             f"at confidence {audit['confidence']:g}, claimed {audit['claimed_epsilon']:.3g}"}
        lk.write_json(operator_record(lake, day), refused)
        return refused
    evaluation, _ = evaluate_candidate(lake, day, name, gate, run_id=run_id, dag_id=dag_id, force=force)
    outcome: dict[str, Any] = {"published": evaluation.publish, "version": version if evaluation.publish else None,
                               "reason": evaluation.reason, "evaluation": evaluation.to_dict(),
                               "training_data_sha256": _fingerprint(lk.path(training_uri(lake, day)))}
    # The operator's record (exact hold-out metrics and user counts, the
    # training shards' hash): beside the candidate model, never copied into the published folder.
    lk.write_json(operator_record(lake, day), outcome)
    if not evaluation.publish:
        return outcome
    ledger = open_ledger(lake)
    release = next(r for r in ledger.releases() if r.id == report["release_id"])
    window_end = dt.date.fromisoformat(report["window"][-1])
    spend = ledger.spend_at(window_end)
    manifest = lk.read_json(lk.path(lk.manifest_uri(lake, "build_partitions", day)))
    card = model_card(name, version, report, evaluation, release, spend, manifest)
    # The complete version appears at once (local lake), or with its card last (object store).
    with lk.replacing(target, last=CARD_FILE) as tmp:
        # The model's files only: an operator record left in the folder by an older version stays out.
        lk.copy_folder(candidate, tmp, skip=(OPERATOR_RECORD,))
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True), encoding="utf-8")
        (tmp / "model_card.md").write_text(model_card_markdown(card), encoding="utf-8")
    _point_latest(root, version)  # then the pointer moves
    outcome.update(path=str(target), card=card)
    return outcome


def _latest(root: "lk.UPath") -> str | None:
    pointer = root / LATEST
    return pointer.read_text(encoding="utf-8").strip() if pointer.exists() else None


def _version_order(version: str | None) -> tuple[str, int]:
    """Versions are ``<day>-r<release id>``: ordered by day, then release (None first)."""
    if not version:
        return ("", -1)
    day, _, release = version.rpartition("-r")
    return (day, int(release) if release.isdigit() else -1)


def _point_latest(root: "lk.UPath", version: str) -> None:
    """Move the LATEST pointer to ``version`` in one step (a temp file renamed over it; one PUT on
    an object store)."""
    lk.write_text(root / LATEST, version + "\n")


def trust_model(plan: dict[str, Any], partitions: int) -> dict[str, Any]:
    """Who must be honest for the model's guarantee to hold, in words and numbers."""
    mode = plan["mode"]
    # A plan written before collusion_tolerance existed: distributed mode then split the noise
    # over all P partitions (t = 0); local mode always adds the full noise (t = P - 1).
    tolerance = plan.get("collusion_tolerance", 0 if mode == "distributed" else partitions - 1)
    std = plan.get("noise_std_per_partition",
                   plan["noise_multiplier"] * plan["clip_norm"] / math.sqrt(partitions - tolerance))
    poisoning = ("Secure aggregation hides each partition's update from the aggregator, and so also keeps it from "
                 "being checked: a dishonest partition can poison the sum (its masked update's norm cannot be "
                 "verified). That harms the model's quality, not the other partitions' users' privacy: their DP "
                 "steps hold whatever model a round starts from (adaptive composition).")
    if mode == "local":
        assumption = (f"Each of the {partitions} partitions adds the full noise (std {std:.4g} per coordinate) to its "
                      "own update, so every partition's update is differentially private by itself: the guarantee "
                      "needs no trust in the aggregator or in the other partitions.")
    else:
        assumption = (f"Each of the {partitions} partitions adds a noise share of std {std:.4g} per coordinate, so "
                      f"that any {partitions - tolerance} honest shares together carry the full noise: the guarantee "
                      f"holds if at most t = {tolerance} of the {partitions} partitions collude with the aggregator "
                      "or leave out their noise share. Every partition's share is required: the secure aggregation "
                      "has no dropout recovery, a round with a missing partition fails.")
    return {"mode": mode, "partitions": partitions, "collusion_tolerance": tolerance,
            "noise_std_per_partition": std, "assumption": assumption, "secure_aggregation": poisoning,
            "noise_source": "ChaCha20 keystream keyed by each partition's secret (HKDF-SHA256); each Gaussian "
                            "sample is the sum of 4 Box-Muller draws (floating-point attack mitigation, Holohan & "
                            "Braghin 2021, as Opacus secure_mode)"}


def operator_record(lake: str, day: dt.date) -> "lk.UPath":
    """The day's evaluation with its exact numbers, for operators only (not published)."""
    from privrec_pipeline.training.tasks import candidate_folder

    return candidate_folder(lake, day) / OPERATOR_RECORD


def model_card(name: str, version: str, report: dict[str, Any], evaluation: Evaluation, release: Any, spend: Any,
               manifest: dict[str, Any]) -> dict[str, Any]:
    plan, config, dp = report["plan"], report["config"], evaluation.dp
    return {
        "name": name, "version": version,
        "created_from": {"run_id": report["run_id"], "ledger_release": release.id, "data_window": report["window"]},
        "privacy": {
            "unit": "one user (pseudonym) over the data window",
            "model": {"epsilon": release.epsilon, "delta": release.delta, "mode": plan["mode"],
                      "epsilon_per_partition": plan["epsilon_per_partition"]},
            "window_per_ledger": {"start": spend.start.isoformat(), "end": spend.end.isoformat(),
                                  "epsilon_spent": spend.epsilon, "basic_epsilon": spend.basic_epsilon,
                                  "cap_epsilon": spend.policy.epsilon, "cap_delta": spend.policy.delta,
                                  "releases": len(spend.releases)},
            "accountant": "RDP (dp_accounting RdpAccountant), Poisson-sampled Gaussian; the ledger composes with PLD",
            "clipping_norm": plan["clip_norm"], "noise_multiplier": plan["noise_multiplier"],
            "sampling_rates": plan["sampling_rates"], "steps": plan["steps"],
            # q = batch / n^ with n^ the DP partition counts: the model is post-processing of both
            # releases, so its guarantee is their composition (basic: the sum).
            "population": {**report["population"],
                           "sampling_rates": "min(1, batch / DP count) per partition; the gradient is divided by "
                                             "the expected batch q x DP count, never by an exact count"},
            "epsilon_with_population": release.epsilon + report["population"]["epsilon"],
            "rounds": config["rounds"], "local_steps": config["local_steps"] if plan["mode"] == "local" else 1,
            "partitions": report["partitions"],
            "trust_model": trust_model(plan, report["partitions"]),
            "contribution_bounds": {"max_items_per_user": manifest["params"]["max_items_per_user"],
                                    "per_user_gradient_norm": plan["clip_norm"]},
            "vocabulary": (f"items of the public item catalog released by the window's dp_stats releases "
                           f"({report['vocabulary_size']} items"
                           + (f", the {manifest['params']['max_vocabulary']} with the most noisy users)"
                              if manifest["params"].get("max_vocabulary") else ")")
                           if manifest.get("categories") else
                           "items released by DP partition selection in the window's dp_stats releases "
                           f"({report['vocabulary_size']} items)"),
            # Computed from the canary coordinates only, which no user's data touches: public.
            "audit": report.get("audit"),
            "published_parameters": "item embeddings (in and out), item pooling logits, item biases"
                                    + (f"; category embeddings (in and out) and biases of the catalog's "
                                       f"{report['model']['categories']} categories"
                                       if report.get("model", {}).get("categories") else "")
                                    + "; no user vectors",
        },
        "data": {"window": report["window"], "dp_releases": manifest["releases"]},
        # DP means of the evaluation release (the gate decided on them); the exact metrics are
        # in the operator's record only.
        "metrics": {"protocol": "DESIGN.md: users with >= 5 items, last 20% test, train items excluded",
                    "dp": evaluation_mechanism(dp),
                    "candidate": dp["candidate"], "dp_popularity": dp["dp_popularity"], "gains": dp["gains"],
                    "previously_published": dp["published"], "previous_version": dp["published_version"]},
        "code_version": _code_version(),
    }


def evaluation_mechanism(dp: dict[str, Any]) -> str:
    """One line on the DP evaluation release: its epsilon and every sum's noise scale."""
    chosen = (f", chosen for a DP population of {dp['population']:,.0f} users" if dp.get("population") is not None
              else "")
    scales = "; ".join(f"{s['name']} {s['scale']:.3g}" for s in dp["statistics"])
    return (f"Laplace, epsilon {dp['epsilon']:.3g}{chosen} (ledger release {dp['release_id']}); noise scale of each "
            f"sum over the users: {scales}; gains are paired per user (the candidate's Recall@20 minus the "
            f"threshold's), checked at confidence {dp['confidence']:g}")


def _audit_markdown(audit: dict[str, Any] | None) -> str:
    if audit is None:
        return "This run had no audit canaries (`audit_canaries` 0)."
    return (f"Empirical lower bound on epsilon: **{audit['epsilon_lower']:.3g}** at confidence {audit['confidence']:g} "
            f"against the claimed {audit['claimed_epsilon']:.3g} ({'passed' if audit['passed'] else 'FAILED'}): "
            f"{audit['correct']} of {audit['guesses']} guesses right on {audit['canaries']} canaries; {audit['method']}. "
            "A lower bound below the claim is what a correct run shows; one run's bound is far from tight.")


def model_card_markdown(card: dict[str, Any]) -> str:
    p, m = card["privacy"], card["metrics"]
    t = p["trust_model"]
    rows = [("candidate (this model)", m["candidate"]), ("DP popularity", m["dp_popularity"])]
    if m["previously_published"]:
        rows.append((f"previous ({m['previous_version']})", m["previously_published"]))
    table = "\n".join(f"| {label} | " + " | ".join(f"{v[k]:.4f}" if k in v else "-" for k in ("recall@20", "ndcg@10",
                                                                                           "hr@10")) + " |"
                      for label, v in rows)
    gains = "\n".join(f"| {name.replace('_', ' ')} | {g['weight']:g} | {g['mean']:+.4f} | {g['lower']:+.4f} |"
                      for name, g in m.get("gains", {}).items())
    return f"""# Model card: {card['name']} {card['version']}

Recommender trained with **user-level differential privacy**: ({p['model']['epsilon']:.3g}, {p['model']['delta']:.2g})-DP
for {p['unit']}, {p['model']['mode']} mode over {p['partitions']} partitions of disjoint users, combined by
secure aggregation. Only item-side parameters are published ({p['published_parameters']}).

## Privacy

| | |
|---|---|
| privacy unit | {p['unit']} |
| epsilon, delta of this model | {p['model']['epsilon']:.4g}, {p['model']['delta']:.2g} (the training steps); {p['epsilon_with_population']:.4g} with the DP partition counts the sampling rates come from (epsilon {p['population']['epsilon']:g}, ledger release {p['population']['release_id']}) |
| epsilon per partition | {', '.join(f'{e:.3g}' for e in p['model']['epsilon_per_partition'])} |
| window per the ledger | {p['window_per_ledger']['start']} .. {p['window_per_ledger']['end']}: epsilon {p['window_per_ledger']['epsilon_spent']:.3g} spent of {p['window_per_ledger']['cap_epsilon']:g} ({p['window_per_ledger']['releases']} releases) |
| accountant | {p['accountant']} |
| clipping norm, noise multiplier | {p['clipping_norm']}, {p['noise_multiplier']:.4g} |
| sampling rates, steps | {', '.join(f'{q:.3g}' for q in p['sampling_rates'])} (batch / DP partition count {', '.join(str(n) for n in p['population']['partition_users'])}); {p['steps']} |
| rounds, partitions | {p['rounds']}, {p['partitions']} |
| collusion tolerance t | {t['collusion_tolerance']} of {t['partitions']} partitions; noise std per partition {t['noise_std_per_partition']:.4g} |
| contribution bounds | {p['contribution_bounds']['max_items_per_user']} most recent items per user; gradient norm {p['contribution_bounds']['per_user_gradient_norm']} |
| vocabulary | {p['vocabulary']} |

### Trust model ({t['mode']} mode, P = {t['partitions']}, t = {t['collusion_tolerance']})

{t['assumption']}

{t['secure_aggregation']}

Noise source: {t['noise_source']}.

### Audit

{_audit_markdown(p['audit'])}

## Data

Window {', '.join(card['data']['window'])}; DP releases {card['data']['dp_releases']}.

## Metrics ({m['protocol']})

Differentially private means ({m['dp']}).

| model | Recall@20 | NDCG@10 | HR@10 |
|---|---:|---:|---:|
{table}

The publish decision was made on the gains: per user, this model's Recall@20 minus w times the
other's, averaged; a check passes when its lower bound is above 0.

| compared with | w | gain | lower bound |
|---|---:|---:|---:|
{gains}

Code: {card['code_version']}.
"""
