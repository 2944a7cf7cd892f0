"""privrec's pages in the Airflow API server: the lake's reports over http, behind Airflow's login.

Mounted by the Airflow plugin (``privrec_pipeline.airflow_plugin``) at ``/privrec``:

- ``/privrec/reports/quality/<day>/<file>``: a day's quality page and its Data Docs;
- ``/privrec/reports/quality/trend``: the quality trend page;
- ``/privrec/reports/dp_stats/<day>``: a day's DP statistics report;
- ``/privrec/reports/audits/<day>/<file>``: a day's on-demand audit results;
- ``/privrec/models/<name>/<version>/card``: a published model's card;
- ``/privrec/budget`` and ``/privrec/models``: the Privacy budget and Models pages
  (``pages``), in the UI's navigation as external views.

Every file is read through the lake abstraction (``privrec_pipeline.lake``), so local and
remote lakes serve alike. Every request needs an Airflow session (the UI's cookie or a
bearer token) of a user who may read the nightly DAG's runs. What a request names is
checked before the lake is touched: a day is an ISO date, a file path has only plain name
segments (no ``..``, no hidden or staging names, no backslashes) and a known suffix, and on a
local lake the resolved file must lie inside the report's folder (a symlink planted by
someone with write access to the lake leads nowhere). Anything else is 404, the same answer
as a missing file, so the server says nothing about what exists outside the reports.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from privrec_pipeline import lake as lk

PREFIX = "/privrec"
NIGHTLY_DAG = "privrec_nightly"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "text/javascript",
               ".json": "application/json", ".png": "image/png", ".svg": "image/svg+xml",
               ".txt": "text/plain; charset=utf-8", ".md": "text/markdown; charset=utf-8"}
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=@+-]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NOT_FOUND = HTTPException(status_code=404, detail="Not Found")


def report_url(kind: str, day: dt.date, file: str = "", base: str = "") -> str:
    """The http address of a report page (``kind``: quality, dp_stats or audits), relative to
    the Airflow API server unless ``base`` (its public URL) is given."""
    tail = f"/{file}" if file else ""
    return f"{base.rstrip('/')}{PREFIX}/reports/{kind}/{day.isoformat()}{tail}"


def model_card_url(name: str, version: str, base: str = "") -> str:
    return f"{base.rstrip('/')}{PREFIX}/models/{name}/{version}/card"


def _day(value: str) -> dt.date:
    if not _DAY.fullmatch(value):
        raise _NOT_FOUND
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise _NOT_FOUND from None


def _inside(folder: lk.UPath, relative: str, types: dict[str, str] = MEDIA_TYPES) -> lk.UPath:
    """``folder/relative`` if every segment is a plain name with a suffix of ``types`` and the
    file exists inside ``folder``; else 404."""
    parts = relative.split("/")
    if not relative or not all(_SEGMENT.fullmatch(p) for p in parts) or any(".." in p for p in parts):
        raise _NOT_FOUND
    target = folder.joinpath(*parts)
    if target.suffix.lower() not in types:
        raise _NOT_FOUND
    if lk.is_local(str(folder)):
        root, resolved = Path(str(folder)).resolve(), Path(str(target)).resolve()
        if not resolved.is_relative_to(root):
            raise _NOT_FOUND
    if not target.is_file():
        raise _NOT_FOUND
    return target


def _file(folder: lk.UPath, relative: str, depth: int = 0) -> Response:
    """A report file; an HTML page's CDN addresses point to the plugin's assets (``depth``: how
    many folders below ``/privrec/`` the page's URL is)."""
    from privrec_pipeline.airflow_plugin import assets

    target = _inside(folder, relative)
    body = target.read_bytes()
    if target.suffix.lower() == ".html" and assets.installed():
        to_assets = "../" * (depth + relative.count("/")) + "assets/"
        body = assets.rewrite_cdn(body.decode("utf-8", errors="replace"), to_assets).encode("utf-8")
    return Response(body, media_type=MEDIA_TYPES[target.suffix.lower()],
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


def _asset(folder: Path, relative: str) -> Response:
    from privrec_pipeline.airflow_plugin.assets import ASSET_TYPES

    target = _inside(folder, relative, ASSET_TYPES)
    return Response(target.read_bytes(), media_type=ASSET_TYPES[target.suffix.lower()],
                    headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"})


def require_reader() -> Callable[..., Any]:
    """Airflow's check: a logged-in user who may read the nightly DAG's runs (401 without a
    session, 403 without the permission)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=NIGHTLY_DAG)


def create_app(lake: Callable[[], str] | None = None, reader: Callable[..., Any] | None = None) -> FastAPI:
    """The app; ``lake`` gives the lake URI per request (default: the process's configured
    lake), ``reader`` is the access check (default: ``require_reader()``)."""
    from privrec_pipeline.config import lake_root

    lake_of = lake or lake_root
    check = reader or require_reader()
    app = FastAPI(title="privrec", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(check)])

    @app.get("/reports/quality/trend")
    def quality_trend() -> Response:
        return _file(lk.path(lk.zone_uri(lake_of(), "reports")), "trend.html", depth=2)

    @app.get("/reports/quality/{day}")
    def quality_day(day: str) -> Response:
        # The page's relative links need the day as a folder of the URL.
        return RedirectResponse(f"{_day(day).isoformat()}/index.html", status_code=307)

    @app.get("/reports/quality/{day}/{file:path}")
    def quality_file(day: str, file: str) -> Response:
        return _file(lk.partition(lake_of(), "reports", _day(day)), file, depth=3)

    @app.get("/reports/dp_stats/{day}")
    def dp_stats(day: str) -> Response:
        from privrec_pipeline.dp_stats.release import REPORT_FILE

        return _file(lk.partition(lake_of(), "dp_stats", _day(day)), REPORT_FILE, depth=2)

    @app.get("/reports/audits/{day}/{file:path}")
    def audit_file(day: str, file: str) -> Response:
        return _file(lk.partition(lake_of(), "audits", _day(day)), file, depth=3)

    @app.get("/assets/npm/{file:path}")
    def npm_asset(file: str) -> Response:
        from privrec_pipeline.airflow_plugin.assets import SERVED_PACKAGES, node_modules

        parts = file.split("/")
        size = 2 if file.startswith("@") else 1
        package, rest = "/".join(parts[:size]), "/".join(parts[size:])
        if package not in SERVED_PACKAGES:
            raise _NOT_FOUND
        return _asset(node_modules() / package, rest)

    @app.get("/assets/ge/{file}")
    def ge_asset(file: str) -> Response:
        from privrec_pipeline.airflow_plugin.assets import ge_images

        return _asset(ge_images(), file)

    @app.get("/models/{name}/{version}/card")
    def model_card(name: str, version: str) -> HTMLResponse:
        if not (_NAME.fullmatch(name) and _NAME.fullmatch(version)):
            raise _NOT_FOUND
        from privrec_pipeline.models.publish import models_root

        text = _inside(models_root(lake_of()) / name / version, "model_card.md").read_text(encoding="utf-8")
        return HTMLResponse(card_page(f"Model card: {name} {version}", text),
                            headers={"Cache-Control": "no-store"})

    @app.get("/budget")
    def budget() -> HTMLResponse:
        from privrec_pipeline.airflow_plugin.pages import budget_page
        from privrec_pipeline.privacy.ledger import open_ledger

        today = dt.datetime.now(dt.UTC).date()
        return HTMLResponse(budget_page(open_ledger(lake_of()), today), headers={"Cache-Control": "no-store"})

    @app.get("/models")
    def models() -> HTMLResponse:
        from privrec_pipeline.airflow_plugin.pages import models_page
        from privrec_pipeline.models.publish import models_root

        return HTMLResponse(models_page(models_root(lake_of()), model_card_url),
                            headers={"Cache-Control": "no-store"})

    return app


def card_page(title: str, markdown_text: str) -> str:
    """A model card's Markdown as a page (raw HTML in the Markdown is escaped, not rendered)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
            "line-height:1.5;color:#1f2933}table{border-collapse:collapse}th,td{border:1px solid #cbd2d9;"
            "padding:.25rem .5rem}th{background:#f5f7fa}code{background:#f5f7fa;padding:0 .2rem}</style>"
            f"</head><body>{body}</body></html>")
