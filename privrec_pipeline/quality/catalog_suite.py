"""The catalog's own Great Expectations suite (``suites.yaml``: ``catalog``), run on the
catalog as a pandas DataFrame before a snapshot is written (``privrec_pipeline.catalog``)."""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


def validate_catalog(table: "pa.Table") -> list[str]:
    """The ids of the suite's failed expectations (empty: the catalog passed)."""
    from privrec_pipeline.catalog import COLUMNS, REQUIRED
    from privrec_pipeline.quality.config import QualityConfig
    from privrec_pipeline.quality.suites import resolve_suite
    from privrec_pipeline.quality.validate import _context, _run_suite

    specs = resolve_suite("catalog", {"catalog_columns": list(COLUMNS), "catalog_required": list(REQUIRED)},
                          QualityConfig())
    with tempfile.TemporaryDirectory(prefix="privrec-catalog-") as tmp:
        outcomes = _run_suite(_context(tmp), "catalog", table.to_pandas(), specs, None)
    return [o.id for o in outcomes if not o.success and o.severity == "critical"]
