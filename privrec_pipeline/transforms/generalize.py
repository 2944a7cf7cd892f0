"""Generalization of quasi-identifiers and scrubbing of free text (privacy contract point 2).

Applied by collect while the plaintext is in hand, before anything is written:
- user_agent -> ``device_class`` (mobile, tablet, desktop, bot, unknown);
- ip -> ``ip_family`` (ipv4, ipv6, unknown): no address bits, no region (a coarse region
  needs a GeoIP database; none ships with privrec);
- search_query -> emails, card numbers, IPv4 addresses and phone numbers replaced by
  placeholders, then cut to ``MAX_QUERY_CHARS``.
Everything runs as Spark built-ins in the JVM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column

MAX_QUERY_CHARS = 256
# Text is cut to this before scrubbing: Java regular expressions can take time quadratic in
# the length on hostile text, so the work per row stays bounded. Anything starting before
# MAX_QUERY_CHARS and shorter than the margin is still seen whole by the patterns.
SCRUB_WINDOW_CHARS = 2 * MAX_QUERY_CHARS
# Patterns shared with the PII scans of the tests and the validation step.
# The lookbehind starts a match only at the beginning of a run of local-part characters
# (the same matches, without rescanning a long run from each of its positions).
EMAIL_PATTERN = r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"
# 13-19 digits, optionally grouped by spaces or dashes (payment card numbers, ISO/IEC 7812).
CARD_PATTERN = r"\b\d(?:[ \-]?\d){12,18}\b"
# 7 or more digits with optional +, spaces, dots, dashes or parentheses between them, not
# inside a longer word (so hex digests and product codes are not phones).
PHONE_PATTERN = r"(?<![0-9A-Za-z])\+?\(?\d(?:[\s().\-]*\d){6,}(?![0-9A-Za-z])"
IPV4_PATTERN = r"\b(?:\d{1,3}\.){3}\d{1,3}\b"


def scrub_text(text: "Column") -> "Column":
    """Replace emails, card numbers, IPv4 addresses and phone numbers (in that order: cards
    and addresses are also digit runs, so they go before the phone pattern)."""
    from pyspark.sql import functions as F

    out = F.regexp_replace(F.substring(text, 1, SCRUB_WINDOW_CHARS), EMAIL_PATTERN, "[email]")
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


IP_FAMILIES = ("ipv4", "ipv6", "unknown")


def ip_family(ip: "Column") -> "Column":
    from pyspark.sql import functions as F

    ipv4, ipv6, unknown = IP_FAMILIES
    return (F.when(ip.rlike(r"^(\d{1,3}\.){3}\d{1,3}$"), F.lit(ipv4))
            .when(ip.rlike(r"^[0-9A-Fa-f:.]+$") & ip.contains(":"), F.lit(ipv6))
            .otherwise(F.lit(unknown)))
