"""Load the declared suites (``suites.yaml``) and resolve them for one run.

The YAML is the single declaration of what is checked; this module only substitutes the
run's parameters (interval, thresholds, learned row-count bounds) and expands ``for_each``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

import yaml

from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.quality.config import QualityConfig
from privrec_pipeline.schema import EVENT_TYPES
from privrec_pipeline.transforms.generalize import (
    CARD_PATTERN,
    DEVICE_MARKERS,
    EMAIL_PATTERN,
    IP_FAMILIES,
    IPV4_PATTERN,
    IPV6_PATTERN,
    NFKC_FOLD,
    PHONE_PATTERN,
    PII_PATTERNS,
)
from privrec_pipeline.transforms.pseudonymize import SILVER_COLUMNS

# Spark type of each silver column (the names Great Expectations' Spark engine compares).
SILVER_TYPES: dict[str, str] = {
    "event_id": "StringType", "event_time": "TimestampType", "event_type": "StringType",
    "user_pseudonym": "StringType", "session_pseudonym": "StringType", "item_id": "StringType",
    "category": "StringType", "price": "DoubleType", "quantity": "LongType", "rating": "DoubleType",
    "device_class": "StringType", "ip_family": "StringType", "search_query": "StringType",
    "pseudonym_key_version": "StringType",
}
KEY_COLUMNS = ("event_id", "event_time", "event_type", "user_pseudonym", "item_id", "pseudonym_key_version")
PSEUDONYM_COLUMNS = ("event_id", "user_pseudonym", "session_pseudonym")
# String columns with a closed vocabulary (event_type has its own check, event_type.allowed).
VOCABULARIES: dict[str, tuple[str, ...]] = {
    "device_class": (*[label for label, _ in DEVICE_MARKERS], "unknown"),
    "ip_family": IP_FAMILIES,
}
# The scrubber's patterns (privrec_pipeline/transforms/generalize.py), matched against each
# value with its characters' single-character NFKC forms (generalize.nfkc_fold: what the
# scrubber wrote is NFKC and stays as it is; "＠" or "１２３" in an unscrubbed column become
# ASCII), each with the characters every match of it holds in ASCII text: the email pattern
# a literal '@', the IPv6 pattern ':', the phone, card and IPv4 patterns a decimal digit,
# which in ASCII text is one of 0-9. An ASCII value without them skips that regex; a value
# with any other character is folded and matched against all patterns
# (expectations.prefiltered_match_condition). One regex per
# pattern: Java tries an alternation's lookbehinds at every position, so the patterns as
# one regex cost twice as much (BENCHMARKS.md).
ASCII_DIGITS = "0123456789"
PII_NORMALIZATION = NFKC_FOLD
PII_SCAN: list[dict[str, str]] = [
    {"regex": EMAIL_PATTERN, "required_chars": "@"},
    *({"regex": p, "required_chars": ASCII_DIGITS} for p in (PHONE_PATTERN, CARD_PATTERN, IPV4_PATTERN)),
    {"regex": IPV6_PATTERN, "required_chars": ":"},
]
assert {p["regex"] for p in PII_SCAN} == set(PII_PATTERNS.values()), "PII_SCAN must cover every PII pattern"


@dataclass(frozen=True)
class ExpectationSpec:
    id: str
    type: str
    kwargs: dict[str, Any]
    severity: str
    description: str

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")


@dataclass(frozen=True)
class RowCountBounds:
    min_value: int
    max_value: int | None
    history_days: int
    basis: str  # how the bounds were set, for the report


@cache
def declared_suites() -> dict[str, list[dict[str, Any]]]:
    text = files("privrec_pipeline.quality").joinpath("suites.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def suite_parameters(config: QualityConfig, day: dt.date, bounds: RowCountBounds) -> dict[str, Any]:
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    assert set(SILVER_TYPES) == set(SILVER_COLUMNS), "SILVER_TYPES must cover the silver contract"
    return {
        "silver_columns": list(SILVER_COLUMNS),
        "silver_types": [{"column": c, "type": t} for c, t in SILVER_TYPES.items()],
        "key_columns": list(KEY_COLUMNS),
        "event_types": list(EVENT_TYPES),
        "interval_start": start,
        "interval_end": start + dt.timedelta(days=1),
        "pseudonym_columns": list(PSEUDONYM_COLUMNS),
        "vocabularies": [{"column": c, "values": list(v)} for c, v in VOCABULARIES.items()],
        "scan_columns": [c for c in scan_columns() if c not in config.pii_exempt_columns],
        "pii_patterns": PII_SCAN,
        "pii_normalization": PII_NORMALIZATION,
        "raw_id_pattern": config.raw_id_pattern,
        "row_count_min": bounds.min_value,
        "row_count_max": bounds.max_value,
        "price_min": config.price_min, "price_max": config.price_max,
        "quantity_min": config.quantity_min, "quantity_max": config.quantity_max,
        "rating_min": config.rating_min, "rating_max": config.rating_max,
        "quarantine_rate_max": config.quarantine_rate_max,
    }


def scan_columns() -> list[str]:
    """String columns whose content is not fixed by a vocabulary or the pseudonym format."""
    fixed = {"event_type", *VOCABULARIES, *PSEUDONYM_COLUMNS}
    return [c for c, t in SILVER_TYPES.items() if t == "StringType" and c not in fixed]


def _substitute(value: Any, params: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        name = value[1:]
        if name not in params:
            raise ConfigurationError(f"suite parameter ${name} is not defined")
        return params[name]
    if isinstance(value, dict):
        return {k: _substitute(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, params) for v in value]
    return value


def resolve_suite(name: str, params: dict[str, Any], config: QualityConfig) -> list[ExpectationSpec]:
    """The expectations of suite ``name`` for one run, in declaration order."""
    declared = declared_suites().get(name)
    if declared is None:
        raise ConfigurationError(f"no suite named {name!r} in suites.yaml")
    out: list[ExpectationSpec] = []
    for entry in declared:
        items = _substitute(entry["for_each"], params) if "for_each" in entry else [None]
        for item in items:
            local = dict(params)
            if isinstance(item, str):
                local["column"] = item
            elif isinstance(item, dict):
                local.update(item)
            spec_id = entry["id"].format(**local) if item is not None else entry["id"]
            out.append(ExpectationSpec(
                id=spec_id, type=entry["type"], kwargs=_substitute(entry["kwargs"], local),
                severity=config.severity.get(spec_id, entry["severity"]),
                description=entry["description"],
            ))
    return out


def check_overrides(config: QualityConfig, specs: list[ExpectationSpec]) -> None:
    """Severity overrides must name expectations of the resolved suites (a typo would
    silently leave a check at its declared severity)."""
    unknown = sorted(set(config.severity) - {s.id for s in specs})
    if unknown:
        raise ConfigurationError(f"severity overrides name unknown expectations: {unknown}")
