"""Human-readable summaries of a run, built from the manifests (never from raw data)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from privrec_pipeline import lake as lk


def load_manifest(lake: str, step: str, day: dt.date) -> dict | None:
    return lk.read_json_if_exists(lk.path(lk.manifest_uri(lake, step, day)))


def load_quality_summary(lake: str, day: dt.date) -> dict | None:
    return lk.read_json_if_exists(lk.path(lk.partition_uri(lake, "reports", day)) / "summary.json")


def load_dp_release(lake: str, day: dt.date) -> dict | None:
    return lk.read_json_if_exists(lk.path(lk.partition_uri(lake, "dp_stats", day)) / "release.json")


def load_candidate(lake: str, day: dt.date) -> dict | None:
    return lk.read_json_if_exists(lk.path(lk.partition_uri(lake, "candidates", day)) / "model" / "training.json")


GAIN_LABELS = {"dp_popularity": "DP popularity", "published": "the published model"}


def budget_line(lake: str, day: dt.date) -> str | None:
    """Spent and remaining epsilon of the policy window ending at ``day``, from the ledger."""
    from privrec_pipeline.errors import PrivrecError
    from privrec_pipeline.privacy.ledger import open_ledger

    try:
        spend = open_ledger(lake).spend_at(day)
    except PrivrecError:
        return None
    p = spend.policy
    return (f"epsilon {spend.epsilon:.3g} spent of {p.epsilon:g} ({spend.start}..{spend.end}), "
            f"{spend.remaining:.3g} remaining")


def _popularity_bounds(lake: str, window: list[str]) -> str:
    """The K (items per user) of the window's DP item counts, which DP popularity ranks by."""
    ks = sorted({r["bounds"]["max_items_per_user"] for d in window
                 if (r := load_dp_release(lake, dt.date.fromisoformat(d)))})
    return f" (K {', '.join(map(str, ks))})" if ks else ""


def print_run_summary(console: Console, lake: str, day: dt.date, log: Path | None) -> None:
    collect = load_manifest(lake, "collect", day)
    pseudo = load_manifest(lake, "pseudonymize", day)
    quality = load_quality_summary(lake, day)
    if collect is None:
        console.print(f"no collect manifest for {day} in {lake}")
        return
    table = Table(title=f"privrec_nightly {day}", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("landing records", f"{collect['landing_records']:,}")
    table.add_row("bronze records", f"{collect['bronze_records']:,}")
    table.add_row("duplicates dropped", f"{collect['duplicates']:,}")
    if collect.get("erased"):
        table.add_row("records of erased users", f"{collect['erased']:,}")
    table.add_row("quarantined", f"{collect['quarantined_total']:,}")
    for reason, n in sorted(collect["quarantined"].items()):
        if n:
            table.add_row(f"  {reason}", f"{n:,}")
    if pseudo:
        table.add_row("silver records", f"{pseudo['silver_records']:,}")
        table.add_row("pseudonym key", f"{pseudo['pseudonym_key_version']} (fingerprint "
                      f"{pseudo.get('pseudonym_key_fingerprint') or 'not recorded'})")
    if quality:
        counts = quality["counts"]
        table.add_row("quality gate", f"{quality['gate']} ({counts['passed']}/{counts['evaluated']} expectations)")
        for kind in ("failed_critical", "failed_warning"):
            for spec_id in quality[kind]:
                table.add_row(f"  {'critical' if kind == 'failed_critical' else 'warning'}", spec_id)
    release = load_dp_release(lake, day)
    if release:
        table.add_row("DP release", f"#{release['release_id']} epsilon {release['epsilon']:.3g}, "
                                    f"delta {release['delta']:.2g}")
        keys = (release.get("keys") or {}).get("source", "DP partition selection")
        table.add_row("  items released", f"{release['released']['items']:,} ({keys})")
    candidate = load_candidate(lake, day)
    if candidate:
        plan = candidate["plan"]
        table.add_row("candidate model", f"#{candidate['release_id']} {plan['mode']} DP, epsilon "
                                         f"{plan['epsilon']:.3g}, delta {plan['delta']:.2g}")
        table.add_row("  partitions x rounds", f"{candidate['partitions']} x {candidate['config']['rounds']}")
        table.add_row("  vocabulary / noise multiplier",
                      f"{candidate['vocabulary_size']:,} items / {plan['noise_multiplier']:.3g}")
        audit = candidate.get("audit")
        if audit:
            table.add_row("  training audit", f"{'passed' if audit['passed'] else 'FAILED'}: epsilon >= "
                                              f"{audit['epsilon_lower']:.3g} at confidence {audit['confidence']:g} "
                                              f"({audit['canaries']} canaries)")
        from privrec_pipeline.models.publish import operator_record

        outcome_path = operator_record(lake, day)
        if outcome_path.exists():
            outcome = json.loads(outcome_path.read_text(encoding="utf-8"))
            # The DP evaluation (what the gate decided on and the card shows); the exact
            # numbers of the operator's record beside them (this console is the operator's).
            dp, exact = outcome["evaluation"]["dp"], outcome["evaluation"]["exact"]
            metrics = dp["candidate"]
            table.add_row("  DP Recall@20 / NDCG@10 (hold-out)",
                          f"{metrics['recall@20']:.4f} / {metrics['ndcg@10']:.4f} (evaluation epsilon {dp['epsilon']:.3g})")
            popularity = dp["dp_popularity"]["recall@20"]
            lift = f" (lift {metrics['recall@20'] / popularity - 1:+.1%})" if popularity > 0 else ""
            table.add_row(f"  DP popularity Recall@20{_popularity_bounds(lake, candidate['window'])}",
                          f"{popularity:.4f}{lift}")
            for name, gain in dp.get("gains", {}).items():
                table.add_row(f"  DP gain over {GAIN_LABELS.get(name, name)} (paired)",
                              f"{gain['mean']:+.4f}, lower bound {gain['lower']:+.4f} at confidence "
                              f"{dp['confidence']:g}")
            table.add_row("  exact Recall@20 (model / baseline)",
                          f"{exact['candidate']['recall@20']:.4f} / {exact['dp_popularity']['recall@20']:.4f} "
                          "(operator only)")
            table.add_row("published model", outcome["version"] if outcome["published"]
                          else f"not published because {outcome['reason']}")
    if release or candidate:
        budget = budget_line(lake, day)
        if budget:
            table.add_row("privacy budget", budget)
    console.print(table)
    console.print(f"bronze:     {collect['bronze_uri']}")
    console.print(f"quarantine: {collect['quarantine_uri']}")
    if pseudo:
        console.print(f"silver:     {pseudo['silver_uri']}")
    console.print(f"manifests:  {lk.zone_uri(lake, 'manifests')}")
    if quality:
        console.print(f"quality:    {quality['report']}")
    if release:
        console.print(f"dp stats:   {lk.partition_uri(lake, 'dp_stats', day)}/report.html")
    if candidate:
        console.print(f"candidate:  {lk.partition_uri(lake, 'candidates', day)}/model")
    if log is not None:
        console.print(f"run log:    {log}")


def validated_days(lake: str) -> list[dt.date]:
    """Days with a validation summary, in order."""
    root = lk.path(lk.zone_uri(lake, "reports"))
    days = []
    for path in root.glob("dt=*/summary.json") if root.exists() else []:
        try:
            days.append(dt.date.fromisoformat(path.parent.name[len("dt="):]))
        except ValueError:
            continue
    return sorted(days)
