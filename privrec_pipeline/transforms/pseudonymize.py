"""pseudonymize: bronze -> silver. Keyed pseudonyms replace every raw id.

Silver holds no email, ip, user_agent or raw id (privacy contract point 2):
- event_id, user_id, session_id -> HMAC-SHA256 pseudonyms (64 hex) under the current key,
  with ``pseudonym_key_version`` so a key rotation is visible in the data;
- the generalized fields collect derived (device_class, ip_family, scrubbed search_query,
  see ``transforms.generalize``) are carried over; the encrypted identifiers are not.
No decryption happens here: pseudonymize never sees an email, address or agent string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from privrec_pipeline import crypto

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

SILVER_COLUMNS = (
    "event_id", "event_time", "event_type", "user_pseudonym", "session_pseudonym", "item_id",
    "category", "price", "quantity", "rating", "device_class", "ip_family", "search_query",
    "pseudonym_key_version",
)


def to_silver(bronze: "DataFrame", keys: "DataFrame") -> "DataFrame":
    """Bronze rows -> silver rows, pseudonyms under the current pseudonym key."""
    from pyspark.sql import functions as F

    key = F.broadcast(keys.select("pad_ipad", "pad_opad", "pseudonym_version").limit(1))
    ipad, opad = F.col("pad_ipad"), F.col("pad_opad")
    return bronze.crossJoin(key).select(
        crypto.pseudonym(ipad, opad, "event", F.col("event_id")).alias("event_id"),
        "event_time", "event_type",
        crypto.pseudonym(ipad, opad, "user", F.col("user_id")).alias("user_pseudonym"),
        crypto.pseudonym(ipad, opad, "session", F.col("session_id")).alias("session_pseudonym"),
        "item_id", "category", "price", "quantity", "rating", "device_class", "ip_family",
        F.col("search_query_scrubbed").alias("search_query"),
        F.col("pseudonym_version").alias("pseudonym_key_version"),
    )
