"""The human page of a DP release: top items with error bars, funnel, categories, budget.

Rendered from the released (noisy) tables and ``release.json`` only, so it shows nothing the
release does not already publish.
"""

from __future__ import annotations

import html
from typing import Any

from privrec_pipeline.charts import PALETTE, pyplot, to_svg

TOP_ITEMS = 20


def _top_items_chart(items: list[dict[str, Any]], level: float, k: int) -> str:
    plt = pyplot()
    top = items[:TOP_ITEMS][::-1]  # largest at the top of a horizontal bar chart
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(top) + 1.2), dpi=96)
    users = [r["users"] for r in top]
    low = [r["users"] - r["users_low"] for r in top]
    high = [r["users_high"] - r["users"] for r in top]
    ax.barh(range(len(top)), users, xerr=[low, high], color=PALETTE[0], ecolor="#333", capsize=3,
            label=f"bounded count ({level:.0%} interval)")
    if any(r.get("users_estimate") is not None for r in top):
        ax.scatter([r["users_estimate"] for r in top], range(len(top)), marker="D", s=22, color=PALETTE[1], zorder=3,
                   label="estimate of the unbounded count")
        ax.legend(loc="lower right", fontsize=9, frameon=False)
    ax.set_yticks(range(len(top)), [str(r["item_id"])[:40] for r in top], fontsize=9)
    ax.set_xlabel(f"distinct users (noisy; each user counts for at most {k} items in total)")
    ax.set_title(f"Top {len(top)} items by distinct users", loc="left", fontsize=12, fontweight="bold")
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return to_svg(fig)


def _audit_section(audit: dict[str, Any] | None) -> str:
    """The DP statistics tester's result (``audits.audit_dp_stats``), if one was run."""
    if audit is None:
        return ("<h2>Audit</h2><p class=sub>Not audited yet: <code>privrec audit stats --date D</code> runs the DP "
                "statistics tester on this release's configuration.</p>")
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(name)}</td><td class=n>{b['claimed_epsilon']:.4g}</td><td class=n>{b['epsilon_lower']:.4g}</td>"
        f"<td>{'refuted' if b['refutes'] else 'not refuted'}</td></tr>" for name, b in audit["statistics"].items())
    method = next(iter(audit["statistics"].values()))["method"] if audit["statistics"] else ""
    return (f"<h2>Audit</h2><p>{'Passed' if audit['passed'] else '<b>FAILED</b>'}: empirical lower bounds on each "
            f"statistic's epsilon at confidence {audit['confidence']:g}, from {audit['runs']:,} runs on each of two "
            f"neighbouring days ({e(audit['what'])}); method: {e(method)}. A bound above the claimed epsilon refutes "
            "the claim; below it, the runs found no evidence against it.</p>"
            "<table><thead><tr><th>statistic</th><th>claimed epsilon</th><th>empirical lower bound</th><th>result</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")


def render_release_page(release: dict[str, Any], items: list[dict[str, Any]], funnel: list[dict[str, Any]],
                        categories: list[dict[str, Any]], audit: dict[str, Any] | None = None) -> str:
    e = html.escape
    level = release["confidence_level"]
    k = release["bounds"]["max_items_per_user"]
    chart = (_top_items_chart(items, level, k) if items and items[0].get("users") is not None
             else "<p>No item passed partition selection (or item counts are not released).</p>")
    keys = ("are released: the catalog's, public keys, every one with a noisy value"
            if (release.get("keys") or {}).get("catalog") else "passed partition selection")
    budget_rows = "".join(
        f"<tr><td>{e(name)}</td><td>{e(m['mechanism'])}</td><td class=n>{m['epsilon']:.4g}</td>"
        f"<td class=n>{m.get('delta', 0):.2g}</td><td class=n>{m['sensitivity']:g}</td>"  # (after K is chosen)
        f"<td class=n>{'' if m.get('noise_scale') is None else format(m['noise_scale'], '.4g')}</td></tr>"
        for name, m in release["statistics"].items())
    funnel_rows = "".join(f"<tr><td>{e(r['event_type'])}</td><td class=n>{r['users']:,}</td>"
                          f"<td class=n>{r['users_low']:,} .. {r['users_high']:,}</td></tr>" for r in funnel)
    estimated = any(r.get("events_estimate") is not None for r in categories)
    cat_rows = "".join(f"<tr><td>{e(str(r['category']))}</td><td class=n>{r['events']:,}</td>"
                       f"<td class=n>{r['events_low']:,} .. {r['events_high']:,}</td>"
                       + (f"<td class=n>{r['events_estimate']:,}</td>" if estimated else "") + "</tr>"
                       for r in categories if r.get("events") is not None)
    estimate_head = "<th>estimate of the unbounded count</th>" if estimated else ""
    price = release.get("purchases") or {}
    price_line = (f"<p>Mean purchase price (clamped to {price['price_clamp'][0]:g} .. {price['price_clamp'][1]:g}): "
                  f"<b>{price['mean_price']:.2f}</b> over about {price['noisy_purchases']:,} purchases.</p>"
                  if price else "")
    total = release["epsilon"], release["delta"]
    bounding = release.get("bounding") or {}
    share = bounding.get("dropped_share")
    chosen = e(release['bounds'].get('chosen', 'by hand'))
    if share is not None and bounding.get("kept_share") is not None and (release.get("keys") or {}).get("catalog"):
        bias_line = (
            f"<p>Bounding bias: each user counts for at most {k} items in total (K, {chosen}): a user with n &gt; {k} "
            f"items counts {k}/n for each. About <b>{share:.1%}</b> of (user, item) contributions were left out (a DP "
            f"estimate, epsilon {bounding['epsilon']:.3g}); the intervals cover the bounded counts, and each "
            f"<i>estimate</i> divides a count by the kept share, {bounding['kept_share']:.3f}, to estimate the "
            "unbounded count (post-processing; exact where heavy users' items look like everybody's).</p>")
    elif share is not None:
        bias_line = (
            f"<p>Bounding bias: each user counts for at most {k} items (K, {chosen}); about <b>{share:.1%}</b> of "
            f"(user, item) contributions were dropped by this bound (a DP estimate, epsilon {bounding['epsilon']:.3g}), "
            "so the bounded item user counts (and their intervals) miss that share of contributions in total, "
            "unevenly across items, on top of the noise the intervals show.</p>")
    else:
        bias_line = (f"<p>Bounding: each user counts for at most {k} items (K); the share of contributions this "
                     "drops is not released.</p>")
    category = bounding.get("category") or {}
    if category.get("dropped_share") is not None:
        bias_line += (f"<p>Categories: each user counts for at most {category['max_category_events_per_user']} events "
                      f"in total; about <b>{category['dropped_share']:.1%}</b> of category events were left out (a DP "
                      f"estimate, epsilon {category['epsilon']:.3g}); the estimates divide by the kept share.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>privrec DP statistics {e(release['date'])}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1000px;
       color: #222; padding: 0 1rem; }}
h1 {{ font-size: 1.5rem; margin-bottom: .2rem; }}
p.sub {{ color: #555; margin-top: 0; }}
svg {{ width: 100%; height: auto; }}
table {{ border-collapse: collapse; font-size: .9rem; margin: .5rem 0 1.5rem; min-width: 50%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .3rem .6rem; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style></head><body>
<h1>privrec DP statistics, {e(release['date'])}</h1>
<p class=sub>Release {release['release_id']} (generation {release['generation']}{', forced' if release['forced'] else ''}):
user-level differential privacy (privacy unit: {e(release['privacy_unit'])}, one day), epsilon {total[0]:.4g},
delta {total[1]:.2g}.
Every number on this page is noisy; {len(items):,} items and {len(categories):,} categories {keys}.</p>
{bias_line}
{chart}
<h2>Funnel: distinct users per event type</h2>
<table><thead><tr><th>event type</th><th>users</th><th>{level:.0%} interval of the count (each user counted once per event type)</th></tr></thead>
<tbody>{funnel_rows}</tbody></table>
<h2>Categories: events</h2>
<table><thead><tr><th>category</th><th>events</th>
<th>{level:.0%} interval of the bounded count ({e(_category_bounds(release['bounds'], bool((release.get('params') or {}).get('public_categories'))))})</th>{estimate_head}</tr></thead>
<tbody>{cat_rows}</tbody></table>
{price_line}
<h2>Budget of this release</h2>
<table><thead><tr><th>statistic</th><th>mechanism</th><th>epsilon</th><th>delta</th><th>sensitivity</th>
<th>noise scale</th></tr></thead><tbody>{budget_rows}</tbody></table>
<p class=sub>Contribution bounds per user: {e(_bounds(release['bounds']))}.</p>
{_audit_section(audit)}
</body></html>
"""


def _category_bounds(bounds: dict[str, Any], scaled: bool) -> str:
    if scaled:  # public categories: L1 scaling (dp_stats.bounding.scale_categories)
        total = bounds.get("max_category_events_per_user")
        l1 = bounds["max_categories_per_user"] * bounds["max_events_per_category"]
        l1 = l1 if total is None else min(l1, total)
        return f"at most {l1} events per user over all categories: a user with e > {l1} events counts {l1}/e for each"
    total = bounds.get("max_category_events_per_user")
    per = (f"at most {bounds['max_categories_per_user']} categories and {bounds['max_events_per_category']} "
           "events per category per user")
    if total is None:
        return per
    if total == bounds["max_events_per_category"]:  # chosen T: Kc and Cc lifted
        return f"at most {total} events per user over all categories, its most used categories first"
    return f"{per}, at most {total} in total"


def _bounds(bounds: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in bounds.items())
