"""collect keeps erased users out: a landing record whose user's keyed fingerprint is in the
erasure register is dropped and counted as ``erased`` in the collect manifest, on a first run,
a rerun of an old day, or a day whose landing still holds their lines.

The fingerprint (``requests.fingerprint``) is recomputed in the JVM from Spark built-ins, as
``crypto`` does for pseudonyms: HMAC-SHA256 (RFC 2104) with the padded key entering the plan
as data of a one-row DataFrame, never as a literal. One fingerprint column per encryption key
version that requests were recorded under (usually one). A record is the user's when its
user id or its email (the emails the erasure task found in the user's own records) is listed;
a rejected line's every JSON string is tried as both, so a malformed line of an erased user
(truncated, not an object, a user id of the wrong type) is not quarantined either. Listed
fingerprints enter the plan as data (joins) for every record and as a literal array for the
rare rejected lines; without the key they are opaque.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.secrets import KeyRing

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

ERASED = "_erased"
# A JSON string's contents, as an unrolled loop with possessive quantifiers: Java's regex
# engine recurses once per character on an alternation like (?:[^"\\]|\\.)*, which overflows
# the stack on a long line (an oversize record).
JSON_STRING = r'"([^"\\]*+(?:\\.[^"\\]*+)*+)"'


def flag_erased(spark: "SparkSession", classified: "DataFrame", keys: KeyRing,
                fingerprints: dict[str, set[str]]) -> "DataFrame":
    """``classified`` with a boolean column ``_erased``: the record's user asked to be erased."""
    from pyspark.sql import functions as F

    from privrec_pipeline.crypto import fingerprint_key, hmac_pads, hmac_sha256

    versions = sorted(fingerprints)
    missing = [v for v in versions if v not in keys.encryption_versions]
    if missing:
        raise ConfigurationError(
            f"erasure requests were recorded under encryption key version(s) {', '.join(missing)}, which the key "
            "document does not hold: collect cannot keep those users out; restore the key version(s)")
    pads = []
    for n, version in enumerate(versions):
        ipad, opad = hmac_pads(fingerprint_key(keys.encryption_versions[version].material))
        pads += [(f"_fp_ipad_{n}", ipad), (f"_fp_opad_{n}", opad)]
    key_row = spark.createDataFrame([tuple(p for _, p in pads)], ", ".join(f"{name} binary" for name, _ in pads))

    def fp(n: int, kind: str, value: "Column") -> "Column":
        message = F.encode(F.concat(F.lit(f"{kind}:"), value), "UTF-8")
        return F.lower(F.hex(hmac_sha256(F.col(f"_fp_ipad_{n}"), F.col(f"_fp_opad_{n}"), message)))

    flagged = classified.crossJoin(F.broadcast(key_row))
    # A rejected line's every JSON string (``value`` is null for accepted lines): a line that is
    # not an object, or has a user id of the wrong type, still names the user or their email.
    tokens = F.regexp_extract_all(F.col("value"), F.lit(JSON_STRING), 1)
    hits = []
    for n, version in enumerate(versions):
        listed = sorted(fingerprints[version])
        for kind, column in (("user", "user_id"), ("email", "email")):
            table = spark.createDataFrame([(x,) for x in listed], f"_fp_hit_{kind}_{n} string")
            flagged = flagged.withColumn(f"_fp_{kind}_{n}", fp(n, kind, F.col(column).cast("string")))
            flagged = flagged.join(F.broadcast(table), F.col(f"_fp_{kind}_{n}") == F.col(f"_fp_hit_{kind}_{n}"),
                                   "left")
            hits.append(F.col(f"_fp_hit_{kind}_{n}").isNotNull())
        hits.append(F.coalesce(F.exists(tokens, _listed_token(n, F.array(*[F.lit(x) for x in listed]), fp)),
                               F.lit(False)))
    erased = hits[0]
    for hit in hits[1:]:
        erased = erased | hit
    helpers = [c for c in flagged.columns if c.startswith("_fp_")]
    return flagged.withColumn(ERASED, erased).drop(*helpers)


def _listed_token(n: int, listed: "Column", fp: Any) -> Any:
    """The predicate of one JSON string of a rejected line: a listed user or email."""
    from pyspark.sql import functions as F

    return lambda token: F.array_contains(listed, fp(n, "user", token)) | F.array_contains(listed, fp(n, "email", token))
