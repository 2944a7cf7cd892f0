"""Thresholds of the quality gate (DAG Params / ``--set key=value`` of jobs/validate.py).

Every threshold has a default that suits the synthetic source and MovieLens; a deployment
overrides them per DAG run (Params) or per job invocation. ``severity`` overrides the
severity of any expectation by its id (``critical`` gates the run, ``warning`` only reports).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.settings import from_settings

SEVERITIES = ("critical", "warning")
# Raw user and session ids of the built-in sources (synthetic: usr_<12 hex>, ses_<date>_<8 hex>;
# MovieLens: ml_<userId>). A silver string column matching it holds a raw id.
DEFAULT_RAW_ID_PATTERN = r"^(usr_[0-9a-f]{12}|ses_[0-9]{8}_[0-9a-f]{8}|ml_[0-9]+)$"


@dataclass(frozen=True)
class QualityConfig:
    quarantine_rate_max: float = 0.05
    """Largest share of landing records quarantined before the gate fails."""
    row_count_window_days: int = 7
    """Trailing days whose silver row counts set the expected range of today's count."""
    row_count_min_history: int = 3
    """Fewer previous days than this: the wide bounds apply."""
    row_count_factor: float = 3.0
    """Expected range: [median / factor, median x factor] of the trailing days."""
    row_count_wide_factor: float = 20.0
    """The factor while the history is short (1 to min_history - 1 days)."""
    price_min: float = 0.0
    price_max: float = 100_000.0
    quantity_min: int = 1
    quantity_max: int = 1_000
    rating_min: float = 0.0
    rating_max: float = 5.0
    raw_id_pattern: str = DEFAULT_RAW_ID_PATTERN
    pii_exempt_columns: tuple[str, ...] = ()
    """String columns not scanned for PII patterns (e.g. a catalog with long numeric ids)."""
    severity: dict[str, str] = field(default_factory=dict)
    """Severity overrides by expectation id."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.quarantine_rate_max <= 1.0:
            raise ConfigurationError(f"quarantine_rate_max must be in [0, 1], not {self.quarantine_rate_max}")
        if self.row_count_window_days < 1 or self.row_count_min_history < 1:
            raise ConfigurationError("row_count_window_days and row_count_min_history must be >= 1")
        if self.row_count_factor < 1.0 or self.row_count_wide_factor < 1.0:
            raise ConfigurationError("row_count_factor and row_count_wide_factor must be >= 1")
        for lo, hi in (("price_min", "price_max"), ("quantity_min", "quantity_max"), ("rating_min", "rating_max")):
            if getattr(self, lo) > getattr(self, hi):
                raise ConfigurationError(f"{lo} ({getattr(self, lo)}) is greater than {hi} ({getattr(self, hi)})")
        try:
            re.compile(self.raw_id_pattern)
        except re.error as exc:
            raise ConfigurationError(f"raw_id_pattern is not a regular expression: {exc}") from None
        for key, value in self.severity.items():
            if value not in SEVERITIES:
                raise ConfigurationError(f"severity of {key!r} must be one of {SEVERITIES}, not {value!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pii_exempt_columns"] = list(self.pii_exempt_columns)
        return out

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "QualityConfig":
        """From a mapping of setting names to values (unknown names and wrong types are errors)."""
        return from_settings(cls, settings, "quality setting")
