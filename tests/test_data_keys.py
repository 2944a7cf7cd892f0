"""Per-user data keys (crypto-shredding): created once per user and version, stored only
wrapped, agreed on by runs that create them at once, withheld from users who asked to be
erased (collect then drops their records), deleted under every version, and required for
every sealed row (a row without its key fails the job instead of staying under the master key)."""

from __future__ import annotations

import json

import pytest
import test_ledger

from conftest import DAY, good_event, line, row_keys, write_landing
from privrec_pipeline import lake as lk
from privrec_pipeline.erasure.data_keys import DataKeys, ShreddedError, wrap_key
from privrec_pipeline.erasure.requests import ErasureRegister, fingerprint, open_register
from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.secrets import KeyRing, new_key_document, parse_key_document

ledger_url = test_ledger.ledger_url  # the fixture: a fresh SQLite file or PostgreSQL schema


def rotated(doc: dict) -> tuple[dict, KeyRing]:
    """The document with a second encryption key version made current, the old one kept."""
    doc = json.loads(json.dumps(doc))
    doc["encryption"]["keys"]["v2"] = new_key_document()["encryption"]["keys"]["v1"]
    doc["encryption"]["current"] = "v2"
    doc["encryption"]["retired"] = {"v1": "2026-01-16T00:00:00+00:00"}
    return doc, parse_key_document(json.dumps(doc), "test")


def test_a_user_gets_one_key_stored_only_wrapped(tmp_path, keyring):
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

    register = ErasureRegister(f"sqlite:///{tmp_path}/ledger.db")
    fps = [fingerprint(keyring.encryption.material, f"usr_{i}") for i in range(3)]
    first = register.data_keys.ensure(keyring, fps)
    assert set(first) == set(fps) and len(set(first.values())) == 3 and all(len(k) == 32 for k in first.values())
    again = register.data_keys.ensure(keyring, [*fps[:2], "f" * 64])
    assert {fp: again[fp] for fp in fps[:2]} == {fp: first[fp] for fp in fps[:2]}  # the same keys
    assert again["f" * 64] not in first.values() and register.data_keys.count() == 4
    with register.data_keys.engine.connect() as conn:
        wrapped = dict(conn.exec_driver_sql("SELECT fingerprint, wrapped_key FROM user_data_keys").all())
    assert all(len(bytes(w)) == 40 for w in wrapped.values())  # RFC 3394: the key plus an 8-byte check
    assert aes_key_unwrap(wrap_key(keyring.encryption.material), bytes(wrapped[fps[0]])) == first[fps[0]]
    raw = (tmp_path / "ledger.db").read_bytes()
    assert not any(k in raw for k in first.values())  # never in clear in the database file


def test_a_lakes_data_keys_live_in_their_own_database(tmp_path, keyring, monkeypatch):
    """Beside the ledger, not in it: the keys' database can have backups shorter than an
    erasure may take, the ledger's long ones (PRIVREC_DATA_KEYS_URL chooses it)."""
    lake = str(tmp_path / "lake")
    register = open_register(lake)
    register.data_keys.ensure(keyring, [fingerprint(keyring.encryption.material, "usr_a")])
    folder = tmp_path / "lake" / "_ledger"
    with register.data_keys.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM user_data_keys").scalar() == 1
    with register.engine.connect() as conn:
        assert "user_data_keys" not in {r[0] for r in conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert (folder / "data_keys.db").stat().st_mode & 0o077 == 0 and (folder / "ledger.db").exists()
    monkeypatch.setenv("PRIVREC_DATA_KEYS_URL", f"sqlite:///{tmp_path}/elsewhere.db")
    open_register(lake).data_keys.ensure(keyring, [fingerprint(keyring.encryption.material, "usr_b")])
    assert (tmp_path / "elsewhere.db").exists()


def test_no_key_for_a_user_who_asked_to_be_erased(tmp_path, keyring):
    register = ErasureRegister(f"sqlite:///{tmp_path}/ledger.db")
    register.record(keyring, ["usr_gone"])
    gone, kept = (fingerprint(keyring.encryption.material, u) for u in ("usr_gone", "usr_kept"))
    assert set(register.data_keys.ensure(keyring, [gone, kept])) == {kept}
    assert register.data_keys.count() == 1


def test_shred_deletes_the_users_keys_under_every_version(tmp_path, key_document):
    doc = json.loads(key_document)
    old = parse_key_document(key_document, "test")
    _, new = rotated(doc)
    register = ErasureRegister(f"sqlite:///{tmp_path}/ledger.db")
    for keys in (old, new):
        register.data_keys.ensure(keys, [fingerprint(keys.encryption.material, u) for u in ("usr_a", "usr_b")])
    assert register.data_keys.count() == 4
    assert register.data_keys.shred(new, ["usr_a"]) == 2  # v1 and v2
    assert register.data_keys.count() == 2
    for version, ring in (("v1", old), ("v2", new)):
        left = register.data_keys.lookup(new, version, [fingerprint(ring.encryption.material, u)
                                                        for u in ("usr_a", "usr_b")])
        assert list(left) == [fingerprint(ring.encryption.material, "usr_b")]
    with pytest.raises(ConfigurationError, match="version v9"):
        register.data_keys.lookup(new, "v9", ["a" * 64])


def test_runs_creating_the_same_users_keys_at_once_agree(ledger_url, keyring):
    """Four processes ensure overlapping sets of users at the same moment: every user ends up
    with one key, and every process got that key (SQLite and PostgreSQL)."""
    import multiprocessing

    ErasureRegister(ledger_url)  # the tables, as the first collect creates them
    users = [[f"usr_{i}" for i in range(start, start + 300)] for start in (0, 100, 200, 0)]
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(len(users)), ctx.Queue()
    workers = [ctx.Process(target=_ensure, args=(ledger_url, keyring, ids, start, results)) for ids in users]
    for w in workers:
        w.start()
    got = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert all(isinstance(g, dict) for g in got), got
    stored = ErasureRegister(ledger_url).data_keys
    assert stored.count() == 500
    final = stored.lookup(keyring, "v1", {fp for g in got for fp in g})
    assert all(g[fp] == final[fp] for g in got for fp in g)


def _ensure(url, keyring, ids, start, results) -> None:
    try:
        store = ErasureRegister(url).data_keys
        start.wait()
        results.put(store.ensure(keyring, [fingerprint(keyring.encryption.material, u) for u in ids]))
    except Exception as exc:  # reported to the test, not lost in a child
        results.put(repr(exc))


@pytest.mark.spark
def test_collect_drops_a_user_whose_erasure_was_requested_while_it_ran(spark, lake, keyring, monkeypatch):
    """The request arrives after collect read the register, before it fetched the data keys:
    the user's records are counted as erased, none is stored, and the day balances."""
    from privrec_pipeline.ingest import run_collect

    write_landing(lake, DAY, [line(good_event(i)) for i in range(21)] + [line(good_event(99, price="abc"))])
    original = DataKeys.ensure

    def late_request(self, keys, fingerprints, now=None):
        open_register(lake).record(keys, ["usr_0001"])
        return original(self, keys, fingerprints, now)

    monkeypatch.setattr(DataKeys, "ensure", late_request)
    manifest = run_collect(spark, lake, DAY, keyring)
    bronze = spark.read.parquet(lk.partition_uri(lake, "bronze", DAY))
    assert manifest.erased == 4  # events 1, 8, 15 and the quarantined 99 (99 % 7 == 1)
    assert bronze.where("user_id = 'usr_0001'").count() == 0 and bronze.count() == 18
    assert manifest.quarantined_total == 0
    manifest.check_balance()
    keys = row_keys(lake, keyring)
    for row in bronze.collect():
        assert json.loads(keys.open(row.enc_key_version, row.data_key, bytes(row.identifiers_enc),
                                    f"identifiers|{row.event_id}".encode()))["email"].endswith("@example.com")


@pytest.mark.spark
def test_a_row_without_its_data_key_fails_the_job(spark, keyring):
    """Sealing never falls back to the master key alone for a row that names a data key."""
    from pyspark.sql import functions as F

    from privrec_pipeline.crypto import reference_decrypt
    from privrec_pipeline.erasure import data_keys

    rows = spark.createDataFrame([("usr_a", b"x", "e1"), ("usr_b", b"y", "e2"), (None, b"z", "e3"), ("", b"w", "e4"),
                                  ('{"id": 1} ', b"v", "e5"), ("u" * 300, b"u", "e6")],
                                 "user_id string, identifiers_enc binary, event_id string")
    frame = data_keys.key_frame(spark, {"usr_a": ("a" * 64, bytes(32))})
    sealed = data_keys.seal(rows, frame, {"identifiers_enc": ("identifiers", F.col("event_id"))})
    with pytest.raises(Exception, match="no data key for a row's identifiers_enc"):
        sealed.collect()
    ok = data_keys.seal(rows.where("event_id != 'e2'"), frame,
                        {"identifiers_enc": ("identifiers", F.col("event_id"))}).collect()
    by_event = {r.event_id: (bytes(r.identifiers_enc), r.data_key) for r in ok}
    assert by_event["e3"] == (b"z", None) and by_event["e4"] == (b"w", None)  # no user: left as it was
    assert by_event["e5"] == (b"v", None) and by_event["e6"] == (b"u", None)  # no id anyone could erase: no key
    blob, data_key = by_event["e1"]
    assert data_key == "a" * 64 and reference_decrypt(bytes(32), blob, b"identifiers|e1") == b"x"
    shredded = data_keys.RowKeys(keyring, _EmptyStore())
    with pytest.raises(ShreddedError):
        shredded.open("v1", data_key, blob, b"identifiers|e1")
    # A key missing for a user who never asked to be erased is a lost database, not a shredding.
    with pytest.raises(data_keys.DataKeyMissingError, match="the database was lost, reset or restored"):
        data_keys.RowKeys(keyring, _EmptyStore(asked=False)).open("v1", data_key, blob, b"identifiers|e1")


class _EmptyStore:
    """A key table from which every data key was deleted; ``asked`` says whether the users
    asked to be erased."""

    def __init__(self, asked: bool = True) -> None:
        self.asked = asked

    def lookup(self, keys, version, fingerprints):
        return {}

    def erased(self, version, fingerprint):
        return self.asked
