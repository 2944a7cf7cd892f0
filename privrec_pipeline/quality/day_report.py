"""The day's quality page (``reports/quality/dt=D/index.html``), rendered from ``summary.json``.

Great Expectations' Data Docs sit beside it (``data_docs/``); their index builds its tables
with scripts from public CDNs and shows nothing offline, so this page is the entry point:
plain HTML, readable anywhere, linking to the Data Docs validation pages.
"""

from __future__ import annotations

import html
from typing import Any


def render_day_page(summary: dict[str, Any], docs_links: dict[str, str]) -> str:
    e = html.escape
    gate = summary["gate"]
    counts = summary["counts"]
    failed = [x for x in summary["expectations"] if not x["success"]]
    rows = []
    for x in summary["expectations"]:
        stats = format_observed(x["observed"])
        if x.get("error"):
            stats = f"could not be evaluated ({x['error']})"
        state = "passed" if x["success"] else f"failed-{x['severity']}"
        rows.append(f"<tr class='{state}'><td>{e(x['id'])}</td><td>{e(x['severity'])}</td>"
                    f"<td>{'yes' if x['success'] else 'NO'}</td><td>{e(x['type'])}</td>"
                    f"<td>{e(stats)}</td><td>{e(x['description'])}</td></tr>")
    failed_items = "".join(
        f"<li><b>{e(x['id'])}</b> ({e(x['severity'])}): {e(format_observed(x['observed']))}</li>"
        for x in failed) or "<li>none</li>"
    links = " · ".join(f"<a href='{e(href)}'>{e(name)}</a>" for name, href in docs_links.items())
    bounds = summary["row_count_bounds"]
    rb = f"{bounds['min']:,} to {'∞' if bounds['max'] is None else format(bounds['max'], ',')} ({e(bounds['basis'])})"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>privrec data quality {e(summary['date'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }}
.gate {{ font-size: 1.3rem; font-weight: bold; }} .gate.passed {{ color: #2e7d32; }} .gate.failed {{ color: #c62828; }}
table {{ border-collapse: collapse; width: 100%; font-size: .85rem; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .3rem .45rem; text-align: left; vertical-align: top; }}
tr.failed-critical td {{ background: #fdecea; }} tr.failed-warning td {{ background: #fff8e1; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }} dt {{ color: #555; }}
</style></head><body>
<h1>Data quality, {e(summary['date'])}</h1>
<p class='gate {e(gate)}'>Gate {e(gate)}: {counts['passed']} of {counts['evaluated']} expectations passed,
{counts['failed_critical']} critical and {counts['failed_warning']} warning failures.</p>
<dl>
<dt>landing records</dt><dd>{summary['landing_records']:,}</dd>
<dt>silver rows</dt><dd>{summary['rows']:,}</dd>
<dt>quarantine rate</dt><dd>{summary['quarantine_rate']:.3%}</dd>
<dt>duplicates dropped</dt><dd>{summary['duplicates']:,}</dd>
<dt>expected row count</dt><dd>{rb}</dd>
<dt>run</dt><dd>{e(summary['run_id'])}</dd>
</dl>
<h2>Failed expectations</h2><ul>{failed_items}</ul>
<p>Great Expectations Data Docs: {links or 'none'}</p>
<h2>All expectations</h2>
<table><thead><tr><th>id</th><th>severity</th><th>passed</th><th>expectation</th><th>observed</th><th>what it checks</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<p>Counts and rates only: reports never hold identifiers or values of failing rows.</p>
</body></html>
"""


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_observed(observed: dict[str, Any]) -> str:
    """``key=value, ...`` of an expectation's observed statistics."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in observed.items())
