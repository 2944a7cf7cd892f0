"""privrec's pages in the Airflow API server (``privrec_pipeline.airflow_plugin``): reports read
through the lake, refused without an Airflow session, and nothing outside the reports ever
served (path traversal, symlinks, hidden and staging files, unknown days: 404). No Spark."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from fastapi.testclient import TestClient

from conftest import unavailable
from privrec_pipeline import lake as lk
from privrec_pipeline.airflow_plugin.app import (
    PREFIX,
    card_page,
    create_app,
    model_card_url,
    report_url,
)

DAY = dt.date(2026, 1, 15)


@pytest.fixture
def lake(tmp_path):
    root = str(tmp_path / "lake")
    quality = lk.partition(root, "reports", DAY)
    (quality / "data_docs" / "static").mkdir(parents=True)
    (quality / "index.html").write_text("<h1>quality of 2026-01-15</h1>")
    (quality / "data_docs" / "index.html").write_text("<h1>data docs</h1>")
    (quality / "data_docs" / "static" / "style.css").write_text("body{}")
    (quality / "summary.bin").write_bytes(b"\x00")
    (quality / ".staging-x.html").write_text("half written")
    (lk.path(lk.zone_uri(root, "reports")) / "trend.html").write_text("<h1>trend</h1>")
    dp = lk.partition(root, "dp_stats", DAY)
    dp.mkdir(parents=True)
    (dp / "report.html").write_text("<h1>dp stats</h1>")
    card = lk.path(lk.zone_uri(root, "models")) / "privrec-recommender" / "2026-01-15-r3"
    card.mkdir(parents=True)
    (card / "model_card.md").write_text("# Model card\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<script>alert(1)</script>\n")
    (tmp_path / "secret.html").write_text("outside the lake")
    os.symlink(tmp_path / "secret.html", quality / "planted.html")
    return root


def mounted(app):
    """As the Airflow API server mounts a plugin's app: under its url_prefix."""
    from fastapi import FastAPI

    server = FastAPI()
    server.mount(PREFIX, app)
    return TestClient(server)


@pytest.fixture
def client(lake):
    return mounted(create_app(lambda: lake, reader=lambda: None))


def test_reports_and_cards_are_served_from_the_lake(client):
    assert client.get(report_url("quality", DAY)).text == "<h1>quality of 2026-01-15</h1>"
    page = client.get(report_url("quality", DAY, "index.html"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.get(report_url("quality", DAY, "data_docs/index.html")).text == "<h1>data docs</h1>"
    css = client.get(report_url("quality", DAY, "data_docs/static/style.css"))
    assert css.headers["content-type"].startswith("text/css")
    assert client.get("/privrec/reports/quality/trend").text == "<h1>trend</h1>"
    assert client.get(report_url("dp_stats", DAY)).text == "<h1>dp stats</h1>"
    card = client.get(model_card_url("privrec-recommender", "2026-01-15-r3"))
    assert card.status_code == 200 and "<table>" in card.text and "<td>1</td>" in card.text
    # HTML inside a card's Markdown is shown as text, never run.
    assert "<script>" not in card.text and "&lt;script&gt;" in card.text


@pytest.mark.parametrize("path", [
    "/privrec/reports/quality/2026-01-15/../../../secret.html",
    "/privrec/reports/quality/2026-01-15/..%2F..%2F..%2Fsecret.html",
    "/privrec/reports/quality/2026-01-15/%2e%2e/%2e%2e/secret.html",
    "/privrec/reports/quality/2026-01-15/data_docs/..%2f..%2findex.html",
    "/privrec/reports/quality/2026-01-15/..\\..\\secret.html",
    "/privrec/reports/quality/2026-01-15/planted.html",  # a symlink out of the report folder
    "/privrec/reports/quality/2026-01-15/.staging-x.html",  # hidden and staging files
    "/privrec/reports/quality/2026-01-15/summary.bin",  # a suffix that is not served
    "/privrec/reports/quality/2026-01-15//index.html",
    "/privrec/reports/quality/2026-01-16/index.html",  # a day without a report
    "/privrec/reports/quality/2026-13-45/index.html",  # not a day
    "/privrec/reports/quality/..%2f..%2f/index.html",
    "/privrec/reports/dp_stats/2026-01-16",
    "/privrec/reports/dp_stats/20260115",
    "/privrec/models/privrec-recommender/..%2F..%2Fsecret/card",
    "/privrec/models/../privrec-recommender/2026-01-15-r3/card",
    "/privrec/models/privrec-recommender/.2026-01-15-r3/card",
    "/privrec/models/privrec-recommender/2026-01-14-r1/card",
])
def test_anything_outside_the_reports_is_404(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.text)
    assert "outside the lake" not in response.text


def test_a_request_without_an_airflow_session_is_refused(lake):
    """With Airflow's own check: no cookie and no bearer token is 401, a forged token 403."""
    strict = mounted(create_app(lambda: lake))
    for url in (report_url("quality", DAY), report_url("dp_stats", DAY), "/privrec/reports/quality/trend",
                model_card_url("privrec-recommender", "2026-01-15-r3"), "/privrec/reports/quality/2026-01-16"):
        response = strict.get(url)
        assert response.status_code == 401, (url, response.status_code)
        assert "quality of" not in response.text


def test_urls_are_relative_to_the_api_server_unless_a_base_is_given():
    assert report_url("quality", DAY, "index.html") == "/privrec/reports/quality/2026-01-15/index.html"
    assert report_url("dp_stats", DAY, base="https://airflow.example/") == \
        "https://airflow.example/privrec/reports/dp_stats/2026-01-15"
    assert model_card_url("m", "v") == "/privrec/models/m/v/card"
    assert "<h1>x</h1>" in card_page("t", "# x")


def test_the_privacy_budget_page_shows_each_release_and_what_remains(lake, client, monkeypatch):
    from privrec_pipeline.privacy.accounting import Component
    from privrec_pipeline.privacy.ledger import open_ledger

    monkeypatch.delenv("PRIVREC_LEDGER_URL", raising=False)
    ledger = open_ledger(lake)
    today = dt.datetime.now(dt.UTC).date()
    for n, (key, eps) in enumerate((("dp_stats", 0.5), ("training", 1.25))):
        reservation = ledger.reserve(key, today - dt.timedelta(days=1 - n), today, [Component(
            "laplace", noise_multiplier=1 / eps, label=key)], epsilon=eps, delta=0.0, dag_id="privrec_nightly",
            run_id=f"scheduled__run{n}")
        ledger.commit(reservation.release.id, {"noisy": 123.456}, run_id=f"scheduled__run{n}")
    page = client.get("/privrec/budget")
    assert page.status_code == 200 and page.text.count("<svg") == 2  # spend and releases charts, inline
    # The window's spend changes when a release enters and when it leaves (window_days after
    # its last day), nowhere in between.
    from privrec_pipeline.airflow_plugin.pages import budget_spend

    points = budget_spend(ledger, today)
    expiry = today + dt.timedelta(days=ledger.policy.window_days)
    assert [p[0] for p in points] == [today - dt.timedelta(days=1), today, expiry]
    assert points[0][2] == pytest.approx(0.5) and points[1][2] == pytest.approx(1.75) and points[2][1:] == (0, 0)
    spend = ledger.spend_at(today)
    assert f"epsilon <b>{spend.epsilon:.3g}</b> spent of {ledger.policy.epsilon:g}" in page.text
    assert f"<b>{spend.remaining:.3g}</b> remaining" in page.text
    for text in ("dp_stats", "training", "scheduled__run1", ">1.25<", ">0.5<", "committed"):
        assert text in page.text, text
    assert "123.456" not in page.text  # a release's values are not the budget's business
    # Nothing loaded from elsewhere: no script, no remote stylesheet or image.
    assert "<script" not in page.text and 'src="http' not in page.text and "<link" not in page.text


def test_the_models_page_lists_versions_with_the_latest_and_links_to_cards(lake, client):
    import json

    folder = lk.path(lk.zone_uri(lake, "models")) / "privrec-recommender"
    card = {"privacy": {"model": {"epsilon": 4.0, "mode": "local"},
                        "audit": {"passed": True, "epsilon_lower": 0.31}},
            "metrics": {"candidate": {"recall@20": 0.2251}, "dp_popularity": {"recall@20": 0.2052},
                        "gains": {"dp_popularity": {"weight": 1.0, "mean": 0.0339, "lower": 0.0324}}},
            "data": {"window": ["2026-01-15"]}}
    (folder / "2026-01-15-r3" / "model_card.json").write_text(json.dumps(card))
    (folder / "2026-01-16-r9").mkdir()  # no card yet: not a published version
    (folder / "LATEST").write_text("2026-01-15-r3\n")
    page = client.get("/privrec/models")
    assert page.status_code == 200
    assert "2026-01-15-r3</a> <b>LATEST</b>" in page.text and "2026-01-16-r9" not in page.text
    assert f"href='{model_card_url('privrec-recommender', '2026-01-15-r3')}'" in page.text
    for text in ("0.2251", "0.2052", "+0.0324", "passed (epsilon &ge; 0.31)", ">4<"):
        assert text in page.text, text
    assert client.get(model_card_url("privrec-recommender", "2026-01-15-r3")).status_code == 200


def test_the_pages_are_in_the_ui_navigation_and_need_a_session(lake):
    from privrec_pipeline.airflow_plugin.plugin import PrivrecPlugin

    views = {v["name"]: v for v in PrivrecPlugin.external_views}
    assert views["Privacy budget"]["href"] == "privrec/budget" and views["Models"]["href"] == "privrec/models"
    assert {v["destination"] for v in views.values()} == {"nav"}
    strict = mounted(create_app(lambda: lake))
    assert strict.get("/privrec/budget").status_code == 401 and strict.get("/privrec/models").status_code == 401


def _data_docs_templates() -> dict[str, str]:
    """The installed Great Expectations' page templates: every CDN address its Data Docs load."""
    from pathlib import Path

    import great_expectations

    folder = Path(great_expectations.__file__).parent / "render" / "view" / "templates"
    return {p.name: p.read_text() for p in folder.glob("*.j2")}


def test_data_docs_load_nothing_from_another_host_through_the_plugin(client):
    """Every script, stylesheet and image address in the installed Data Docs templates is one
    the plugin serves, byte-identical to the CDN's (their integrity hashes match)."""
    import base64
    import hashlib
    import re

    from privrec_pipeline.airflow_plugin import assets

    if not assets.installed():
        unavailable(f"the report assets are not installed in {assets.node_modules()} (make setup runs npm ci)")
    templates = _data_docs_templates()
    external = {u for t in templates.values() for u in assets.external_resources(t)}
    assert len(external) >= 14  # the CDN addresses are found at all
    to_assets = "../../../../assets/"  # a page at /privrec/reports/quality/<day>/data_docs/index.html
    for name, text in templates.items():
        rewritten = assets.rewrite_cdn(text, to_assets)
        assert assets.external_resources(rewritten) == [], name
        for tag in re.finditer(r"<(?:script|link|img)\b[^>]*>", rewritten):
            url = re.search(r"""(?:src|href)=["']([^"'{]+)["']""", tag[0])
            if url is None or not url[1].startswith(to_assets):
                continue
            response = client.get("/privrec/assets/" + url[1][len(to_assets):].split('"')[0])
            assert response.status_code == 200, (name, url[1])
            kind = response.headers["content-type"]
            assert kind.startswith("text/css" if url[1].endswith(".css") else ("image/" if "<img" in tag[0]
                                                                             else "text/javascript")), (url[1], kind)
            integrity = re.search(r'integrity="sha384-([^"]+)"', tag[0])
            if integrity:
                assert base64.b64encode(hashlib.sha384(response.content).digest()).decode() == integrity[1]
    # A stylesheet's fonts come along (Font Awesome's relative url(../webfonts/...)).
    css = client.get("/privrec/assets/npm/@fortawesome/fontawesome-free/css/all.min.css").text
    fonts = set(re.findall(r"url\(\.\./(webfonts/[^)?#]+)\)", css))
    assert fonts and all(client.get(f"/privrec/assets/npm/@fortawesome/fontawesome-free/{f}").status_code == 200
                         for f in fonts)
    # The logo no longer carries the data context's id to Great Expectations' bucket.
    assert assets.local_address(assets.GE_IMAGES + "logo-long.png?d=1234") == "ge/logo-long.png"


def test_served_html_points_at_the_assets_relative_to_the_page(lake, client):
    from privrec_pipeline.airflow_plugin import assets

    if not assets.installed():
        unavailable(f"the report assets are not installed in {assets.node_modules()} (make setup runs npm ci)")
    quality = lk.partition(lake, "reports", DAY)
    cdn = '<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script><a href="https://example.org/">x</a>'
    (quality / "data_docs" / "validations").mkdir(parents=True)
    (quality / "data_docs" / "validations" / "page.html").write_text(cdn)
    page = client.get(report_url("quality", DAY, "data_docs/validations/page.html")).text
    # /privrec/reports/quality/<day>/data_docs/validations/ -> five folders up is /privrec/
    assert '<script src="../../../../../assets/npm/jquery/dist/jquery.min.js">' in page
    assert 'href="https://example.org/"' in page  # links to web sites stay links
    assert client.get("/privrec/assets/npm/jquery/dist/jquery.min.js").text.startswith("/*! jQuery v3.7.1")
    # A redirect keeps the day a folder of the URL, so the page's relative links resolve.
    bare = client.get(report_url("quality", DAY), follow_redirects=False)
    assert bare.status_code == 307 and bare.headers["location"] == "2026-01-15/index.html"


@pytest.mark.parametrize("path", [
    "/privrec/assets/npm/vega/package.json",  # not a served suffix
    "/privrec/assets/npm/d3-array/dist/d3-array.min.js",  # installed, but not a package the Data Docs load
    "/privrec/assets/npm/jquery/../../package-lock.json",
    "/privrec/assets/npm/jquery/..%2F..%2Fpackage-lock.json",
    "/privrec/assets/npm/@fortawesome%2F..%2Fjquery/dist/jquery.min.js",
    "/privrec/assets/npm/",
    "/privrec/assets/ge/..%2F..%2F__init__.py",
    "/privrec/assets/ge/nothing.png",
])
def test_only_the_data_docs_assets_are_served(client, path):
    assert client.get(path).status_code == 404, path
