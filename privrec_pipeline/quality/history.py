"""Row-count bounds learned from the trailing days' quality summaries.

The trailing window is counted in data intervals before the run's day (never from the wall
clock), and only days whose gate passed count: a day that failed for a spike must not
widen tomorrow's bounds.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections.abc import Callable

from privrec_pipeline.quality.config import QualityConfig
from privrec_pipeline.quality.suites import RowCountBounds


def trailing_row_counts(day: dt.date, window_days: int,
                        load_summary: Callable[[dt.date], dict | None]) -> list[int]:
    """Silver row counts of the passed days among the ``window_days`` days before ``day``."""
    counts = []
    for back in range(1, window_days + 1):
        summary = load_summary(day - dt.timedelta(days=back))
        if summary and summary.get("gate") == "passed" and summary.get("rows") is not None:
            counts.append(int(summary["rows"]))
    return counts


def row_count_bounds(history: list[int], config: QualityConfig, *, allow_empty: bool = False) -> RowCountBounds:
    """[median / factor, median x factor] of the history; a wider factor while the history
    is short; with no history only "at least one row" (none with ``allow_empty``)."""
    floor = 0 if allow_empty else 1
    if not history:
        return RowCountBounds(floor, None, 0, "no previous day: at least one row" if floor else "no previous day")
    median = statistics.median(history)
    short = len(history) < config.row_count_min_history
    factor = config.row_count_wide_factor if short else config.row_count_factor
    low = 0 if allow_empty else max(1, math.floor(median / factor))
    high = math.ceil(median * factor)
    basis = (f"median {median:,.0f} of {len(history)} previous day(s), divided and multiplied by "
             f"{factor:g}{' (short history: wide bounds)' if short else ''}")
    return RowCountBounds(low, high, len(history), basis)
