"""Key rotation end to end: rotate both keys with ``privrec keys rotate``, run collect and
pseudonymize before and after, then decrypt old bronze with the old encryption key and new
bronze with the new one (and neither with the other), check every pseudonym against HMAC
under the key version its day was written with, and check that the manifests name the keys
by fingerprint. The old keys stay in the key file, retired, so old bronze stays readable."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from conftest import DAY, good_event, line, write_landing
from privrec_pipeline import lake as lk
from privrec_pipeline.ingest import run_collect, run_pseudonymize
from privrec_pipeline.secrets import (
    ENV_KEY_FILE,
    ENV_KEYS_JSON,
    KeyRing,
    init_key_file,
    load_keyring,
)
from privrec_pipeline.transforms import collect as tc

pytestmark = pytest.mark.spark
DAY_AFTER = DAY + dt.timedelta(days=1)  # the first day collected and pseudonymized under the new keys
IDENTIFIERS = ("email", "ip", "user_agent", "search_query")
BAD_LINE = b"not json, but it may hold person0@example.com"


def _events(day: dt.date) -> list[dict]:
    """21 events of the same 7 users (usr_0000 .. usr_0006) on each day, ids unique per day."""
    return [good_event(i, event_id=f"evt-{day:%Y%m%d}-{i:03d}", event_time=f"{day}T10:{i:02d}:00Z")
            for i in range(21)]


def _rotate(path: Path, purpose: str) -> str:
    """``privrec keys rotate`` as an operator runs it (the CLI, not the library function)."""
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app

    result = CliRunner().invoke(app, ["keys", "rotate", "--purpose", purpose, "--path", str(path), "--yes"],
                                env={ENV_KEYS_JSON: None, ENV_KEY_FILE: None})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _hmac_hex(key: bytes, namespace: str, value: str) -> str:
    """The documented pseudonym: HMAC-SHA256(K, "<namespace>:<value>"), lowercase hex (by hand,
    not through privrec's reference implementation)."""
    return hmac.new(key, f"{namespace}:{value}".encode(), hashlib.sha256).hexdigest()


def _decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).decrypt(blob[:12], blob[12:], aad)


@pytest.fixture(scope="module")
def rotated(spark, tmp_path_factory):
    """DAY collected and pseudonymized under key set v1, both keys rotated with the CLI, then
    DAY_AFTER collected and pseudonymized under key set v2 (each job loads the key file, as
    ``jobs/_common.py`` does)."""
    root = tmp_path_factory.mktemp("rotation")
    lake, key_file = str(root / "lake"), root / "keys" / "keys.json"
    environ = {ENV_KEY_FILE: str(key_file)}
    init_key_file(key_file)
    v1 = load_keyring(environ)
    for day in (DAY, DAY_AFTER):
        write_landing(lake, day, [line(e) for e in _events(day)] + [BAD_LINE])
    manifests = {DAY: (run_collect(spark, lake, DAY, v1), run_pseudonymize(spark, lake, DAY, v1))}
    outputs = {purpose: _rotate(key_file, purpose) for purpose in ("pseudonym", "encryption")}
    v2 = load_keyring(environ)
    manifests[DAY_AFTER] = (run_collect(spark, lake, DAY_AFTER, v2), run_pseudonymize(spark, lake, DAY_AFTER, v2))
    return {"lake": lake, "key_file": key_file, "v1": v1, "v2": v2, "manifests": manifests, "outputs": outputs}


def _bronze(spark, lake: str, day: dt.date) -> list:
    return spark.read.parquet(lk.partition_uri(lake, "bronze", day)).collect()


def _quarantine(spark, lake: str, day: dt.date) -> list:
    return spark.read.parquet(lk.partition_uri(lake, "quarantine", day)).collect()


def test_rotation_makes_new_keys_current_and_keeps_the_old_ones(rotated):
    v1, v2 = rotated["v1"], rotated["v2"]
    assert (v1.pseudonym.version, v1.encryption.version) == ("v1", "v1")
    assert (v2.pseudonym.version, v2.encryption.version) == ("v2", "v2")
    assert v2.pseudonym.material != v1.pseudonym.material and v2.encryption.material != v1.encryption.material
    assert v2.pseudonym.fingerprint != v1.pseudonym.fingerprint
    assert v2.encryption.fingerprint != v1.encryption.fingerprint
    # The old keys stay, byte for byte: old bronze stays decryptable, old pseudonyms recomputable.
    assert v2.encryption_versions["v1"].material == v1.encryption.material
    assert v2.pseudonym_versions["v1"].material == v1.pseudonym.material
    doc = json.loads(rotated["key_file"].read_text())
    assert set(doc["encryption"]["retired"]) == set(doc["pseudonym"]["retired"]) == {"v1"}
    for purpose, old, new in (("pseudonym", v1.pseudonym, v2.pseudonym), ("encryption", v1.encryption, v2.encryption)):
        output = rotated["outputs"][purpose]
        assert f"{old.fingerprint}) is retired" in output and f"{new.fingerprint}) is current" in output
        assert not any(s in output.replace(" ", "") for s in v2.secret_strings())


def test_keys_show_lists_both_versions_by_fingerprint(rotated):
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app

    shown = CliRunner().invoke(app, ["keys", "show", "--path", str(rotated["key_file"])],
                               env={ENV_KEYS_JSON: None})
    assert shown.exit_code == 0, shown.output
    rows = {tuple(r.split()[:2]): r for r in shown.output.splitlines()[1:] if r.strip()}
    v1, v2 = rotated["v1"], rotated["v2"]
    for purpose in ("pseudonym", "encryption"):
        old, new = getattr(v1, purpose), getattr(v2, purpose)
        assert new.fingerprint in rows[(purpose, "v2")] and rows[(purpose, "v2")].rstrip().endswith("current")
        assert old.fingerprint in rows[(purpose, "v1")] and "retired" in rows[(purpose, "v1")]


@pytest.mark.parametrize("day, own, other", [(DAY, "v1", "v2"), (DAY_AFTER, "v2", "v1")])
def test_bronze_decrypts_with_its_own_key_only(spark, rotated, day, own, other):
    """A day's rows are sealed under data keys of its own version (fingerprinted and wrapped
    under that version's key), inside a ciphertext of that version's key alone."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

    from privrec_pipeline.erasure.data_keys import wrap_key
    from privrec_pipeline.erasure.requests import fingerprint, open_register

    own_key, other_key = rotated[own].encryption.material, rotated[other].encryption.material
    store = open_register(rotated["lake"]).data_keys
    rows = _bronze(spark, rotated["lake"], day)
    expected = {e["event_id"]: {k: e[k] for k in IDENTIFIERS} for e in _events(day)}
    assert sorted(r.event_id for r in rows) == sorted(expected)
    with store.engine.connect() as conn:
        wrapped = {(v, fp): bytes(w) for v, fp, w in conn.exec_driver_sql(
            "SELECT key_version, fingerprint, wrapped_key FROM user_data_keys")}
    for row in rows:
        assert row.enc_key_version == own and row.data_key == fingerprint(own_key, row.user_id)
        with pytest.raises(InvalidUnwrap):
            aes_key_unwrap(wrap_key(other_key), wrapped[(own, row.data_key)])
        dek = aes_key_unwrap(wrap_key(own_key), wrapped[(own, row.data_key)])
        blob, aad = bytes(row.identifiers_enc), f"{tc.IDENTIFIERS_CONTEXT}|{row.event_id}".encode()
        inner = _decrypt(dek, blob, aad)
        assert json.loads(_decrypt(own_key, inner, aad)) == expected[row.event_id]
        for key in (own_key, other_key):
            with pytest.raises(InvalidTag):
                _decrypt(key, blob, aad)
        with pytest.raises(InvalidTag):
            _decrypt(other_key, inner, aad)
    (bad,) = _quarantine(spark, rotated["lake"], day)  # no user id: the version's key alone
    assert bad.enc_key_version == own and bad.data_key is None
    aad = tc.raw_record_aad(bad.source_file, bad.record_position)
    assert _decrypt(own_key, bytes(bad.raw_record_enc), aad) == BAD_LINE
    with pytest.raises(InvalidTag):
        _decrypt(other_key, bytes(bad.raw_record_enc), aad)


def test_the_rotated_key_ring_decrypts_old_and_new_bronze_by_version(spark, rotated):
    """After the rotation the current key ring still reads every day: each row names its key
    version and its data key, and ``key_frame`` holds every version (the auditor's join on
    ``enc_version``, after the data keys' join on ``data_key``)."""
    from pyspark.sql import functions as F

    from conftest import row_keys
    from privrec_pipeline.crypto import key_frame
    from privrec_pipeline.erasure.requests import open_register

    v2: KeyRing = rotated["v2"]
    opener = row_keys(rotated["lake"], v2)
    rows = [r for day in (DAY, DAY_AFTER) for r in _bronze(spark, rotated["lake"], day)]
    for row in rows:  # in Python, by the row's version
        plain = opener.open(row.enc_key_version, row.data_key, bytes(row.identifiers_enc),
                            f"identifiers|{row.event_id}".encode())
        assert set(json.loads(plain)) == set(IDENTIFIERS)
    keys = key_frame(spark, v2)
    assert sorted(r.enc_version for r in keys.select("enc_version").collect()) == ["v1", "v2"]
    store = open_register(rotated["lake"]).data_keys
    deks = {fp: k for version in ("v1", "v2")
            for fp, k in store.lookup(v2, version, {r.data_key for r in rows if r.enc_key_version == version}).items()}
    bronze = spark.read.parquet(lk.partition_uri(rotated["lake"], "bronze", DAY),
                                lk.partition_uri(rotated["lake"], "bronze", DAY_AFTER))
    aad = F.concat(F.lit("identifiers|"), "event_id")
    dek_frame = spark.createDataFrame(sorted(deks.items()), "data_key string, dek binary")
    decrypted = (bronze.join(F.broadcast(dek_frame), "data_key")
                 .join(F.broadcast(keys), bronze.enc_key_version == keys.enc_version).select(
        "event_id", "enc_key_version",
        F.get_json_object(F.aes_decrypt(F.aes_decrypt("identifiers_enc", "dek", F.lit("GCM"), F.lit("DEFAULT"), aad),
                                        "enc_key", F.lit("GCM"), F.lit("DEFAULT"), aad).cast("string"),
                          "$.email").alias("email")))
    got = {r.event_id: (r.enc_key_version, r.email) for r in decrypted.collect()}
    want = {e["event_id"]: (version, e["email"]) for day, version in ((DAY, "v1"), (DAY_AFTER, "v2"))
            for e in _events(day)}
    assert got == want


@pytest.mark.parametrize("day, version", [(DAY, "v1"), (DAY_AFTER, "v2")])
def test_pseudonyms_are_the_hmac_under_their_days_key(spark, rotated, day, version):
    key = rotated[version].pseudonym.material
    silver = spark.read.parquet(lk.partition_uri(rotated["lake"], "silver", day)).collect()
    by_event = {_hmac_hex(key, "event", e["event_id"]): e for e in _events(day)}
    assert sorted(r.event_id for r in silver) == sorted(by_event)  # every event, under this day's key
    for row in silver:
        raw = by_event[row.event_id]
        assert row.user_pseudonym == _hmac_hex(key, "user", raw["user_id"])
        assert row.session_pseudonym == _hmac_hex(key, "session", raw["session_id"])
        assert row.pseudonym_key_version == version


def test_the_same_person_gets_another_pseudonym_after_the_rotation(spark, rotated):
    lake, v1, v2 = rotated["lake"], rotated["v1"], rotated["v2"]

    def users(day):
        silver = spark.read.parquet(lk.partition_uri(lake, "silver", day))
        return {r.user_pseudonym for r in silver.select("user_pseudonym").distinct().collect()}

    people = sorted({e["user_id"] for e in _events(DAY)})
    assert people == sorted({e["user_id"] for e in _events(DAY_AFTER)}) and len(people) == 7
    before = {p: _hmac_hex(v1.pseudonym.material, "user", p) for p in people}
    after = {p: _hmac_hex(v2.pseudonym.material, "user", p) for p in people}
    assert users(DAY) == set(before.values()) and users(DAY_AFTER) == set(after.values())
    assert all(before[p] != after[p] for p in people)
    assert not users(DAY) & users(DAY_AFTER)  # no pseudonym links the two days


def test_manifests_record_each_days_key_fingerprints(spark, rotated):
    from privrec_pipeline.manifest import pseudonym_fingerprint

    lake, written = rotated["lake"], []
    for day, ring in ((DAY, rotated["v1"]), (DAY_AFTER, rotated["v2"])):
        collect, pseudonymize = rotated["manifests"][day]
        on_disk = [json.loads(lk.path(lk.manifest_uri(lake, step, day)).read_text())
                   for step in ("collect", "pseudonymize")]
        written += on_disk
        for doc in (collect.__dict__, on_disk[0]):
            assert (doc["encryption_key_version"], doc["encryption_key_fingerprint"]) == (
                ring.encryption.version, ring.encryption.fingerprint)
        for doc in (pseudonymize.__dict__, on_disk[1]):
            assert (doc["pseudonym_key_version"], doc["pseudonym_key_fingerprint"]) == (
                ring.pseudonym.version, ring.pseudonym.fingerprint)
        assert pseudonym_fingerprint(lk.Lake(lake), lake, day) == ring.pseudonym.fingerprint
    assert not any(s in json.dumps(written) for s in rotated["v2"].secret_strings())


def test_old_days_are_repseudonymized_under_the_new_key_without_decryption(spark, rotated, tmp_path):
    """The documented remedy for a window spanning the rotation: rerun pseudonymize of the old
    day with the new key. Its bronze (still under encryption key v1) is read as it is."""
    import shutil

    lake = str(tmp_path / "lake")
    shutil.copytree(rotated["lake"], lake)
    v2 = rotated["v2"]
    bronze_before = sorted(bytes(r.identifiers_enc) for r in _bronze(spark, lake, DAY))
    manifest = run_pseudonymize(spark, lake, DAY, v2)
    assert (manifest.pseudonym_key_version, manifest.pseudonym_key_fingerprint) == ("v2", v2.pseudonym.fingerprint)
    silver = spark.read.parquet(lk.partition_uri(lake, "silver", DAY)).collect()
    by_event = {_hmac_hex(v2.pseudonym.material, "event", e["event_id"]): e for e in _events(DAY)}
    assert sorted(r.event_id for r in silver) == sorted(by_event)
    for row in silver:
        assert row.user_pseudonym == _hmac_hex(v2.pseudonym.material, "user", by_event[row.event_id]["user_id"])
        assert row.pseudonym_key_version == "v2"
    assert sorted(bytes(r.identifiers_enc) for r in _bronze(spark, lake, DAY)) == bronze_before
    assert {r.enc_key_version for r in _bronze(spark, lake, DAY)} == {"v1"}
