"""PII in any script: the scrubber replaces it before silver and the quality gate's PII scan
finds it in silver; ordinary text in any script passes both untouched."""

from __future__ import annotations

import unicodedata

import pytest

pytestmark = pytest.mark.spark

# (text, what the scrubber must make of it). Each holds PII written with characters outside
# ASCII: letters of other scripts, full-width forms (NFKC maps them to ASCII), or decimal
# digits of other scripts (NFKC keeps them: the patterns read them as digits).
PII_CASES: list[tuple[str, str]] = [
    ("mail jürgen.müller@bücher.de bitte", "mail [email] bitte"),
    ("用户@例子.中国", "[email]"),
    ("почта иван.петров@пример.рф", "почта [email]"),
    ("contact ｊａｎｅ＠ｅｘａｍｐｌｅ．ｏｒｇ today", "contact [email] today"),  # full-width
    ("jane\ufe6bexample.org", "[email]"),  # small commercial at
    ("ruf an ＋４９ ３０ １２３４５６７８", "ruf an [phone]"),  # full-width digits, plus and spaces
    ("اتصل ٠١٢٣٤٥٦٧٨٩", "اتصل [phone]"),  # Arabic-Indic digits
    ("تماس ۰۹۱۲ ۳۴۵ ۶۷۸۹", "تماس [phone]"),  # Extended Arabic-Indic (Persian) digits
    ("call ९८७६५४३२१०", "call [phone]"),  # Devanagari digits
    ("tel +49\u00a030\u00a012345678", "tel [phone]"),  # no-break spaces
    ("①②③④⑤⑥⑦⑧", "[phone]"),  # circled digits: NFKC makes them 12345678
    ("card ４１１１ １１１１ １１１１ １１１１ ok", "card [card] ok"),  # full-width digits and spaces
    ("card ４１１１－１１１１－１１１１－１１１１", "card [card]"),  # full-width hyphen-minus
    ("card 4111\u20131111\u20131111\u20131111", "card [card]"),  # en dashes
    ("بطاقة ٤١١١ ١١١١ ١١١١ ١١١١", "بطاقة [card]"),
    ("from １９２．１６８．１．２０ again", "from [ip] again"),
    ("من ١٩٢.١٦٨.١.٢٠", "من [ip]"),
    ("ip 2001:db8::ff00:42:8329 now", "ip [ip] now"),
    ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "[ip]"),
    ("link-local fe80::1ff:fe23:4567:890a", "link-local [ip]"),
    ("ｆｅ８０：：１ｆｆ：ｆｅ２３：４５６７：８９０ａ", "[ip]"),  # full-width
    ("mapped ::ffff:192.0.2.1", "mapped ::ffff:[ip]"),
    # invisible characters NFKC keeps, inserted to hide PII from the patterns
    ("card 4111\u200b1111\u200b1111\u200b1111", "card [card]"),  # zero-width spaces
    ("john\u200d@exam\u00adple.com", "[email]"),  # zero-width joiner, soft hyphen
    ("call +49\u2060 30 1234\ufeff5678", "call [phone]"),  # word joiner, BOM
]
# Ordinary text that must reach silver unchanged and pass the gate.
LOOKALIKES = [
    "Grüße aus München", "Ärger über Öl", "naïve café", "東京 ラーメン", "Москва книги", "مرحبا بالعالم",
    "price 12.50 €", "preis １２,５０ €", "size 42 shoes", "iPhone 15 Pro Max 256GB", "itm_000557",
    "delivery 2024-01-15", "am 15.01.2024", "due 01/15/2024", "٢٠٢٤-٠١-١٥", "meet at 10:30:00", "std::vector",
    "a :: b", "ratio 1:2:3", "C++ 20", "mail@", "@home", "5 @ 3.99",
]


def _nfkc(text: str) -> str:
    """NFKC without the invisible characters the scrubber and the gate remove."""
    from privrec_pipeline.transforms.generalize import ignorable_characters

    return unicodedata.normalize("NFKC", text).translate({ord(c): None for c in ignorable_characters()})


def test_scrubber_replaces_pii_of_every_script(spark):
    from pyspark.sql import functions as F

    from privrec_pipeline.transforms.generalize import scrub_text

    texts = [t for t, _ in PII_CASES] + LOOKALIKES + [None]
    df = spark.createDataFrame([(t,) for t in texts], "q string")
    got = {r.q: r.s for r in df.select("q", scrub_text(F.col("q")).alias("s")).collect()}
    assert {t: got[t] for t, _ in PII_CASES} == dict(PII_CASES)
    # Ordinary text keeps its content (in NFKC form: full-width digits become ASCII).
    assert {t: got[t] for t in LOOKALIKES} == {t: _nfkc(t) for t in LOOKALIKES}
    assert got[None] is None


def test_gate_condition_finds_pii_of_every_script(spark):
    """The PII scan of the gate (prefilters and NFKC as declared in the silver suite) flags
    every PII case and no look-alike, and passes what the scrubber made of the PII cases."""
    from pyspark.sql import functions as F

    from privrec_pipeline.quality.expectations import prefiltered_match_condition
    from privrec_pipeline.quality.suites import PII_NORMALIZATION, PII_SCAN

    scrubbed = [s for _, s in PII_CASES]
    texts = [t for t, _ in PII_CASES] + LOOKALIKES + scrubbed
    df = spark.createDataFrame([(t,) for t in texts], "v string")
    got = {r.v: r.m for r in df.select("v", prefiltered_match_condition(
        F.col("v"), PII_SCAN, PII_NORMALIZATION).alias("m")).collect()}
    assert [t for t, _ in PII_CASES if not got[t]] == []
    assert [t for t in LOOKALIKES + scrubbed if got[t]] == []


def test_each_pattern_matches_its_kind_in_other_scripts(spark):
    """Per pattern (after NFKC): the email, phone, card, IPv4 and IPv6 pattern each find
    their kind, so the placeholders above do not come from a neighbouring pattern."""
    from pyspark.sql import functions as F

    from privrec_pipeline.transforms.generalize import PII_PATTERNS

    kinds = {
        "email": ["jürgen.müller@bücher.de", "用户@例子.中国", "ｊａｎｅ＠ｅｘａｍｐｌｅ．ｏｒｇ"],
        "phone": ["＋４９ ３０ １２３４５６７８", "٠١٢٣٤٥٦٧٨٩", "९८७६५४३२१०"],
        "card": ["４１１１ １１１１ １１１１ １１１１", "٤١١١ ١١١١ ١١١١ ١١١١"],
        "ipv4": ["１９２．１６８．１．２０", "١٩٢.١٦٨.١.٢٠"],
        "ipv6": ["2001:db8::ff00:42:8329", "ｆｅ８０：：１ｆｆ：ｆｅ２３：４５６７：８９０ａ"],
    }
    rows = [(kind, _nfkc(t)) for kind, ts in kinds.items() for t in ts]
    df = spark.createDataFrame(rows, "kind string, v string")
    got = df.select("kind", "v", *[F.col("v").rlike(p).alias(k) for k, p in PII_PATTERNS.items()]).collect()
    for row in got:
        assert row[row.kind], f"{row.kind} pattern misses {row.v!r}"


def test_gate_fold_is_nfkc_for_single_characters_and_keeps_nfkc_text(spark):
    """The gate's fold (Spark translate) maps each of its characters, supplementary ones
    included, to the ASCII character Python's NFKC gives, and leaves NFKC text unchanged."""
    from pyspark.sql import functions as F

    from privrec_pipeline.transforms.generalize import nfkc_fold, nfkc_fold_table

    source, _ = nfkc_fold_table()
    assert {"\uff20", "\ufe6b", "\uff11", "\u2460", "\u00a0", "\U0001d7ce"} <= set(source)  # ＠ ﹫ １ ① nbsp 𝟎
    texts = [source, *[t for t, _ in PII_CASES], *LOOKALIKES]
    df = spark.createDataFrame([(t, _nfkc(t)) for t in texts], "v string, n string")
    got = df.select(nfkc_fold(F.col("v")).alias("f"), nfkc_fold(F.col("n")).alias("fn")).collect()
    assert got[0].f == _nfkc(source)
    assert all(len(c) == 1 and c.isascii() for c in got[0].f)
    assert [r.fn for r in got] == [_nfkc(t) for t in texts]
