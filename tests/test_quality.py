"""validate: the quality gate stops the run on each critical expectation, warnings only
report, reports hold no identifiers or failing values, and the trend page renders."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import DAY, unavailable
from privrec_pipeline import lake as lk
from privrec_pipeline.errors import ConfigurationError, QualityGateFailed
from privrec_pipeline.ingest import run_collect, run_pseudonymize
from privrec_pipeline.quality.config import QualityConfig
from privrec_pipeline.quality.history import row_count_bounds
from privrec_pipeline.quality.suites import resolve_suite, suite_parameters
from privrec_pipeline.quality.validate import run_validate
from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

pytestmark = pytest.mark.spark
EMAIL = "jane.doe.quality@example.org"
RAW_ID = "usr_0123456789ab"


@pytest.fixture(scope="module")
def clean_lake(spark, tmp_path_factory, keyring) -> Path:
    """One generated day through collect and pseudonymize (the reference for every case)."""
    root = tmp_path_factory.mktemp("quality") / "lake"
    generate_day(GeneratorConfig(date=DAY, events=1500, users=120, items=80, seed=11, bad_rate=0.01), str(root))
    run_collect(spark, str(root), DAY, keyring)
    run_pseudonymize(spark, str(root), DAY, keyring)
    return root


@pytest.fixture()
def day_lake(clean_lake, tmp_path) -> Path:
    """A private copy of the clean lake, for a test to break."""
    target = tmp_path / "lake"
    shutil.copytree(clean_lake, target)
    return target


def _rewrite_silver(spark, lake: Path, change: Callable) -> None:
    from pyspark.sql import functions as F

    uri = lk.partition_uri(str(lake), "silver", DAY)
    df = spark.read.parquet(uri).withColumn("_row", F.monotonically_increasing_id())
    changed = change(df, F).drop("_row")
    rows, schema = changed.toPandas(), changed.schema  # materialized before the folder is replaced
    shutil.rmtree(uri)
    spark.createDataFrame(rows, schema=schema).write.parquet(uri)


def _first(df, F, column: str, value):
    first_row = df.agg(F.min("_row")).first()[0]
    return df.withColumn(column, F.when(F.col("_row") == first_row, value).otherwise(F.col(column)))


def _edit_manifest(lake: Path, **changes: int) -> None:
    path = lk.path(lk.manifest_uri(str(lake), "collect", DAY))
    doc = json.loads(path.read_text())
    for key, delta in changes.items():
        doc[key] += delta
    path.write_text(json.dumps(doc))


def _validate(spark, lake: Path, **settings):
    return run_validate(spark, str(lake), DAY, QualityConfig.from_settings(settings))


def test_clean_day_passes_and_writes_reports(spark, day_lake):
    summary = _validate(spark, day_lake)
    assert summary.gate == "passed" and summary.failed_critical == [] and summary.failed_warning == []
    report = lk.path(lk.partition_uri(str(day_lake), "reports", DAY))
    saved = json.loads((report / "summary.json").read_text())
    assert saved["gate"] == "passed" and saved["rows"] == summary.rows > 1000
    assert summary.rows == spark.read.parquet(lk.partition_uri(str(day_lake), "silver", DAY)).count()
    assert {e["id"] for e in saved["expectations"]} >= {"event_id.unique", "pii.search_query", "quarantine.rate"}
    assert all(e["severity"] in ("critical", "warning") and "success" in e for e in saved["expectations"])
    assert (report / "index.html").exists() and (report / "data_docs" / "index.html").exists()
    # Both suites' validation pages, privrec's own expectations described in words.
    pages = {p.parent.parent.parent.name: p.read_text() for p in (report / "data_docs" / "validations").rglob("*.html")}
    assert set(pages) == {"silver", "collect"}
    assert "lowercase hexadecimal characters" in pages["silver"] and "values must be unique" in pages["silver"]
    assert "values must not match any of these regular expressions" in pages["silver"]
    assert "(**{" not in pages["silver"]  # Great Expectations' fallback: the raw kwargs


# Each case breaks exactly one critical expectation: (id, how to break it).
def _extra_column(df, F):
    return df.withColumn("email", F.lit(None).cast("string"))


CASES: dict[str, Callable] = {
    "schema.columns": lambda spark, lake: _rewrite_silver(spark, lake, _extra_column),
    "schema.type.quantity": lambda spark, lake: _rewrite_silver(
        spark, lake, lambda df, F: df.withColumn("quantity", F.col("quantity").cast("int"))),
    "not_null.item_id": lambda spark, lake: _rewrite_silver(
        spark, lake, lambda df, F: _first(df, F, "item_id", F.lit(None).cast("string"))),
    "event_type.allowed": lambda spark, lake: _rewrite_silver(
        spark, lake, lambda df, F: _first(df, F, "event_type", F.lit("refund"))),
    "event_time.in_interval": lambda spark, lake: _rewrite_silver(
        spark, lake, lambda df, F: _first(df, F, "event_time", F.col("event_time") + F.expr("INTERVAL 2 DAYS"))),
    "pseudonym.format.user_pseudonym": lambda spark, lake: _rewrite_silver(
        spark, lake, lambda df, F: _first(df, F, "user_pseudonym", F.upper("user_pseudonym"))),
    "pii.search_query": lambda spark, lake: _rewrite_silver(
        spark, lake, lambda df, F: _first(df, F, "search_query", F.lit(f"contact {EMAIL} today"))),
    "raw_id.category": lambda spark, lake: _rewrite_silver(
        spark, lake, lambda df, F: _first(df, F, "category", F.lit(RAW_ID))),
    "event_id.unique": lambda spark, lake: _rewrite_silver(
        spark, lake, lambda df, F: df.withColumn(
            "event_id", F.when(F.col("_row") == df.agg(F.max("_row")).first()[0],
                               F.lit(df.orderBy("_row").first()["event_id"])).otherwise(F.col("event_id")))),
    "collect.balance": lambda spark, lake: _edit_manifest(lake, duplicates=1),
    "bronze.count": lambda spark, lake: _edit_manifest(lake, bronze_records=1, landing_records=1),
    "silver.count": lambda spark, lake: _rewrite_silver(
        spark, lake, lambda df, F: df.where(F.col("_row") != df.agg(F.min("_row")).first()[0])),
}


@pytest.mark.parametrize("expectation", sorted(CASES))
def test_each_critical_expectation_stops_the_run(spark, day_lake, expectation):
    CASES[expectation](spark, day_lake)
    with pytest.raises(QualityGateFailed) as failed:
        _validate(spark, day_lake)
    message = str(failed.value)
    assert f"- {expectation} (" in message
    assert message.count("\n  - ") == 1, message  # exactly this one
    summary = json.loads((lk.path(lk.partition_uri(str(day_lake), "reports", DAY)) / "summary.json").read_text())
    assert summary["gate"] == "failed" and summary["failed_critical"] == [expectation]
    assert "full report: " in message and message.rstrip().endswith("index.html")


def test_quarantine_rate_threshold_stops_the_run(spark, day_lake):
    with pytest.raises(QualityGateFailed, match=r"- quarantine\.rate \(.*observed_value="):
        _validate(spark, day_lake, quarantine_rate_max=0.001)


def test_row_count_spike_against_trailing_days_stops_the_run(spark, day_lake):
    reports = lk.path(lk.zone_uri(str(day_lake), "reports"))
    for back in range(1, 5):  # four passed days with 100x today's rows
        day = DAY - dt.timedelta(days=back)
        (reports / lk.partition_name(day)).mkdir(parents=True)
        (reports / lk.partition_name(day) / "summary.json").write_text(
            json.dumps({"date": day.isoformat(), "gate": "passed", "rows": 150_000}))
    with pytest.raises(QualityGateFailed) as failed:
        _validate(spark, day_lake)
    assert "- row_count.trailing (" in str(failed.value) and "observed_value=1,4" in str(failed.value)


def test_warnings_report_but_do_not_stop_the_run(spark, day_lake):
    _rewrite_silver(spark, day_lake, lambda df, F: _first(df, F, "price", F.lit(1e9)))
    summary = _validate(spark, day_lake)
    assert summary.gate == "passed" and summary.failed_warning == ["price.range"]
    # a severity override turns the same finding into a gate
    with pytest.raises(QualityGateFailed, match=r"price\.range"):
        _validate(spark, day_lake, severity={"price.range": "critical"})


def test_reports_hold_no_identifier_or_failing_value(spark, day_lake):
    _rewrite_silver(spark, day_lake, lambda df, F: _first(df, F, "search_query", F.lit(f"mail {EMAIL} {RAW_ID}")))
    with pytest.raises(QualityGateFailed, match=r"pii\.search_query"):
        _validate(spark, day_lake)
    reports = lk.path(lk.zone_uri(str(day_lake), "reports"))
    files = [p for p in reports.rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        data = path.read_bytes()
        for needle in (EMAIL, "jane.doe.quality", RAW_ID):
            assert needle.encode() not in data, f"{needle} in {path}"


def test_pii_in_other_scripts_and_full_width_forms_stops_the_run(spark, day_lake):
    """Silver values holding PII outside ASCII fail the PII scan: a full-width phone number in
    the (scrubbed) search text, a non-Latin email in an unscrubbed column."""
    _rewrite_silver(spark, day_lake, lambda df, F: _first(
        _first(df, F, "search_query", F.lit("ruf ＋４９ ３０ １２３４５６７８ an")), F, "category", F.lit("用户@例子.中国")))
    with pytest.raises(QualityGateFailed):
        _validate(spark, day_lake)
    summary = json.loads((lk.path(lk.partition_uri(str(day_lake), "reports", DAY)) / "summary.json").read_text())
    assert sorted(summary["failed_critical"]) == ["pii.category", "pii.search_query"]


def test_hex_digest_check_agrees_with_the_pseudonym_regex(spark):
    """The regex-free pseudonym check accepts exactly the strings ``[0-9a-f]{64}`` matches."""
    import random
    import re

    from privrec_pipeline.quality.expectations import hex_digest_condition

    rng = random.Random(5)
    digest = "0123456789abcdef" * 4
    values = [digest, digest.upper(), digest[:63], digest + "0", digest[:63] + "g", digest[:63] + "\n",
              digest + "\n", " " + digest[:63], digest[:62] + "0x", digest[:63] + "é", digest[:62] + "é",
              digest[:63] + "\uff10", digest[:63] + "\u0660", digest[:60] + "A0b1", "", "é" * 32]
    alphabet = "0123456789abcdefABCDEFgxz -\n\té\uff10"
    for _ in range(400):  # random hex strings near the length, half with one foreign character
        chars = [rng.choice(alphabet[:16]) for _ in range(rng.choice([62, 63, 64, 64, 64, 65]))]
        if rng.random() < 0.5:
            chars[rng.randrange(len(chars))] = rng.choice(alphabet[16:])
        values.append("".join(chars))
    df = spark.createDataFrame([(v,) for v in values], "v string")
    from pyspark.sql import functions as F

    got = [r[0] for r in df.select(hex_digest_condition(F.col("v"), 64)).collect()]
    expected = [re.fullmatch(r"[0-9a-f]{64}", v) is not None for v in values]
    assert got == expected
    assert 50 < sum(expected) < len(values) - 50  # both outcomes well represented


def test_pii_prefilter_skips_only_values_the_pii_regex_cannot_match(spark):
    """The PII check runs the email regex only on ASCII values with '@', the IPv6 regex only
    on ASCII values with ':', the phone, card and IPv4 regexes only on ASCII values with a
    digit, and every regex on the NFKC form of other values; on PII and near-PII text (other
    scripts' digits, full-width forms, at-signs) it agrees with one regex of all patterns
    over the NFKC form of every value (Python's unicodedata as the reference)."""
    import random
    import unicodedata

    from pyspark.sql import functions as F

    from privrec_pipeline.quality.expectations import prefiltered_match_condition
    from privrec_pipeline.quality.suites import PII_NORMALIZATION, PII_PATTERNS, PII_SCAN

    rng = random.Random(9)
    pii = ["jane.doe@example.org", "+1 (555) 123-4567", "4111 1111 1111 1111", "10.0.0.1", "a@b.co",
           "call 0611234567", "555.123.4567", *[digit * 8 for digit in "0123456789"],  # each digit alone
           "2001:db8::1:2", "fe80::abcd:12", "jane.doe\uff20example.org", "jürgen.müller@bücher.de", "用户@例子.中国",
           "\u0665\u0665\u0665\u0661\u0662\u0663\u0664\u0665\u0666\u0667", "\uff11\uff10.\uff10.\uff10.\uff11",
           "\uff0b\uff14\uff19 \uff13\uff10 \uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18",
           "\u096f\u096e\u096d\u096c\u096b\u096a\u0969\u0968", "\uff14\uff11\uff11\uff11-1111-1111-1111"]
    lookalikes = ["itm_000557", "kitchen", "pro movies gift", "ab@", "@@", "x" * 300, "", "é" * 50,
                  "Grüße aus München", "price 12.50", "2024-01-15", "\u0662\u0660\u0662\u0664", "std::vector",
                  "10:30", "\uff1a\uff1a", "東京"]
    values = []
    for _ in range(700):
        words = [rng.choice(lookalikes) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), rng.choice(pii))
        if rng.random() < 0.3:  # damage one character
            text = list(" ".join(words) or "x")
            text[rng.randrange(len(text))] = rng.choice("@0 .-:\uff20\u0665é\uff10\uff1a")
            words = ["".join(text)]
        values.append(" ".join(words))
    df = spark.createDataFrame([(v, unicodedata.normalize("NFKC", v)) for v in values], "v string, n string")
    assert {p["regex"] for p in PII_SCAN} == set(PII_PATTERNS.values())
    union = "|".join(f"(?:{p})" for p in PII_PATTERNS.values())
    rows = df.select(prefiltered_match_condition(F.col("v"), PII_SCAN, PII_NORMALIZATION).alias("fast"),
                     F.col("n").rlike(union).alias("regex")).collect()
    assert [r["fast"] for r in rows] == [r["regex"] for r in rows]
    no_prefilter = [{"regex": p["regex"], "required_chars": ""} for p in PII_SCAN]
    unfiltered = df.select(prefiltered_match_condition(F.col("n"), no_prefilter).alias("m")).collect()
    assert [r["m"] for r in unfiltered] == [r["regex"] for r in rows]
    assert 100 < sum(r["regex"] for r in rows) < 600
    assert sum(r["regex"] and not v.isascii() for r, v in zip(rows, values)) > 50  # the normalized path


@pytest.mark.parametrize("hashes_on", ["driver", "spark"])
def test_duplicate_rows_are_exact_under_hash_collisions(spark, monkeypatch, hashes_on):
    from pyspark.sql import functions as F

    from privrec_pipeline.quality import expectations

    values = ["aa", "ab", "ab", "ba", "bb", "bb", "bb", "ccc", None, None]
    df = spark.createDataFrame([(v,) for v in values], "v string")
    rows = len(values)
    if hashes_on == "spark":  # a day over the driver's limit
        monkeypatch.setattr(expectations, "DRIVER_HASH_MAX_ROWS", rows - 1)
    arrow_calls = []
    to_arrow = type(df).toArrow
    monkeypatch.setattr(type(df), "toArrow", lambda self: arrow_calls.append(1) or to_arrow(self))
    assert expectations.duplicate_rows(df, "v", rows) == 5  # the real hash: 2 x "ab", 3 x "bb"; nulls ignored
    # A hash that collides on every equal length: only the exact pass can tell "aa" from "ab".
    assert expectations.duplicate_rows(df, "v", rows, hash_fn=F.length) == 5
    monkeypatch.setattr(expectations, "MAX_SUSPECT_HASHES", 0)  # too many suspects: all rows grouped
    assert expectations.duplicate_rows(df, "v", rows, hash_fn=F.length) == 5
    assert expectations.duplicate_rows(df.where("v != 'bb' and v != 'ab'"), "v", rows, hash_fn=F.length) == 0
    assert bool(arrow_calls) == (hashes_on == "driver")


def test_duplicate_check_counts_the_rows_of_duplicated_ids(spark, day_lake):
    def duplicate(df, F):  # the first id three times, the second twice
        rows = sorted(r["_row"] for r in df.select("_row").collect())
        first, second = (df.where(F.col("_row") == rows[i]).first()["event_id"] for i in (0, 1))
        return df.withColumn("event_id", F.when(F.col("_row").isin(rows[-2:]), F.lit(first))
                             .when(F.col("_row") == rows[-3], F.lit(second)).otherwise(F.col("event_id")))

    _rewrite_silver(spark, day_lake, duplicate)
    with pytest.raises(QualityGateFailed, match=r"event_id\.unique"):
        _validate(spark, day_lake)
    summary = json.loads((lk.path(lk.partition_uri(str(day_lake), "reports", DAY)) / "summary.json").read_text())
    unique = next(e for e in summary["expectations"] if e["id"] == "event_id.unique")
    assert unique["observed"]["observed_value"] == 5


def test_bad_settings_are_clear_errors(spark, day_lake):
    with pytest.raises(ConfigurationError, match="unknown quality setting"):
        QualityConfig.from_settings({"quarantine_rate": 0.1})
    with pytest.raises(ConfigurationError, match="quarantine_rate_max must be int or float"):
        QualityConfig.from_settings({"quarantine_rate_max": "high"})
    with pytest.raises(ConfigurationError, match="severity overrides name unknown expectations"):
        _validate(spark, day_lake, severity={"pii.no_such_column": "warning"})


def test_row_count_bounds_follow_the_history():
    config = QualityConfig()
    assert row_count_bounds([], config).min_value == 1 and row_count_bounds([], config).max_value is None
    assert row_count_bounds([], config, allow_empty=True).min_value == 0
    short = row_count_bounds([1000], config)
    assert (short.min_value, short.max_value) == (50, 20_000)  # wide factor 20 while history is short
    full = row_count_bounds([900, 1000, 1100, 5000], config)
    assert (full.min_value, full.max_value) == (350, 3150)  # median 1050, factor 3


def test_suite_declarations_resolve():
    params = suite_parameters(QualityConfig(), DAY, row_count_bounds([], QualityConfig()))
    silver = resolve_suite("silver", params, QualityConfig())
    ids = [s.id for s in silver]
    assert len(ids) == len(set(ids))
    assert "schema.type.event_time" in ids and "pseudonym.format.session_pseudonym" in ids
    event_time = next(s for s in silver if s.id == "event_time.in_interval")
    assert event_time.kwargs["min_value"] == dt.datetime(2026, 1, 15, tzinfo=dt.UTC)
    exempt = resolve_suite("silver", suite_parameters(QualityConfig(pii_exempt_columns=("item_id",)), DAY,
                                                      row_count_bounds([], QualityConfig())), QualityConfig())
    assert "pii.item_id" in ids and "pii.item_id" not in [s.id for s in exempt]


def test_trend_report_renders_for_several_days(spark, tmp_path, keyring):
    """Three validated days -> ``privrec report quality`` -> a page a browser shows readably."""
    from typer.testing import CliRunner

    from privrec_pipeline.browser import chromium_path, screenshot
    from privrec_pipeline.cli import app

    lake = tmp_path / "lake"
    days = [DAY + dt.timedelta(days=i) for i in range(3)]
    for i, day in enumerate(days):
        generate_day(GeneratorConfig(date=day, events=400, users=50, items=30, seed=i, bad_rate=0.05), str(lake))
        run_collect(spark, str(lake), day, keyring)
        run_pseudonymize(spark, str(lake), day, keyring)
        run_validate(spark, str(lake), day, QualityConfig(quarantine_rate_max=0.5))
    result = CliRunner().invoke(app, ["report", "quality", "--lake", str(lake), "--from", days[0].isoformat(),
                                      "--to", (days[-1] + dt.timedelta(days=1)).isoformat()])
    assert result.exit_code == 0, result.output
    page = lk.path(lk.zone_uri(str(lake), "reports")) / "trend.html"
    assert f"trend report: {page}" in result.output.replace("\n", "")
    assert "no summary for 1 day(s)" in result.output
    text = page.read_text()
    assert text.count("<svg") == 4 and all(d.isoformat() in text for d in days)
    assert text.count("day report</a>") == 3 and "dt=2026-01-16/index.html" in text
    if chromium_path() is None:
        unavailable("Chromium not installed (make setup installs it where apt-get is available)")
    facts = screenshot(page.as_uri(), tmp_path / "trend.png")
    assert facts["title"].startswith("privrec data quality")
    assert "Quarantine rate by reason" in facts["text"] and "2026-01-17" in facts["text"]
    assert facts["scroll_width"] <= 1200  # no horizontal scrolling at a laptop width
    assert len(facts["charts"]) == 4
    assert all(box and box["width"] > 600 and box["height"] > 150 for box in facts["charts"])
    assert (tmp_path / "trend.png").stat().st_size > 20_000


def test_data_docs_work_offline_through_the_airflow_plugin(spark, day_lake, tmp_path):
    """The Data Docs as the Airflow plugin serves them, in Chromium with every request to
    another host refused: nothing is asked of another host, nothing fails, and the scripts
    (jQuery, bootstrap-table, Vega) and Font Awesome's font are there."""
    import socket
    import threading

    import uvicorn
    from fastapi import FastAPI
    from playwright.sync_api import sync_playwright

    from privrec_pipeline.airflow_plugin import assets
    from privrec_pipeline.airflow_plugin.app import PREFIX, create_app, report_url
    from privrec_pipeline.browser import chromium_path

    assert _validate(spark, day_lake).gate == "passed"
    if not assets.installed():
        unavailable(f"the report assets are not installed in {assets.node_modules()} (make setup runs npm ci)")
    if chromium_path() is None:
        unavailable("Chromium not installed (make setup installs it where apt-get is available)")
    server = FastAPI()
    server.mount(PREFIX, create_app(lambda: str(day_lake), reader=lambda: None))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connections queue until the server accepts them: no start-up wait
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv = uvicorn.Server(uvicorn.Config(server, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    report = lk.path(lk.partition_uri(str(day_lake), "reports", DAY))
    validation = next((report / "data_docs" / "validations").rglob("*.html")).relative_to(report).as_posix()
    outside, failed, errors = [], [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                       else (outside.append(route.request.url), route.abort()))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            for name, file in (("data-docs-index", "data_docs/index.html"), ("data-docs-validation", validation)):
                page.goto(base + report_url("quality", DAY, file), wait_until="networkidle")
                assert page.evaluate("typeof jQuery.fn.bootstrapTable") == "function", name
                assert page.evaluate("typeof vegaEmbed") == "function", name
                assert page.evaluate("document.fonts.check('900 16px \"Font Awesome 6 Free\"')"), name
                page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
            page.goto(base + report_url("quality", DAY, "data_docs/index.html"), wait_until="networkidle")
            assert page.locator(".bootstrap-table").count() >= 1  # the index's table was built by its script
            browser.close()
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
    assert outside == [] and failed == [] and errors == [], (outside, failed, errors)


@pytest.mark.parametrize("args, message", [
    (["--config-json", "{bad"], "--config-json is not JSON"),
    (["--config-json", "[1]"], "--config-json must be a JSON object"),
    (["--set", "quarantine_rate_max=high"], "quarantine_rate_max must be int or float"),
    (["--set", "no_such_setting=1"], "unknown quality setting"),
])
def test_validate_job_rejects_bad_settings_before_starting_spark(args, message, capsys):
    import runpy
    import sys

    from privrec_pipeline.config import JOBS_DIR

    sys.path.insert(0, str(JOBS_DIR))
    try:
        job = runpy.run_path(str(JOBS_DIR / "validate.py"), run_name="privrec_validate_job")
    finally:
        sys.path.remove(str(JOBS_DIR))
    with pytest.raises(SystemExit) as exited:
        job["main"](["--date", DAY.isoformat(), *args])
    assert exited.value.code == 2 and message in capsys.readouterr().err
