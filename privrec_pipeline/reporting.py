"""Human-readable summaries of a run, built from the manifests (never from raw data)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from privrec_pipeline import lake as lk


def load_manifest(lake: str, step: str, day: dt.date) -> dict | None:
    path = lk.local_path(lk.manifest_uri(lake, step, day))
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def print_run_summary(console: Console, lake: str, day: dt.date, log: Path | None) -> None:
    collect = load_manifest(lake, "collect", day)
    pseudo = load_manifest(lake, "pseudonymize", day)
    if collect is None:
        console.print(f"no collect manifest for {day} in {lake}")
        return
    table = Table(title=f"privrec_nightly {day}", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("landing records", f"{collect['landing_records']:,}")
    table.add_row("bronze records", f"{collect['bronze_records']:,}")
    table.add_row("duplicates dropped", f"{collect['duplicates']:,}")
    table.add_row("quarantined", f"{collect['quarantined_total']:,}")
    for reason, n in sorted(collect["quarantined"].items()):
        if n:
            table.add_row(f"  {reason}", f"{n:,}")
    if pseudo:
        table.add_row("silver records", f"{pseudo['silver_records']:,}")
        table.add_row("pseudonym key version", pseudo["pseudonym_key_version"])
    console.print(table)
    console.print(f"bronze:     {collect['bronze_uri']}")
    console.print(f"quarantine: {collect['quarantine_uri']}")
    if pseudo:
        console.print(f"silver:     {pseudo['silver_uri']}")
    console.print(f"manifests:  {lk.zone_uri(lake, 'manifests')}")
    if log is not None:
        console.print(f"run log:    {log}")
