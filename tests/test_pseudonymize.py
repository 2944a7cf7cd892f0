"""pseudonymize: silver holds keyed pseudonyms and generalized fields, and no PII."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import DAY
from privrec_pipeline import crypto
from privrec_pipeline import lake as lk
from privrec_pipeline.errors import PrivrecError
from privrec_pipeline.ingest import run_collect, run_pseudonymize
from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day
from privrec_pipeline.transforms.generalize import PII_PATTERNS

pytestmark = pytest.mark.spark


def _pii_found(spark, values: list[str]) -> list[tuple[str, str]]:
    """(pattern name, value) for each value a PII pattern finds, matched as Spark does (Java
    regular expressions: the patterns use Java's Unicode classes)."""
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(v,) for v in values], "v string")
    rows = df.select("v", *[F.col("v").rlike(p).alias(k) for k, p in PII_PATTERNS.items()]).collect()
    return [(k, r.v) for r in rows for k in PII_PATTERNS if r[k]]


@pytest.fixture()
def silver_day(spark, lake, keyring):
    report = generate_day(GeneratorConfig(date=DAY, events=4000, users=300, items=150, seed=11, bad_rate=0.02), lake)
    run_collect(spark, lake, DAY, keyring)
    manifest = run_pseudonymize(spark, lake, DAY, keyring)
    return report, manifest


def _landing_records(lake: str) -> list[dict]:
    import gzip

    out = []
    for path in sorted(lk.partition(lake, "landing", DAY).glob("*.jsonl.gz")):
        for raw in gzip.decompress(path.read_bytes()).splitlines():
            try:
                rec = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def test_silver_string_columns_hold_no_pii_and_no_raw_ids(spark, lake, silver_day):
    silver = spark.read.parquet(lk.partition_uri(lake, "silver", DAY))
    string_cols = [f.name for f in silver.schema.fields if f.dataType.simpleString() == "string"]
    values = [v for row in silver.select(*string_cols).collect() for v in row if v is not None]
    assert values, "silver is empty"
    landing = _landing_records(lake)
    raw_ids = {str(r[k]) for r in landing for k in ("user_id", "session_id", "event_id") if isinstance(r.get(k), (str, int))}
    assert any("[email]" in v or "[phone]" in v for v in values), "fixture should exercise scrubbing"
    assert _pii_found(spark, values) == [], "PII pattern found in silver"
    for v in values:
        assert v not in raw_ids
    joined = "\n".join(values)
    for raw in raw_ids:
        assert raw not in joined
    assert {"email", "ip", "user_agent", "user_id", "session_id"}.isdisjoint(silver.columns)


def test_pseudonyms_are_keyed_hmac_with_version(spark, lake, keyring, silver_day):
    silver = spark.read.parquet(lk.partition_uri(lake, "silver", DAY))
    landing = _landing_records(lake)
    expected_users = {crypto.reference_pseudonym(keyring.pseudonym.material, "user", str(r["user_id"]))
                      for r in landing if isinstance(r.get("user_id"), str)}
    got = {r.user_pseudonym for r in silver.select("user_pseudonym").distinct().collect()}
    assert got <= expected_users and len(got) > 50
    assert all(re.fullmatch(r"[0-9a-f]{64}", p) for p in got)
    assert {r.pseudonym_key_version for r in silver.select("pseudonym_key_version").distinct().collect()} == {"v1"}


def test_generalized_fields(spark, lake, silver_day):
    silver = spark.read.parquet(lk.partition_uri(lake, "silver", DAY))
    devices = {r.device_class for r in silver.select("device_class").distinct().collect()}
    assert devices <= {"mobile", "tablet", "desktop", "bot", "unknown"} and {"mobile", "desktop"} <= devices
    assert {r.ip_family for r in silver.select("ip_family").distinct().collect()} <= {"ipv4", "ipv6", "unknown"}


def test_silver_count_matches_bronze(silver_day):
    _, manifest = silver_day
    assert manifest.silver_records == manifest.bronze_records > 0


def test_keys_never_in_any_output(lake, keyring, silver_day):
    secrets = [s.encode() for s in keyring.secret_strings()] + [keyring.pseudonym.material, keyring.encryption.material]
    for path in Path(lake).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s in data for s in secrets), f"key material in {path}"


def test_pseudonymize_requires_collect(spark, lake, keyring):
    with pytest.raises(PrivrecError, match="run the collect step"):
        run_pseudonymize(spark, lake, DAY, keyring)


def test_scrub_text_unit(spark):
    from pyspark.sql import functions as F

    from privrec_pipeline.transforms.generalize import scrub_text

    cases = {
        "mail me at jane.doe+x@mail.example.org now": "mail me at [email] now",
        "call +1 (555) 123-4567": "call [phone]",
        "card 4111 1111 1111 1111 ok": "card [card] ok",
        "from 192.168.1.20": "from [ip]",
        "from 2001:db8::8a2e:370:7334 ok": "from [ip] ok",
        "size 42 shoes": "size 42 shoes",
    }
    df = spark.createDataFrame([(k,) for k in cases], "q string")
    got = {r.q: r.s for r in df.select("q", scrub_text(F.col("q")).alias("s")).collect()}
    assert got == cases


def test_scrub_text_bounds_work_on_hostile_text(spark):
    """Text is cut before the patterns run, so a 2,000-character run of digits, separators
    or local-part characters costs bounded work, and PII starting before the kept length is
    still replaced."""
    from pyspark.sql import functions as F

    from privrec_pipeline.transforms.generalize import MAX_QUERY_CHARS, scrub_text

    edge = "x" * (MAX_QUERY_CHARS - 10) + " jane.doe@mail.example.org"
    hostile = ["1 " * 1000, "a" * 2000 + "@", "9" * 2000 + "z", edge]
    df = spark.createDataFrame([(q,) for q in hostile], "q string")
    got = [r.s for r in df.select(scrub_text(F.col("q")).alias("s")).collect()]
    assert all(len(s) <= MAX_QUERY_CHARS for s in got)
    assert got[0].startswith(("[card]", "[phone]"))
    assert _pii_found(spark, got) == []
    assert got[3] == ("x" * (MAX_QUERY_CHARS - 10) + " [email]")[:MAX_QUERY_CHARS]
    assert "@" not in got[3] and "jane" not in got[3]


def test_manifests_record_key_versions_and_fingerprints(lake, keyring, silver_day):
    collect = json.loads(lk.path(lk.manifest_uri(lake, "collect", DAY)).read_text())
    pseudo = json.loads(lk.path(lk.manifest_uri(lake, "pseudonymize", DAY)).read_text())
    assert (collect["encryption_key_version"], collect["encryption_key_fingerprint"]) == (
        keyring.encryption.version, keyring.encryption.fingerprint)
    assert (pseudo["pseudonym_key_version"], pseudo["pseudonym_key_fingerprint"]) == (
        keyring.pseudonym.version, keyring.pseudonym.fingerprint)
    assert silver_day[1].pseudonym_key_fingerprint == keyring.pseudonym.fingerprint


def test_a_rerun_after_rotation_has_new_pseudonyms_and_never_a_stale_manifest(spark, lake, key_document, keyring,
                                                                                silver_day, tmp_path, monkeypatch):
    import os

    from privrec_pipeline.secrets import ENV_KEY_FILE, load_keyring, rotate_key_file

    path = tmp_path / "keys.json"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
        fh.write(key_document)
    rotate_key_file(path, "pseudonym")
    rotated = load_keyring({ENV_KEY_FILE: str(path)})
    silver_uri, manifest_path = lk.partition_uri(lake, "silver", DAY), lk.path(lk.manifest_uri(lake, "pseudonymize", DAY))
    before = {r.user_pseudonym for r in spark.read.parquet(silver_uri).select("user_pseudonym").distinct().collect()}

    def lost(self, uri, text):
        raise OSError("the task was killed before its manifest was written")

    with monkeypatch.context() as m:  # new silver swapped in, manifest not written
        m.setattr(lk.Lake, "write_manifest", lost)
        with pytest.raises(OSError, match="killed"):
            run_pseudonymize(spark, lake, DAY, rotated)
    # No manifest may name the old key for silver written under the new one: readers refuse the day.
    assert not manifest_path.exists()

    manifest = run_pseudonymize(spark, lake, DAY, rotated)
    after = {r.user_pseudonym for r in spark.read.parquet(silver_uri).select("user_pseudonym").distinct().collect()}
    assert len(after) == len(before) and not after & before  # the same people, all with new pseudonyms
    written = json.loads(manifest_path.read_text())
    assert (written["pseudonym_key_version"], written["pseudonym_key_fingerprint"]) == (
        "v2", rotated.pseudonym.fingerprint) == (manifest.pseudonym_key_version, manifest.pseudonym_key_fingerprint)
    assert rotated.pseudonym.fingerprint != keyring.pseudonym.fingerprint
