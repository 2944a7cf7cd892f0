"""Charts for privrec's HTML pages: matplotlib figures rendered as inline SVG.

SVG keeps text as text (searchable, selectable, crisp at any zoom), and an inlined chart
makes a page that opens offline, from a file, in any browser.
"""

from __future__ import annotations

import io
from typing import Any

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, with text kept as SVG text."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"
    from matplotlib import pyplot as plt

    return plt


def to_svg(fig: Any) -> str:
    """The figure as an ``<svg>`` element (no XML prolog), ready to inline; closes the figure."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    pyplot().close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]
