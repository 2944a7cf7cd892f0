"""The Privacy budget and Models pages of privrec's Airflow plugin (server-rendered HTML,
inline SVG charts: no script, nothing from a CDN).

What they show is public by construction: the ledger's accounting (each release's key,
window, epsilon, delta, state and run; never its noisy values or parameters) and the
published models' cards (configuration and DP releases).
"""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

STYLE = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:1.5rem auto;padding:0 1rem;color:#1f2933}"
         "table{border-collapse:collapse;margin:.5rem 0 1.5rem}th,td{border:1px solid #cbd2d9;padding:.25rem .5rem;"
         "text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f5f7fa}"
         ".big{font-size:1.4rem}.warn{color:#b3261e}")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _e(value: Any) -> str:
    return html.escape(str(value))


def budget_spend(ledger: Any, today: dt.date) -> list[tuple[dt.date, float, float]]:
    """(day, spent epsilon, basic epsilon) of the policy window ending on each day the spend
    changes, and today (tight composition, as the ledger checks the cap). A release counts in
    every window its data window overlaps: from its first day until ``window_days`` after its
    last, so the spend changes on those days only."""
    width = dt.timedelta(days=ledger.policy.window_days)
    live = [r for r in ledger.releases() if r.state in ("reserved", "committed")]
    days = sorted({d for r in live for d in (r.window_start, r.window_end, r.window_end + width)} | {today})
    return [(d, (s := ledger.spend_at(d)).epsilon, s.basic_epsilon) for d in days]


def release_kind(key: str) -> str:
    """``evaluation-r3`` -> ``evaluation``: what a release is, for the chart's colours."""
    return key.split("-")[0]


def budget_chart(points: list[tuple[dt.date, float, float]], cap: float) -> str:
    """The spend of the rolling window ending on each day, against the cap (a step line)."""
    from privrec_pipeline.charts import PALETTE, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    days = [p[0] for p in points]
    tight = [p[1] for p in points]
    ax.fill_between(days, tight, step="post", color=PALETTE[0], alpha=0.25)
    ax.step(days, tight, where="post", color=PALETTE[0], label="spent (tight, PLD)")
    ax.step(days, [p[2] for p in points], where="post", color=PALETTE[1], linestyle=":", label="basic composition")
    ax.axhline(cap, color=PALETTE[2], linestyle="--", label=f"cap {cap:g}")
    ax.set_ylabel("epsilon, window ending that day")
    ax.set_ylim(0, max(cap, *(p[2] for p in points)) * 1.1)
    return _finish(fig, ax, days)


def releases_chart(releases: list[Any]) -> str:
    """Epsilon of each data day's releases, stacked by kind (DP statistics, training, ...)."""
    from privrec_pipeline.charts import PALETTE, pyplot

    live = [r for r in releases if r.state in ("reserved", "committed")]
    kinds = sorted({release_kind(r.release_key) for r in live})
    days = sorted({r.window_end for r in live})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    bottom = [0.0] * len(days)
    for n, kind in enumerate(kinds):
        heights = [sum(r.epsilon for r in live if r.window_end == d and release_kind(r.release_key) == kind)
                   for d in days]
        ax.bar(days, heights, bottom=bottom, width=0.8, color=PALETTE[n % len(PALETTE)], label=kind)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("epsilon released (basic)")
    ax.set_xlabel("last day of the release's data window")
    ax.set_ylim(0, max(bottom) * 1.1)
    return _finish(fig, ax, days)


def _finish(fig: Any, ax: Any, days: list[dt.date]) -> str:
    """Legend above the plot, whole days on the time axis (at least a week shown), as SVG."""
    from matplotlib import dates as mdates

    from privrec_pipeline.charts import to_svg

    first, last = min(days), max(days)
    pad = max(dt.timedelta(days=1), (dt.timedelta(days=7) - (last - first)) / 2)
    ax.set_xlim(first - pad, last + pad)
    locator = mdates.AutoDateLocator(minticks=3, maxticks=10)
    locator.intervald[mdates.HOURLY] = [24]  # never ticks between days
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, ncols=6)
    ax.spines[["top", "right"]].set_visible(False)
    fig.autofmt_xdate()
    fig.tight_layout()
    return to_svg(fig)


def budget_page(ledger: Any, today: dt.date) -> str:
    policy = ledger.policy
    releases = ledger.releases()
    points = budget_spend(ledger, today)
    now = ledger.spend_at(today)
    rows = "".join(
        f"<tr><td class=n>{r.id}</td><td>{_e(r.release_key)}</td><td>{r.window_start} .. {r.window_end}</td>"
        f"<td class=n>{r.epsilon:.4g}</td><td class=n>{r.delta:.3g}</td><td>{_e(r.state)}</td>"
        f"<td>{_e(r.run_id)}</td></tr>" for r in reversed(releases))
    windows = "".join(f"<tr><td>{d - dt.timedelta(days=policy.window_days - 1)} .. {d}</td><td class=n>{e:.4g}</td>"
                      f"<td class=n>{policy.epsilon - e:.4g}</td></tr>" for d, e, _ in reversed(points))
    left = now.remaining
    body = (f"<p class=big>Window {now.start} .. {now.end}: epsilon <b>{now.epsilon:.3g}</b> spent of "
            f"{policy.epsilon:g}, <b{' class=warn' if left < 0.1 * policy.epsilon else ''}>{left:.3g}</b> "
            f"remaining (delta cap {policy.delta:g}, {policy.window_days}-day rolling windows, tight composition "
            f"by PLD; {len(now.releases)} releases in this window)</p>"
            + f"<section class=chart>{budget_chart(points, policy.epsilon)}</section>"
            + (f"<h2>Releases by data day</h2><section class=chart>{releases_chart(releases)}</section>"
               if any(r.state in ("reserved", "committed") for r in releases) else "")
            + "<h2>Rolling windows</h2><table><tr><th>window</th><th>epsilon spent</th><th>remaining</th></tr>"
            + windows + "</table><h2>Releases</h2><table><tr><th>id</th><th>release</th><th>data window</th>"
              "<th>epsilon</th><th>delta</th><th>state</th><th>run</th></tr>" + rows + "</table>")
    return _page("Privacy budget", body)


def models_page(models_root: Any, card_url: Any) -> str:
    """Every published version of every model: which is LATEST, its DP metrics, epsilon and
    audit, and a link to its card (``card_url(name, version)``)."""
    from privrec_pipeline import lake as lk
    from privrec_pipeline.models.recommend import LATEST

    sections = []
    names = sorted(p for p in models_root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))) \
        if models_root.exists() else []
    for folder in names:
        latest = (folder / LATEST).read_text().strip() if (folder / LATEST).exists() else None
        rows = []
        for version in sorted((v for v in folder.iterdir() if v.is_dir() and not v.name.startswith((".", "_"))),
                              key=lambda v: v.name, reverse=True):
            card = lk.read_json_if_exists(version / "model_card.json")
            if card is None:  # not a complete version (its commit file is written last)
                continue
            p, m = card["privacy"], card["metrics"]
            gain = m.get("gains", {}).get("dp_popularity")
            audit = p.get("audit")
            audited = "" if audit is None else (f"{'passed' if audit['passed'] else 'FAILED'} "
                                                f"(epsilon &ge; {audit['epsilon_lower']:.3g})")
            rows.append(
                f"<tr><td><a href='{_e(card_url(folder.name, version.name))}'>{_e(version.name)}</a>"
                f"{' <b>LATEST</b>' if version.name == latest else ''}</td>"
                f"<td>{_e(', '.join(card['data']['window']))}</td>"
                f"<td class=n>{p['model']['epsilon']:.3g}</td><td>{_e(p['model']['mode'])}</td>"
                f"<td class=n>{m['candidate'].get('recall@20', float('nan')):.4f}</td>"
                f"<td class=n>{m['dp_popularity'].get('recall@20', float('nan')):.4f}</td>"
                f"<td class=n>{'' if gain is None else format(gain['lower'], '+.4f')}</td>"
                f"<td>{audited}</td></tr>")
        sections.append(
            f"<h2>{_e(folder.name)}</h2><table><tr><th>version</th><th>data window</th><th>epsilon</th><th>mode</th>"
            "<th>DP Recall@20</th><th>DP popularity</th><th>gain lower bound</th><th>training audit</th></tr>"
            + "".join(rows) + "</table>")
    return _page("Models", "".join(sections) or "<p>No model has been published yet.</p>")

