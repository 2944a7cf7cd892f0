"""Per-run manifests: the record accounting of each step, written next to the data.

The collect manifest must balance: every landing record is in bronze, in quarantine, or
counted as a duplicate. A step that cannot balance fails instead of writing a manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from privrec_pipeline.errors import ManifestMismatchError


@dataclass
class CollectManifest:
    date: str
    interval_start: str
    interval_end: str
    run_id: str
    landing_uri: str
    landing_files: list[dict[str, Any]]
    landing_records: int
    bronze_records: int
    quarantined: dict[str, int]
    duplicates: int
    encryption_key_version: str
    bronze_uri: str
    quarantine_uri: str
    allow_empty: bool = False
    step: str = "collect"

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def check_balance(self) -> None:
        """landing = bronze + quarantined + duplicates, or raise (records would be lost)."""
        accounted = self.bronze_records + self.quarantined_total + self.duplicates
        if accounted != self.landing_records:
            raise ManifestMismatchError(
                f"collect {self.date}: {self.landing_records} landing records but bronze "
                f"{self.bronze_records} + quarantined {self.quarantined_total} + duplicates "
                f"{self.duplicates} = {accounted}; refusing to commit the run"
            )

    def to_json(self) -> str:
        doc = asdict(self)
        doc["quarantined_total"] = self.quarantined_total
        doc["balanced"] = True
        return json.dumps(doc, indent=2, sort_keys=True)


@dataclass
class PseudonymizeManifest:
    date: str
    run_id: str
    bronze_records: int
    silver_records: int
    pseudonym_key_version: str
    silver_uri: str
    columns: list[str] = field(default_factory=list)
    step: str = "pseudonymize"

    def check_balance(self) -> None:
        if self.bronze_records != self.silver_records:
            raise ManifestMismatchError(
                f"pseudonymize {self.date}: bronze has {self.bronze_records} records, silver "
                f"{self.silver_records}; refusing to commit the run"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)
