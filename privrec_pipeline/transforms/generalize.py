"""Generalization of quasi-identifiers and scrubbing of free text (privacy contract point 2).

Applied by collect while the plaintext is in hand, before anything is written:
- user_agent -> ``device_class`` (mobile, tablet, desktop, bot, unknown);
- ip -> ``ip_family`` (ipv4, ipv6, unknown): no address bits, no region (a coarse region
  needs a GeoIP database; none ships with privrec);
- search_query -> NFKC-normalized, then emails, card numbers, IPv4 and IPv6 addresses and
  phone numbers replaced by placeholders, then cut to ``MAX_QUERY_CHARS``.
Everything runs in the JVM (Spark built-ins; NFKC through ``java_method``, see ``nfkc``).

The PII patterns are written for every script: Java regular expressions (Spark's ``rlike``
and ``regexp_replace``) with the ``UNICODE_CHARACTER_CLASS`` flag ``(?U)``, under which
``\\d`` is any decimal digit (Unicode category Nd: Arabic-Indic, Devanagari, ...), ``\\w`` any
letter, mark, digit or connector and ``\\s`` any Unicode white space (java.util.regex.Pattern).
NFKC (Unicode Standard Annex #15) runs first, so compatibility forms become their plain
characters: full-width digits and signs ("＋４９", "＠") become ASCII, "①" becomes "1".
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column

MAX_QUERY_CHARS = 256
# Text is cut to this before scrubbing: Java regular expressions can take time quadratic in
# the length on hostile text, so the work per row stays bounded. Anything starting before
# MAX_QUERY_CHARS and shorter than the margin is still seen whole by the patterns.
SCRUB_WINDOW_CHARS = 2 * MAX_QUERY_CHARS
# Characters normalized before the scrub window is cut. NFKC lengthens text (one ligature
# can become several letters: the window is cut again after it) or shortens it by composing
# a letter and its combining marks; this margin covers text of up to two characters per
# normalized one (a letter with one combining mark).
NORMALIZE_WINDOW_CHARS = 2 * SCRUB_WINDOW_CHARS
# ICU4J ships with Spark (collations). Its Normalizer.compose(text, compat=true) is NFKC and
# is the one NFKC entry point with only String/boolean arguments, which is what Spark's
# ``java_method`` (reflection) can call; java.text.Normalizer needs an enum argument.
NFKC_CLASS, NFKC_METHOD = "com.ibm.icu.text.Normalizer", "compose"

# Patterns shared by the scrubber (collect) and the PII scan of the quality gate. Digits,
# letters and separators of every script: see the module docstring.
_NOT_IN_WORD = r"[\p{L}\p{M}\p{Nd}]"  # letters, marks and digits of any script
_SEPARATOR = r"[\s\p{Pd}]"  # Unicode white space or dash punctuation (hyphen, en dash, ...)
# The lookbehind starts a match only at the beginning of a run of local-part characters
# (the same matches, without rescanning a long run from each of its positions). The
# top-level domain is letters or marks of any script (``[^\W\d_]``: word characters that
# are not digits or '_'), so "用户@例子.中国" and "jürgen@bücher.de" match.
EMAIL_PATTERN = r"(?U)(?<![\w.%+\-])[\w.%+\-]+@[\w.\-]+\.[^\W\d_]{2,}"
# 13-19 digits, optionally grouped by spaces or dashes (payment card numbers, ISO/IEC 7812).
CARD_PATTERN = rf"(?U)\b\d(?:{_SEPARATOR}?\d){{12,18}}\b"
# A calendar date in digits of any script (four-digit year first or last, day and month of
# one or two digits, separated by '-', '.' or '/') standing alone: not a phone number,
# although it is a run of 8 digits. (A phone number written in this shape is not scrubbed.)
_DATE = r"(?:\d{4}[\-./]\d{1,2}[\-./]\d{1,2}|\d{1,2}[\-./]\d{1,2}[\-./]\d{4})(?!\p{Nd})"
# 7 or more digits with optional +, spaces, dots, dashes or parentheses between them, not
# inside a longer word (so hex digests and product codes are not phones) and not a date.
PHONE_PATTERN = rf"(?U)(?<!{_NOT_IN_WORD})(?!{_DATE})\+?\(?\d(?:[\s().\p{{Pd}}]*\d){{6,}}(?!{_NOT_IN_WORD})"
IPV4_PATTERN = r"(?U)\b(?:\d{1,3}\.){3}\d{1,3}\b"
# RFC 4291 section 2.2 text forms: eight groups of 1-4 hex digits, or fewer with "::" for a
# run of zero groups (at least two groups given, so "::" or "::1" alone are not addresses;
# an embedded IPv4 tail is replaced by IPV4_PATTERN, which runs first). Not inside a word
# or a longer run of colons, so "std::vector" and times like "10:30:00" are not addresses.
_HEX = "[0-9A-Fa-f]{1,4}"
IPV6_PATTERN = (rf"(?U)(?<![\w:])(?:{_HEX}(?::{_HEX}){{7}}|{_HEX}(?::{_HEX}){{0,6}}::{_HEX}(?::{_HEX}){{0,6}}"
                rf"|{_HEX}(?::{_HEX}){{1,6}}::|::{_HEX}(?::{_HEX}){{1,6}})(?![\w:])")
PII_PATTERNS: dict[str, str] = {
    "email": EMAIL_PATTERN, "phone": PHONE_PATTERN, "card": CARD_PATTERN, "ipv4": IPV4_PATTERN, "ipv6": IPV6_PATTERN,
}


def is_ascii(text: "Column") -> "Column":
    """True where every character is ASCII (one byte each in UTF-8)."""
    from pyspark.sql import functions as F

    return F.octet_length(text) == F.char_length(text)


# Invisible characters NFKC keeps: format characters (Cf: zero-width space and joiners, soft
# hyphen, word joiner, BOM, bidi marks, ...), the combining grapheme joiner, Hangul fillers and
# variation selectors (default-ignorable code points, Unicode Standard 5.21). Inserted between
# the characters of an email or a card number they would hide it from every pattern, so they
# are removed before matching, in the scrubber and in the gate's fold alike.
IGNORABLE_PATTERN = ("[\\p{Cf}\\x{034F}\\x{115F}\\x{1160}\\x{3164}\\x{FFA0}\\x{17B4}\\x{17B5}"
                     "\\x{180B}-\\x{180F}\\x{FE00}-\\x{FE0F}\\x{E0100}-\\x{E01EF}]")


@cache
def ignorable_characters() -> str:
    """The characters of ``IGNORABLE_PATTERN`` (Python's Unicode database), for ``translate``."""
    import unicodedata

    extra = {0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, 0x17B4, 0x17B5, *range(0x180B, 0x1810),
             *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)}
    return "".join(chr(c) for c in range(0x80, 0x110000)
                   if not 0xD800 <= c < 0xE000 and (c in extra or unicodedata.category(chr(c)) == "Cf"))


def nfkc(text: "Column") -> "Column":
    """NFKC of ``text`` (Unicode Standard Annex #15), computed in the JVM by ICU4J, without
    the invisible characters of ``IGNORABLE_PATTERN``; null stays null. ASCII text is its own
    NFKC and skips the (reflective) call."""
    from pyspark.sql import functions as F

    normalized = F.java_method(F.lit(NFKC_CLASS), F.lit(NFKC_METHOD), text, F.lit(True))
    return F.when(text.isNull() | is_ascii(text), text).otherwise(F.regexp_replace(normalized, IGNORABLE_PATTERN, ""))


NFKC_FOLD = "nfkc_fold"  # the gate's name of ``nfkc_fold`` (quality/suites.yaml)


@cache
def nfkc_fold_table() -> tuple[str, str]:
    """(from, to) for Spark's ``translate``: every non-ASCII character whose NFKC form is a
    single ASCII character, and that character (1,095 pairs in Unicode 14: full-width forms,
    '﹫', no-break spaces, superscript, subscript, circled and mathematical digits and
    letters, ...). Computed from Python's unicodedata."""
    import unicodedata

    pairs = []
    for code in range(0x80, 0x110000):
        if 0xD800 <= code < 0xE000:  # surrogates are not characters
            continue
        normalized = unicodedata.normalize("NFKC", chr(code))
        if len(normalized) == 1 and normalized.isascii():
            pairs.append((chr(code), normalized))
    return "".join(a for a, _ in pairs), "".join(b for _, b in pairs)


def nfkc_fold(text: "Column") -> "Column":
    """Each character replaced by its NFKC form where that is one ASCII character (Spark's
    ``translate``: deterministic, so unlike ``nfkc`` allowed inside an aggregate). Identity
    on NFKC text (NFKC output holds no such character), so on what ``scrub_text`` wrote it
    changes nothing; elsewhere it covers the compatibility forms that spell PII in ASCII
    characters ("＠", "１２３", "①"), not NFKC's multi-character expansions ("⑴" -> "(1)").
    The invisible characters of ``IGNORABLE_PATTERN`` are removed (``translate`` deletes the
    characters of its source that have no counterpart in its target)."""
    from pyspark.sql import functions as F

    source, target = nfkc_fold_table()
    return F.translate(text, source + ignorable_characters(), target)


def scrub_text(text: "Column") -> "Column":
    """NFKC, then replace emails, card numbers, IP addresses and phone numbers (in that
    order: cards and addresses are also digit runs, so they go before the phone pattern).
    The result is normalized text: what the quality gate checks is what was scrubbed."""
    from pyspark.sql import functions as F

    window = F.substring(nfkc(F.substring(text, 1, NORMALIZE_WINDOW_CHARS)), 1, SCRUB_WINDOW_CHARS)
    out = F.regexp_replace(window, EMAIL_PATTERN, "[email]")
    out = F.regexp_replace(out, CARD_PATTERN, "[card]")
    out = F.regexp_replace(out, IPV4_PATTERN, "[ip]")
    out = F.regexp_replace(out, IPV6_PATTERN, "[ip]")
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
