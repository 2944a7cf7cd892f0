"""The quality trend page: one HTML file with charts over a range of days.

Built only from the per-day ``summary.json`` files (counts, rates, expectation outcomes),
never from data, so it can hold no identifier or raw value. Charts are matplotlib SVGs
inlined in the page: it opens offline, from a file, in any browser.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from privrec_pipeline.charts import PALETTE, pyplot, to_svg
from privrec_pipeline.schema import QUARANTINE_REASONS


@dataclass(frozen=True)
class TrendPage:
    html: str
    days: list[str]
    missing: list[str]  # days in the range without a summary


def _chart(days: list[str], series: dict[str, list[float]], *, title: str, ylabel: str,
           stacked: bool, percent: bool = False, colors: dict[str, str] | None = None) -> str:
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, ax = plt.subplots(figsize=(10, 3.4), dpi=96)
    x = range(len(days))
    n = max(len(series), 1)
    width = 0.8 if stacked else 0.8 / n
    bottom = [0.0] * len(days)
    for i, (name, values) in enumerate(series.items()):
        color = (colors or {}).get(name, PALETTE[i % len(PALETTE)])
        if stacked:
            ax.bar(x, values, width, bottom=bottom, label=name, color=color)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        else:
            ax.bar([p - 0.4 + width * (i + 0.5) for p in x], values, width, label=name, color=color)
    ax.set_title(title, loc="left", fontsize=12, fontweight="bold")
    ax.set_ylabel(ylabel)
    step = max(1, len(days) // 15)
    ax.set_xticks(list(x)[::step], days[::step], rotation=30 if len(days) > 7 else 0,
                  ha="right" if len(days) > 7 else "center", fontsize=9)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=not percent))
    fmt = (lambda v, _: f"{v:.2%}") if percent else (lambda v, _: f"{v:,.0f}")
    ax.yaxis.set_major_formatter(FuncFormatter(fmt))
    top = max(bottom) if stacked else max((max(v) for v in series.values() if v), default=0.0)
    ax.set_ylim(0, top * 1.1 if top > 0 else 1)  # counts and rates are never negative
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    fig.subplots_adjust(left=0.09, right=0.72, bottom=0.2, top=0.88)  # same plot width in every chart
    return to_svg(fig)


def build_trend_page(start: dt.date, end: dt.date, load_summary: Callable[[dt.date], dict | None],
                     report_link: Callable[[dt.date], str]) -> TrendPage:
    """The trend page for the days [start, end] (inclusive)."""
    if end < start:
        raise ValueError(f"--to ({end}) is before --from ({start})")
    summaries: list[dict[str, Any]] = []
    missing = []
    day = start
    while day <= end:
        summary = load_summary(day)
        if summary is None:
            missing.append(day.isoformat())
        else:
            summaries.append(summary)
        day += dt.timedelta(days=1)
    days = [s["date"] for s in summaries]

    def col(key: str) -> list[float]:
        return [float(s.get(key) or 0) for s in summaries]

    charts = []
    if summaries:
        charts.append(_chart(days, {"landing records": col("landing_records"), "silver rows": col("rows")},
                             title="Rows in", ylabel="records", stacked=False))
        reasons = [r for r in QUARANTINE_REASONS if any(s["quarantined"].get(r) for s in summaries)]
        by_reason = {r: [s["quarantined"].get(r, 0) / s["landing_records"] if s["landing_records"] else 0.0
                         for s in summaries] for r in reasons}
        charts.append(_chart(days, by_reason or {"none": [0.0] * len(days)}, title="Quarantine rate by reason",
                             ylabel="share of landing records", stacked=True, percent=True))
        charts.append(_chart(days, {"duplicates dropped": col("duplicates")}, title="Duplicates",
                             ylabel="records", stacked=False))
        outcome = {
            "passed": [float(s["counts"]["passed"]) for s in summaries],
            "failed (warning)": [float(s["counts"]["failed_warning"]) for s in summaries],
            "failed (critical)": [float(s["counts"]["failed_critical"]) for s in summaries],
        }
        charts.append(_chart(days, outcome, title="Expectations per day", ylabel="expectations", stacked=True,
                             colors={"passed": "#59a14f", "failed (warning)": "#edc948",
                                     "failed (critical)": "#e15759"}))
    return TrendPage(_page(start, end, summaries, charts, missing, report_link), days, missing)


def _page(start: dt.date, end: dt.date, summaries: list[dict[str, Any]], charts: list[str],
          missing: list[str], report_link: Callable[[dt.date], str]) -> str:
    e = html.escape
    rows = []
    for s in summaries:
        failed = ", ".join(s.get("failed_critical", []) + s.get("failed_warning", [])) or "none"
        gate = s["gate"]
        link = report_link(dt.date.fromisoformat(s["date"]))
        rows.append(
            f"<tr><td>{e(s['date'])}</td><td class=n>{s['landing_records']:,}</td><td class=n>{s['rows']:,}</td>"
            f"<td class=n>{s['quarantine_rate']:.3%}</td><td class=n>{s['duplicates']:,}</td>"
            f"<td class='gate {e(gate)}'>{e(gate)}</td><td>{e(failed)}</td>"
            f"<td><a href='{e(link)}'>day report</a></td></tr>")
    note = (f"<p class=missing>No quality summary for {len(missing)} day(s): {e(', '.join(missing))}.</p>"
            if missing else "")
    body = "".join(f"<section class=chart>{c}</section>" for c in charts) or "<p>No summaries in this range.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>privrec data quality {start} to {end}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; padding: 0 1rem; }}
h1 {{ font-size: 1.5rem; margin-bottom: .2rem; }}
p.sub {{ color: #555; margin-top: 0; }}
section.chart svg {{ width: 100%; height: auto; }}
table {{ border-collapse: collapse; width: 100%; font-size: .9rem; margin-top: 1rem; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .35rem .5rem; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.gate.passed {{ color: #2e7d32; font-weight: bold; }}
td.gate.failed {{ color: #c62828; font-weight: bold; }}
p.missing {{ color: #8a6d00; }}
</style></head><body>
<h1>privrec data quality</h1>
<p class=sub>{e(start.isoformat())} to {e(end.isoformat())}: {len(summaries)} day(s) with a validation
summary. Counts and rates only; no identifiers or record values.</p>
{note}
{body}
<h2>Days</h2>
<table><thead><tr><th>day</th><th>landing</th><th>silver rows</th><th>quarantine rate</th><th>duplicates</th>
<th>gate</th><th>failed expectations</th><th>report</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
</body></html>
"""
