"""pseudonymize: bronze -> silver. Keyed pseudonyms, generalized quasi-identifiers, scrubbed text.

Silver holds no email, ip, user_agent or raw id (privacy contract point 2):
- event_id, user_id, session_id -> HMAC-SHA256 pseudonyms (64 hex) under the current key,
  with ``pseudonym_key_version`` so a key rotation is visible in the data;
- user_agent -> ``device_class`` (mobile, tablet, desktop, bot, unknown);
- ip -> ``ip_family`` (ipv4, ipv6, unknown): no address bits, no region (a coarse region
  needs a GeoIP database; none ships with privrec);
- search_query -> emails, card numbers and phone numbers replaced by placeholders, then cut
  to ``MAX_QUERY_CHARS``.
Everything runs as Spark built-ins in the JVM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from privrec_pipeline import crypto

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

MAX_QUERY_CHARS = 256
# Patterns shared with the PII scans of the tests and the validation step.
EMAIL_PATTERN = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"
# 13-19 digits, optionally grouped by spaces or dashes (payment card numbers, ISO/IEC 7812).
CARD_PATTERN = r"\b\d(?:[ \-]?\d){12,18}\b"
# 7 or more digits with optional +, spaces, dots, dashes or parentheses between them, not
# inside a longer word (so hex digests and product codes are not phones).
PHONE_PATTERN = r"(?<![0-9A-Za-z])\+?\(?\d(?:[\s().\-]*\d){6,}(?![0-9A-Za-z])"
IPV4_PATTERN = r"\b(?:\d{1,3}\.){3}\d{1,3}\b"
SILVER_COLUMNS = (
    "event_id", "event_time", "event_type", "user_pseudonym", "session_pseudonym", "item_id",
    "category", "price", "quantity", "rating", "device_class", "ip_family", "search_query",
    "pseudonym_key_version",
)


def scrub_text(text: "Column") -> "Column":
    """Replace emails, card numbers, IPv4 addresses and phone numbers (in that order: cards
    and addresses are also digit runs, so they go before the phone pattern)."""
    from pyspark.sql import functions as F

    out = F.regexp_replace(text, EMAIL_PATTERN, "[email]")
    out = F.regexp_replace(out, CARD_PATTERN, "[card]")
    out = F.regexp_replace(out, IPV4_PATTERN, "[ip]")
    out = F.regexp_replace(out, PHONE_PATTERN, "[phone]")
    return F.substring(out, 1, MAX_QUERY_CHARS)


DEVICE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (  # first match wins
    ("bot", ("bot", "crawler", "spider", "slurp")),
    ("tablet", ("ipad", "tablet")),
    ("mobile", ("mobile", "iphone", "android")),
    ("desktop", ("windows", "macintosh", "x11", "linux", "cros")),
)


def device_class(user_agent: "Column") -> "Column":
    """mobile, tablet, desktop, bot or unknown, by substring markers of the lower-cased agent
    (plain substring tests: several times cheaper than regular expressions per row)."""
    from functools import reduce

    from pyspark.sql import functions as F

    ua = F.lower(user_agent)
    out = F.when(user_agent.isNull(), F.lit("unknown"))
    for label, markers in DEVICE_MARKERS:
        out = out.when(reduce(lambda a, b: a | b, [ua.contains(m) for m in markers]), F.lit(label))
    return out.otherwise(F.lit("unknown"))


def ip_family(ip: "Column") -> "Column":
    from pyspark.sql import functions as F

    return (F.when(ip.rlike(r"^(\d{1,3}\.){3}\d{1,3}$"), F.lit("ipv4"))
            .when(ip.rlike(r"^[0-9A-Fa-f:.]+$") & ip.contains(":"), F.lit("ipv6"))
            .otherwise(F.lit("unknown")))


def to_silver(bronze: "DataFrame", keys: "DataFrame") -> "DataFrame":
    """Bronze rows (any encryption key version) -> silver rows."""
    from pyspark.sql import functions as F

    # Join on the version each bronze row was encrypted with: key rotation keeps old
    # bronze readable. The pseudonym key is the current one (same on every key row).
    joined = bronze.join(F.broadcast(keys), bronze["enc_key_version"] == keys["enc_version"], "inner")
    ipad, opad, key = F.col("pad_ipad"), F.col("pad_opad"), F.col("enc_key")
    from privrec_pipeline.transforms.collect import IDENTIFIERS_CONTEXT, identifiers_schema

    plain = crypto.decrypt_to_string(F.col("identifiers_enc"), IDENTIFIERS_CONTEXT, key, F.col("event_id"))
    decrypted = joined.select("*", F.from_json(plain, identifiers_schema()).alias("_ids")).select(
        "*", F.col("_ids.user_agent").alias("_ua"), F.col("_ids.ip").alias("_ip"),
        F.col("_ids.search_query").alias("_q"),
    )
    return decrypted.select(
        crypto.pseudonym(ipad, opad, "event", F.col("event_id")).alias("event_id"),
        "event_time", "event_type",
        crypto.pseudonym(ipad, opad, "user", F.col("user_id")).alias("user_pseudonym"),
        crypto.pseudonym(ipad, opad, "session", F.col("session_id")).alias("session_pseudonym"),
        "item_id", "category", "price", "quantity", "rating",
        device_class(F.col("_ua")).alias("device_class"),
        ip_family(F.col("_ip")).alias("ip_family"),
        scrub_text(F.col("_q")).alias("search_query"),
        F.col("pseudonym_version").alias("pseudonym_key_version"),
    )
