"""collect: every malformed kind lands in quarantine with its reason; nothing is lost."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from conftest import DAY, good_event, line, partition_snapshot, row_keys, write_landing
from privrec_pipeline import lake as lk
from privrec_pipeline.errors import ConfigurationError, LandingPartitionError, ManifestMismatchError
from privrec_pipeline.ingest import run_collect
from privrec_pipeline.manifest import CollectManifest
from privrec_pipeline.schema import MAX_RECORD_BYTES, QUARANTINE_REASONS
from privrec_pipeline.transforms import collect as tc

pytestmark = pytest.mark.spark

# One line per case: (expected reason, expected detail, raw line).
CASES: list[tuple[str, str | None, bytes]] = [
    ("invalid_utf8", None, line(good_event(100))[:-2] + b"\xff\xfe\"}"),
    ("oversize_record", None, line(good_event(101, search_query="q" * (MAX_RECORD_BYTES + 1)))),
    ("malformed_json", None, line(good_event(102))[:40]),
    ("malformed_json", None, b""),
    ("malformed_json", None, b"not json at all"),
    ("not_an_object", "ARRAY", b'["evt-103", "usr_1"]'),
    ("not_an_object", "STRING", b'"just a string"'),
    ("missing_field", "user_id", line(good_event(104, user_id=None))),
    ("missing_field", "event_id", line(good_event(105, event_id=None))),
    ("missing_field", "item_id", line({**good_event(106), "item_id": None})),
    ("wrong_type", "price", line(good_event(107, price="abc"))),
    ("wrong_type", "price", line(good_event(108, price=True))),
    ("wrong_type", "quantity", line(good_event(109, quantity=1.5))),
    ("wrong_type", "user_id", line(good_event(110, user_id={"id": 1}))),
    ("wrong_type", "event_type", line(good_event(111, event_type=3))),
    ("wrong_type", "search_query", line(good_event(112, search_query=["a", "b"]))),
    ("bad_timestamp", "event_time", line(good_event(113, event_time="2026-13-45T99:00:00Z"))),
    ("bad_timestamp", "event_time", line(good_event(114, event_time=f"{DAY}T10:00:00"))),  # no zone
    ("bad_timestamp", "event_time", line(good_event(115, event_time="yesterday"))),
    ("oversize_field", "user_agent", line(good_event(116, user_agent="A" * 5000))),
    ("unknown_event_type", "event_type", line(good_event(117, event_type="click"))),
    ("unknown_event_type", "event_type", line(good_event(118, event_type="VIEW"))),
    ("event_time_outside_interval", "event_time", line(good_event(119, event_time=f"{DAY - dt.timedelta(days=1)}T23:59:59Z"))),
    ("event_time_outside_interval", "event_time", line(good_event(120, event_time=f"{DAY}T23:30:00-02:00"))),
]
VALID = [line(good_event(i)) for i in range(30)]
# Accepted edge cases: numeric ids, a zone offset that stays inside the day, a query that
# starts with a bracket (suspect, then cleared by the precise parser), unknown extra fields.
ACCEPTED_EDGES = [
    line(good_event(200, user_id=12345, item_id=77)),
    line(good_event(201, event_time=f"{DAY}T01:00:00+01:00")),  # 00:00 UTC: first instant
    line(good_event(202, search_query="[sale] {shoes}")),
    line(good_event(205, event_id="1234e5678", email=None, search_query=None) | {"ip": None}),  # suspect id, nulls
    line({**good_event(203), "extra_field": {"nested": True}}),
    line(good_event(204, event_type="rating", rating=4.5, price=None, quantity=None)),
]
DUPLICATES = [VALID[0], VALID[1], VALID[1]]  # 3 extra records of 2 event ids


def _expected_landing() -> list[bytes]:
    return VALID + ACCEPTED_EDGES + [raw for _, _, raw in CASES] + DUPLICATES


@pytest.fixture()
def collected(spark, lake, keyring):
    write_landing(lake, DAY, _expected_landing())
    return run_collect(spark, lake, DAY, keyring, run_id="test")


def test_every_malformed_kind_is_quarantined_with_its_reason(spark, lake, collected):
    q = spark.read.parquet(lk.partition_uri(lake, "quarantine", DAY))
    got = sorted((r.reason, r.detail) for r in q.select("reason", "detail").collect())
    want = sorted((reason, detail) for reason, detail, _ in CASES if reason != "oversize_record")
    oversize = [r for r in got if r[0] == "oversize_record"]
    assert [r for r in got if r[0] != "oversize_record"] == want
    assert len(oversize) == 1
    # The cases cover every reason (unknown_item needs a catalog: tested below).
    assert set(r for r, _, _ in CASES) | {"unknown_item"} == set(QUARANTINE_REASONS)


def test_with_a_catalog_unknown_items_are_quarantined_or_kept_by_the_setting(spark, lake, keyring):
    import pyarrow as pa

    from privrec_pipeline import catalog as cat

    # The catalog lists itm_0000 .. itm_0011; good_event(i) uses itm_{i % 13}: i = 12 and 25 are unknown.
    cat.write_snapshot(lake, DAY, pa.table({"item_id": [f"itm_{k:04d}" for k in range(12)],
                                            "category": ["books"] * 12}), "test")
    bad_and_unknown = line(good_event(300, event_type="click", item_id="itm_0012"))  # first reason wins
    write_landing(lake, DAY, [line(good_event(i)) for i in range(26)] + [bad_and_unknown])
    manifest = run_collect(spark, lake, DAY, keyring, run_id="test")
    assert manifest.quarantined["unknown_item"] == 2 and manifest.quarantined["unknown_event_type"] == 1
    assert manifest.bronze_records == 24 and manifest.unknown_items == "quarantine"
    assert manifest.catalog["sha256"] == cat.snapshot_for(lake, DAY).sha256
    q = spark.read.parquet(lk.partition_uri(lake, "quarantine", DAY)).where("reason = 'unknown_item'")
    assert sorted(r.detail for r in q.collect()) == ["item_id", "item_id"]
    assert q.where("raw_record_enc is null").count() == 0  # the raw line is kept (encrypted)
    kept = run_collect(spark, lake, DAY, keyring, run_id="test", unknown_items="keep")
    assert kept.quarantined["unknown_item"] == 0 and kept.bronze_records == 26
    with pytest.raises(ConfigurationError, match="unknown_items must be one of"):
        run_collect(spark, lake, DAY, keyring, unknown_items="drop")


def test_manifest_balances_and_counts_duplicates(collected):
    n_cases = len(CASES)
    assert collected.landing_records == len(_expected_landing())
    assert collected.quarantined_total == n_cases
    assert collected.duplicates == 3
    assert collected.bronze_records == len(VALID) + len(ACCEPTED_EDGES)
    collected.check_balance()


def test_manifest_is_written_last_and_readable(lake, collected):
    doc = json.loads(lk.path(lk.manifest_uri(lake, "collect", DAY)).read_text())
    assert doc["balanced"] is True and doc["landing_records"] == collected.landing_records
    assert doc["quarantined"]["wrong_type"] == sum(1 for r, _, _ in CASES if r == "wrong_type")


def test_bronze_holds_direct_identifiers_only_encrypted(spark, lake, collected, keyring):
    """Sealed twice: AES-GCM under the encryption key, then under the user's own data key,
    named by the row's ``data_key`` (the user's keyed fingerprint); neither key alone opens it."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from privrec_pipeline.erasure.requests import fingerprint, open_register

    bronze = spark.read.parquet(lk.partition_uri(lake, "bronze", DAY))
    assert {"email", "ip", "user_agent", "search_query"}.isdisjoint(bronze.columns)
    text = " ".join(str(v) for row in bronze.collect() for v in row)
    assert "@example.com" not in text and "10.0." not in text
    row = bronze.where("event_id = 'evt-000003'").first()
    blob, aad = bytes(row.identifiers_enc), b"identifiers|evt-000003"
    assert row.data_key == fingerprint(keyring.encryption.material, "usr_0003")
    plain = row_keys(lake, keyring).open(row.enc_key_version, row.data_key, blob, aad)
    assert json.loads(plain) == {k: good_event(3)[k] for k in ("email", "ip", "user_agent", "search_query")}
    with pytest.raises(InvalidTag):  # the encryption key alone
        AESGCM(keyring.encryption.material).decrypt(blob[:12], blob[12:], aad)
    dek = open_register(lake).data_keys.lookup(keyring, "v1", [row.data_key])[row.data_key]
    inner = AESGCM(dek).decrypt(blob[:12], blob[12:], aad)
    with pytest.raises(InvalidTag):  # the data key alone leaves a ciphertext under the encryption key
        AESGCM(dek).decrypt(inner[:12], inner[12:], aad)
    users = {r.user_id: r.data_key for r in bronze.select("user_id", "data_key").distinct().collect()}
    assert len(set(users.values())) == len(users) == 8  # one data key per user


def test_numeric_ids_and_edge_cases_are_accepted(spark, lake, collected):
    bronze = spark.read.parquet(lk.partition_uri(lake, "bronze", DAY))
    row = bronze.where("event_id = 'evt-000200'").first()
    assert (row.user_id, row.item_id) == ("12345", "77")
    first = bronze.where("event_id = 'evt-000201'").first()
    assert first.event_time == dt.datetime(2026, 1, 15, 0, 0)  # UTC, session time zone
    assert bronze.where("event_id = 'evt-000204'").first().rating == 4.5


def test_quarantine_keeps_raw_line_encrypted_with_source_file(spark, lake, collected, keyring):
    q = spark.read.parquet(lk.partition_uri(lake, "quarantine", DAY))
    rows = q.collect()
    assert list(q.columns) == list(tc.QUARANTINE_COLUMNS)
    assert all(r.source_file.endswith("events-000.jsonl") for r in rows)
    keys = row_keys(lake, keyring)
    raws = {keys.open(r.enc_key_version, r.data_key, bytes(r.raw_record_enc),
                      tc.raw_record_aad(r.source_file, r.record_position)) for r in rows}
    assert {raw for _, _, raw in CASES} == raws
    # A line with a user id is sealed under that user's data key; a line without one cannot be.
    keyed = {r.data_key is not None for r in rows if r.reason == "malformed_json"}
    assert keyed == {False}
    assert all(r.data_key is not None for r in rows if r.reason in ("unknown_event_type", "wrong_type"))
    assert "@example.com" not in " ".join(str(v) for r in rows for v in r)


def test_quarantine_ciphertexts_are_bound_to_their_row(spark, lake, keyring):
    """Equal bad lines at two places get different ciphertexts, each decrypts back to the
    line with its own row's associated data, and a ciphertext swapped with another row's or
    moved to another file fails to decrypt."""
    from cryptography.exceptions import InvalidTag

    bad, other = b"not json at all", line(good_event(7, price="abc"))
    write_landing(lake, DAY, [line(good_event(1)), bad, line(good_event(2)), bad, other])
    write_landing(lake, DAY, [bad, line(good_event(3))], name="events-001.jsonl")
    run_collect(spark, lake, DAY, keyring)
    rows = spark.read.parquet(lk.partition_uri(lake, "quarantine", DAY)).collect()
    keys = row_keys(lake, keyring)

    def decrypt(blob: bytes, row, place=None) -> bytes:
        return keys.open(row.enc_key_version, row.data_key, blob, place or tc.raw_record_aad(row.source_file,
                                                                                                row.record_position))

    assert len(rows) == 4
    assert len({bytes(r.raw_record_enc) for r in rows}) == 4  # three equal lines, three ciphertexts
    assert sorted(decrypt(bytes(r.raw_record_enc), r) for r in rows) == sorted([bad, bad, bad, other])
    assert len({(r.source_file, r.record_position) for r in rows}) == 4
    for a in rows:
        for b in rows:
            if a is not b:  # b's ciphertext in a's row: swapped equal lines included
                with pytest.raises(InvalidTag):
                    decrypt(bytes(b.raw_record_enc), a)
    first, second = sorted({r.source_file for r in rows})
    for moved in (r for r in rows if r.source_file == first):  # the keyed line and the unkeyed ones
        with pytest.raises(InvalidTag):  # the same position in the other file
            decrypt(bytes(moved.raw_record_enc), moved, tc.raw_record_aad(second, moved.record_position))
        with pytest.raises(InvalidTag):  # the file alone no longer opens it
            decrypt(bytes(moved.raw_record_enc), moved, f"raw_record|{moved.source_file}".encode())


def test_rerun_gives_identical_outputs(spark, lake, keyring, collected):
    zones = [lk.path(lk.partition_uri(lake, z, DAY)) for z in ("bronze", "quarantine")]
    before = [partition_snapshot(z) for z in zones]
    again = run_collect(spark, lake, DAY, keyring, run_id="rerun")
    assert [partition_snapshot(z) for z in zones] == before
    assert again.bronze_records == collected.bronze_records
    leftovers = [p.name for z in zones for p in z.parent.iterdir() if p.name.startswith("_")]
    assert leftovers == []  # no staging or replaced folders remain


def test_missing_landing_partition_fails_naming_path_and_date(spark, lake, keyring):
    with pytest.raises(LandingPartitionError) as err:
        run_collect(spark, lake, DAY, keyring)
    assert str(DAY) in str(err.value) and "landing/interactions/dt=2026-01-15" in str(err.value)


def test_empty_landing_partition_fails_unless_allowed(spark, lake, keyring):
    part = lk.partition(lake, "landing", DAY)
    part.mkdir(parents=True)
    (part / "events-000.jsonl").write_bytes(b"")
    with pytest.raises(LandingPartitionError, match="empty"):
        run_collect(spark, lake, DAY, keyring)
    manifest = run_collect(spark, lake, DAY, keyring, allow_empty=True)
    assert (manifest.landing_records, manifest.bronze_records) == (0, 0)
    assert spark.read.parquet(lk.partition_uri(lake, "bronze", DAY)).count() == 0


def test_allow_empty_accepts_a_missing_partition(spark, lake, keyring):
    manifest = run_collect(spark, lake, DAY, keyring, allow_empty=True)
    assert manifest.landing_records == 0 and manifest.allow_empty


def test_unbalanced_manifest_is_refused():
    m = CollectManifest(date="2026-01-15", interval_start="", interval_end="", run_id="r", landing_uri="",
                        landing_files=[], landing_records=10, bronze_records=7, quarantined={"wrong_type": 1},
                        duplicates=1, encryption_key_version="v1", bronze_uri="", quarantine_uri="")
    with pytest.raises(ManifestMismatchError, match="10 landing records"):
        m.check_balance()


def test_generated_day_with_every_bad_kind_balances(spark, lake, keyring):
    from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

    report = generate_day(GeneratorConfig(date=DAY, events=3000, users=200, items=100, seed=3, bad_rate=0.05), lake)
    manifest = run_collect(spark, lake, DAY, keyring)
    assert manifest.landing_records == report.records
    assert manifest.duplicates == report.duplicates
    assert manifest.quarantined == report.bad_records
