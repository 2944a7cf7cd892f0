"""Keyed primitives composed from Spark built-ins, so they run in the JVM (no Python UDF).

HMAC-SHA256 (RFC 2104, FIPS 198-1):
    HMAC(K, m) = H((K0 xor opad) || H((K0 xor ipad) || m))
with K0 = K zero-padded to the 64-byte SHA-256 block (keys longer than a block are hashed
first), ipad = 0x36 repeated, opad = 0x5c repeated. The padded keys are computed once in
Python (``hmac_pads``) and enter the plan as *data* of a one-row DataFrame (``key_frame``),
never as literals, so plans and logs cannot show them.

AES-256-GCM (NIST SP 800-38D) via Spark's ``aes_encrypt``. The 96-bit IV is a synthetic IV:
the first 12 bytes of HMAC(K_iv, context || 0x00 || plaintext), with K_iv derived from the
encryption key. A repeated IV therefore only occurs for the same plaintext in the same
context (the deterministic-AEAD construction of RFC 5297, "SIV"), which keeps a rerun's
output identical while never reusing an IV across different plaintexts. The context (column
name and row key, e.g. ``identifiers|<event_id>`` in bronze, ``raw_record|<source_file>|<record_position>``
in quarantine) is bound as additional authenticated data, so a ciphertext cannot be moved to
another column or row undetected; and as the IV covers the context, equal plaintexts in two
rows get different ciphertexts whenever the row keys differ. A row key must therefore name
the row: a key shared by several rows (a file name alone) lets their ciphertexts be swapped
unnoticed and shows which of them hold equal plaintexts.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from privrec_pipeline.secrets import KeyRing

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

SHA256_BLOCK = 64
IV_KEY_LABEL = b"privrec/aes-gcm-synthetic-iv/v1"
USER_FINGERPRINT_LABEL = b"privrec/erasure-fingerprint/v1"
# Byte-wise XOR with ipad (0x36) and opad (0x5c) as translation tables: one C call per pad,
# fast enough for the pads of every user's data key of a day (``erasure.data_keys``).
_XOR_IPAD = bytes(b ^ 0x36 for b in range(256))
_XOR_OPAD = bytes(b ^ 0x5C for b in range(256))


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """(K0 xor ipad, K0 xor opad) of RFC 2104 for SHA-256."""
    if len(key) > SHA256_BLOCK:
        key = hashlib.sha256(key).digest()
    k0 = key.ljust(SHA256_BLOCK, b"\x00")
    return k0.translate(_XOR_IPAD), k0.translate(_XOR_OPAD)


def pseudonym_message(namespace: str, value: str) -> bytes:
    """The HMAC input for a pseudonym: namespaces keep user and session pseudonyms apart."""
    return f"{namespace}:{value}".encode()


def reference_pseudonym(key: bytes, namespace: str, value: str) -> str:
    """Python's hmac, the reference the JVM composition is tested against."""
    return hmac.new(key, pseudonym_message(namespace, value), hashlib.sha256).hexdigest()


def iv_key(encryption_key: bytes) -> bytes:
    return hmac.new(encryption_key, IV_KEY_LABEL, hashlib.sha256).digest()


def fingerprint_key(encryption_key: bytes) -> bytes:
    """K_fp of a user's keyed fingerprint (``erasure.requests``), derived from the encryption key."""
    return hmac.new(encryption_key, USER_FINGERPRINT_LABEL, hashlib.sha256).digest()


def key_frame(spark: "SparkSession", keys: KeyRing) -> "DataFrame":
    """One row per encryption key version with every derived key as a binary column.

    Columns: enc_version, enc_key, iv_ipad, iv_opad (per version) and the current
    pseudonym key's pad_ipad, pad_opad, pseudonym_version. Join it (broadcast) to the data:
    encryption uses the row of ``keys.encryption.version``, an auditor decrypting old bronze joins on ``enc_version``.
    """
    from pyspark.sql.types import BinaryType, StringType, StructField, StructType

    p_ipad, p_opad = hmac_pads(keys.pseudonym.material)
    versions = dict(keys.encryption_versions) or {keys.encryption.version: keys.encryption}
    rows = []
    for version, key in sorted(versions.items()):
        i_ipad, i_opad = hmac_pads(iv_key(key.material))
        rows.append((version, key.material, i_ipad, i_opad, p_ipad, p_opad, keys.pseudonym.version))
    schema = StructType([
        StructField("enc_version", StringType(), False),
        StructField("enc_key", BinaryType(), False),
        StructField("iv_ipad", BinaryType(), False),
        StructField("iv_opad", BinaryType(), False),
        StructField("pad_ipad", BinaryType(), False),
        StructField("pad_opad", BinaryType(), False),
        StructField("pseudonym_version", StringType(), False),
    ])
    return spark.createDataFrame(rows, schema)


def hmac_sha256(ipad: "Column", opad: "Column", message: "Column") -> "Column":
    """HMAC-SHA256 as a 32-byte binary column (RFC 2104), ``message`` binary."""
    from pyspark.sql import functions as F

    inner = F.unhex(F.sha2(F.concat(ipad, message), 256))
    return F.unhex(F.sha2(F.concat(opad, inner), 256))


def pseudonym(ipad: "Column", opad: "Column", namespace: str, value: "Column") -> "Column":
    """64 lowercase hex chars of HMAC(K, namespace ':' value); null stays null."""
    from pyspark.sql import functions as F

    message = F.encode(F.concat(F.lit(f"{namespace}:"), value.cast("string")), "UTF-8")
    return F.lower(F.hex(hmac_sha256(ipad, opad, message)))


def encrypt(plaintext: "Column", context: str, key: "Column", iv_ipad: "Column", iv_opad: "Column",
            context_suffix: "Column | None" = None) -> "Column":
    """AES-256-GCM ciphertext (IV || ciphertext || tag) with a synthetic IV; null stays null."""
    from pyspark.sql import functions as F

    ctx = aad(context, context_suffix)
    data = plaintext.cast("binary")
    iv = F.substring(hmac_sha256(iv_ipad, iv_opad, F.concat(F.encode(ctx, "UTF-8"), F.unhex(F.lit("00")), data)), 1, 12)
    return F.when(plaintext.isNull(), F.lit(None)).otherwise(
        F.aes_encrypt(data, key, F.lit("GCM"), F.lit("DEFAULT"), iv, ctx)
    )


def reference_decrypt(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """Decrypt a ciphertext of ``encrypt`` (IV || ciphertext || tag) with the ``cryptography``
    library's AES-GCM; raises ``cryptography.exceptions.InvalidTag`` when the key or the
    associated data (the row's context) is not the one it was encrypted with."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).decrypt(blob[:12], blob[12:], associated_data)


def aad(context: str, context_suffix: "Column | None" = None) -> "Column":
    """Additional authenticated data: the column name and, per row, e.g. the event id, so a
    ciphertext cannot be moved to another column or another row undetected."""
    from pyspark.sql import functions as F

    return F.lit(context) if context_suffix is None else F.concat(F.lit(context + "|"), context_suffix)
