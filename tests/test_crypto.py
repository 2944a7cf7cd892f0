"""The JVM compositions equal the reference implementations and keep keys out of plans."""

import random

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privrec_pipeline import crypto

pytestmark = pytest.mark.spark

UNICODE_SAMPLES = ["", "a", "usr_0001", "Ünïcödé", "日本語のユーザー", "emoji 🙂🚀", "x" * 200, "a:b:c",
                   "with\nnewline", "tab\tand \"quotes\"", "0", "-1", "ß" * 65]


def _values(n: int = 400) -> list[str]:
    rng = random.Random(7)
    alphabet = "abcXYZ019_-:@. éü日本🙂"
    return UNICODE_SAMPLES + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 90))) for _ in range(n)]


def test_hmac_pseudonym_equals_python_hmac(spark, keyring):
    from pyspark.sql import functions as F

    values = _values()
    df = spark.createDataFrame([(v,) for v in values], "v string").crossJoin(crypto.key_frame(spark, keyring))
    got = df.select("v", crypto.pseudonym(F.col("pad_ipad"), F.col("pad_opad"), "user", F.col("v")).alias("p")).collect()
    key = keyring.pseudonym.material
    assert len(got) == len(values)
    for row in got:
        assert row.p == crypto.reference_pseudonym(key, "user", row.v)
        assert len(row.p) == 64


def test_namespaces_separate_pseudonyms(keyring):
    key = keyring.pseudonym.material
    assert crypto.reference_pseudonym(key, "user", "42") != crypto.reference_pseudonym(key, "session", "42")


def test_long_keys_are_hashed_like_rfc2104():
    import hashlib
    import hmac

    key = bytes(range(100))
    ipad, opad = crypto.hmac_pads(key)
    inner = hashlib.sha256(ipad + b"msg").digest()
    assert hashlib.sha256(opad + inner).hexdigest() == hmac.new(key, b"msg", hashlib.sha256).hexdigest()


def test_aes_gcm_ciphertext_decrypts_with_cryptography(spark, keyring):
    from pyspark.sql import functions as F

    values = [v for v in _values(50) if v]
    df = spark.createDataFrame([(v, f"e{i}") for i, v in enumerate(values)], "v string, eid string")
    out = df.crossJoin(crypto.key_frame(spark, keyring)).select(
        "v", "eid", crypto.encrypt(F.col("v"), "email", F.col("enc_key"), F.col("iv_ipad"), F.col("iv_opad"),
                            context_suffix=F.col("eid")).alias("c"),
    ).collect()
    aead = AESGCM(keyring.encryption.material)
    ivs = set()
    for row in out:
        blob = bytes(row.c)
        iv, body = blob[:12], blob[12:]
        ivs.add(iv)
        assert aead.decrypt(iv, body, f"email|{row.eid}".encode()).decode("utf-8") == row.v
        with pytest.raises(InvalidTag):
            aead.decrypt(iv, body, f"ip|{row.eid}".encode())  # the column is authenticated
        with pytest.raises(InvalidTag):
            aead.decrypt(iv, body, f"email|{row.eid}x".encode())  # and so is the row
    assert len(ivs) == len(out)  # distinct plaintexts never share an IV


def test_encryption_is_deterministic_per_context(spark, keyring):
    from pyspark.sql import functions as F

    df = spark.createDataFrame([("same", "e1"), ("same", "e1"), ("same", "e2")], "v string, eid string")
    enc = df.crossJoin(crypto.key_frame(spark, keyring)).select(
        crypto.encrypt(F.col("v"), "email", F.col("enc_key"), F.col("iv_ipad"), F.col("iv_opad"),
                       context_suffix=F.col("eid")).alias("c")).collect()
    assert enc[0].c == enc[1].c != enc[2].c


def test_keys_never_appear_in_query_plans(spark, keyring, capsys):
    from pyspark.sql import functions as F

    df = spark.createDataFrame([("x",)], "v string").crossJoin(crypto.key_frame(spark, keyring))
    q = df.select(crypto.pseudonym(F.col("pad_ipad"), F.col("pad_opad"), "user", F.col("v")),
                  crypto.encrypt(F.col("v"), "email", F.col("enc_key"), F.col("iv_ipad"), F.col("iv_opad")))
    q.explain(mode="extended")
    plan = capsys.readouterr().out
    ipad, _ = crypto.hmac_pads(keyring.pseudonym.material)
    for secret in [*keyring.secret_strings(), ipad.hex()]:
        assert secret.lower() not in plan.lower()
