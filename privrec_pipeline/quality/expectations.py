"""Three Great Expectations checks of the silver suite, written as GE custom expectations
(GE 1.x extension API: a metric provider plus an Expectation class, registered on import)
because the built-in ones cost a large share of the validate step on Spark:

- ``expect_column_values_to_be_hex_digests``: every value is exactly ``length`` lowercase
  hex characters. Equivalent to ``expect_column_values_to_match_regex`` with
  ``^[0-9a-f]{length}$``, evaluated without a regular expression: byte length, Spark's
  ``unhex`` (null unless every character is a hex digit) and ``lower(v) == v`` (no A-F).
  On 2M rows and three pseudonym columns: 1.2 s against 3.1 s for the regex (BENCHMARKS.md).
- ``expect_column_to_have_no_duplicate_values``: no non-null value occurs twice; the
  observed value is the number of rows whose value occurs more than once. Repeated 64-bit
  hashes are found first (sorted on the driver up to ``DRIVER_HASH_MAX_ROWS``, else a Spark
  group-by), then only their values are grouped: exact (see ``duplicate_rows``), and cheaper
  than the window count over the values of ``expect_column_values_to_be_unique``.
- ``expect_column_values_to_not_match_regex_list_prefiltered``: no value matches any of a
  list of regexes, each run only on values holding one of the characters every match of it
  contains (the PII patterns: '@' for the email pattern, ':' for IPv6, an ASCII digit for
  the others). With ``normalization: nfkc_fold`` values are matched with their characters'
  single-character NFKC forms (NFKC text, as the scrubber writes it, unchanged); the
  prefilters then apply to ASCII values (see ``prefiltered_match_condition``).

All results hold counts only, never values (the privacy rule of the reports).
"""

from __future__ import annotations

from typing import Any, ClassVar

from great_expectations.execution_engine import SparkDFExecutionEngine
from great_expectations.expectations.expectation import (
    ColumnAggregateExpectation,
    ColumnMapExpectation,
)
from great_expectations.expectations.metrics import (
    ColumnAggregateMetricProvider,
    ColumnMapMetricProvider,
    column_condition_partial,
)
from great_expectations.expectations.metrics.metric_provider import metric_value
from great_expectations.render import LegacyRendererType
from great_expectations.render.renderer.renderer import renderer

HEX_DIGEST_METRIC = "column_values.privrec_hex_digest"
DUPLICATE_ROWS_METRIC = "column.privrec_duplicate_rows"
PREFILTERED_REGEX_METRIC = "column_values.privrec_not_match_regex_list_prefiltered"


def hex_digest_condition(column: Any, length: int) -> Any:
    """True where the string is exactly ``length`` characters of [0-9a-f] (a Spark Column)."""
    from pyspark.sql import functions as F

    # octet_length counts bytes, so a multi-byte character cannot pass as one hex digit;
    # unhex is null unless every character is in [0-9a-fA-F]; of those, lower() changes only
    # A-F (one pass, where six contains() scans cost 0.8 s per column on 2M rows).
    return (F.octet_length(column) == length) & F.unhex(column).isNotNull() & (F.lower(column) == column)


MAX_SUSPECT_HASHES = 10_000  # beyond this many repeated hashes, group every row by value
# Up to this many rows, the hashes are sorted on the driver (8 bytes a row through Arrow, about
# 1.2 GB of driver memory at the limit) instead of grouped by a Spark shuffle: on 2M rows from
# a cold JVM, 1.6-1.8 s against 3.7-4.0 s (BENCHMARKS.md). Larger days use the shuffle.
DRIVER_HASH_MAX_ROWS = 50_000_000


def _repeated_hashes(hashed: Any, rows: int | None) -> list[int]:
    """Hash values that occur more than once in ``hashed`` (columns ``v``, ``h``); the list
    may be cut at ``MAX_SUSPECT_HASHES + 1`` entries."""
    from pyspark.sql import functions as F

    if rows is not None and rows <= DRIVER_HASH_MAX_ROWS:
        import numpy as np

        h = np.sort(hashed.select("h").toArrow().column("h").to_numpy())
        return np.unique(h[1:][h[1:] == h[:-1]]).tolist()
    return [r["h"] for r in hashed.groupBy("h").count().where(F.col("count") > 1)
            .select("h").limit(MAX_SUSPECT_HASHES + 1).collect()]


def duplicate_rows(df: Any, column: str, rows: int | None = None, hash_fn: Any = None) -> int:
    """Rows whose non-null ``column`` value occurs more than once, exactly.

    The values' 64-bit hashes are checked for repeats first (sorted on the driver when the
    table's row count ``rows`` is known and at most ``DRIVER_HASH_MAX_ROWS``, else grouped by
    Spark; either way 8 bytes a row instead of the value): distinct hashes imply distinct
    values, so a day without a repeated hash is done; otherwise only the rows of repeated
    hashes are grouped by value, which tells duplicates from hash collisions. ``hash_fn``
    (default ``xxhash64``) is for tests.
    """
    from pyspark.sql import functions as F

    value = F.col(column)
    hashed = df.where(value.isNotNull()).select(value.alias("v"), (hash_fn or F.xxhash64)(value).alias("h"))
    repeated = _repeated_hashes(hashed, rows)
    if not repeated:
        return 0
    suspects = hashed.where(F.col("h").isin(repeated)) if len(repeated) <= MAX_SUSPECT_HASHES else hashed
    row = suspects.groupBy("v").count().where(F.col("count") > 1).agg(F.sum("count").alias("rows")).first()
    return int(row["rows"] or 0)


def _described(describe: Any) -> Any:
    """A legacy prescriptive renderer (Data Docs' one-line description of an expectation, as
    the built-in expectations have; without one Data Docs print the raw kwargs) from
    ``describe(kwargs) -> (template, params)``."""

    @renderer(renderer_type=LegacyRendererType.PRESCRIPTIVE)
    def render(cls: Any, configuration: Any = None, result: Any = None,
               runtime_configuration: dict | None = None, **kwargs: Any) -> list:
        from great_expectations.render import RenderedStringTemplateContent

        runtime_configuration = runtime_configuration or {}
        given = configuration.kwargs if configuration else {}
        template, params = describe(given)
        if given.get("column") and runtime_configuration.get("include_column_name") is not False:
            template, params = "$column " + template, {**params, "column": given["column"]}
        return [RenderedStringTemplateContent(content_block_type="string_template", string_template={
            "template": template, "params": params, "styling": runtime_configuration.get("styling")})]

    return classmethod(render)


def _regex_list(kwargs: dict) -> tuple[str, dict[str, str]]:
    params = {f"regex_{i}": p["regex"] for i, p in enumerate(kwargs.get("patterns") or [])}
    template = f"values must not match any of these regular expressions: {', '.join('$' + n for n in params)}"
    if kwargs.get("normalization"):
        template, params = template + " (in their $normalization form)", {**params, "normalization": kwargs["normalization"]}
    return template + ".", params


class ColumnValuesHexDigest(ColumnMapMetricProvider):
    condition_metric_name = HEX_DIGEST_METRIC
    condition_value_keys = ("length",)

    @column_condition_partial(engine=SparkDFExecutionEngine)
    def _spark(cls, column: Any, length: int, **kwargs: Any) -> Any:
        return hex_digest_condition(column, length)


class ExpectColumnValuesToBeHexDigests(ColumnMapExpectation):
    """Expect each value to be exactly ``length`` lowercase hexadecimal characters."""

    length: int = 64
    map_metric: ClassVar[str] = HEX_DIGEST_METRIC
    success_keys: ClassVar[tuple[str, ...]] = ("length", "mostly")
    args_keys: ClassVar[tuple[str, ...]] = ("column", "length")

    _prescriptive_renderer = _described(lambda kwargs: (
        "values must be exactly $length lowercase hexadecimal characters.", {"length": kwargs.get("length", 64)}))

NORMALIZATIONS = ("nfkc_fold",)  # privrec_pipeline.transforms.generalize.nfkc_fold


def prefiltered_match_condition(column: Any, patterns: list[dict[str, str]], normalization: str | None = None) -> Any:
    """True where ``column`` matches any of the patterns' ``regex`` (Spark ``rlike``: found
    anywhere). A pattern's regex runs only on values holding one of its ``required_chars``:
    the caller guarantees that the regex cannot match a value without any of them, so the
    result equals ``column.rlike(r1) | column.rlike(r2) | ...``. Patterns with the same
    ``required_chars`` share one prefilter; empty ``required_chars``: no prefilter.

    ``normalization="nfkc_fold"``: the result equals ``nfkc_fold(column).rlike(r1) | ...``
    (each character replaced by its NFKC form where that is one ASCII character; on NFKC
    text, such as what the scrubber wrote, the identity). ASCII values are unchanged by it
    and the prefilters apply to them: the caller guarantees ``required_chars`` for ASCII
    text, where e.g. a decimal digit (``\\d`` under ``(?U)``) is one of 0-9. Any other value
    is folded and matched against all regexes as one alternation, without prefilter: Arabic-
    Indic or Devanagari digits stay digits under NFKC, so an ASCII-digit prefilter would
    skip them. (Full NFKC, ``generalize.nfkc``, calls Java by reflection, which Spark treats
    as non-deterministic and refuses inside the aggregate this condition is counted in.)"""
    from pyspark.sql import functions as F

    if normalization is None:
        return _prefiltered(column, patterns)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}: use one of {NORMALIZATIONS} or none")
    from privrec_pipeline.transforms.generalize import is_ascii, nfkc_fold

    union = "|".join(f"(?:{p['regex']})" for p in patterns)
    return F.when(is_ascii(column), _prefiltered(column, patterns)).otherwise(nfkc_fold(column).rlike(union))


def _prefiltered(column: Any, patterns: list[dict[str, str]]) -> Any:
    groups: dict[str, list[str]] = {}
    for pattern in patterns:
        groups.setdefault(pattern.get("required_chars") or "", []).append(pattern["regex"])
    if not groups:
        raise ValueError("no patterns to match")
    condition = None
    for chars, regexes in groups.items():
        matched = column.rlike(regexes[0])
        for regex in regexes[1:]:
            matched = matched | column.rlike(regex)
        if chars:
            candidate = column.contains(chars[0])
            for char in chars[1:]:
                candidate = candidate | column.contains(char)
            matched = candidate & matched  # Spark evaluates AND lazily: no regex for other values
        condition = matched if condition is None else condition | matched
    return condition


class ColumnValuesMatchRegexListPrefiltered(ColumnMapMetricProvider):
    condition_metric_name = PREFILTERED_REGEX_METRIC
    condition_value_keys = ("patterns", "normalization")

    @column_condition_partial(engine=SparkDFExecutionEngine)
    def _spark(cls, column: Any, patterns: list[dict[str, str]], normalization: str | None = None,
               **kwargs: Any) -> Any:
        return ~prefiltered_match_condition(column, patterns, normalization)


class ExpectColumnValuesToNotMatchRegexListPrefiltered(ColumnMapExpectation):
    """Expect no value to match any of the ``patterns`` (each ``{"regex", "required_chars"}``)
    anywhere; a pattern's regex runs only on values holding one of its ``required_chars``,
    which every match of it must contain. ``normalization`` ("nfkc_fold" or none): match
    the values' folded form (see ``prefiltered_match_condition``)."""

    patterns: list[dict[str, str]]
    normalization: str | None = None
    map_metric: ClassVar[str] = PREFILTERED_REGEX_METRIC
    success_keys: ClassVar[tuple[str, ...]] = ("patterns", "normalization", "mostly")
    args_keys: ClassVar[tuple[str, ...]] = ("column", "patterns", "normalization")

    _prescriptive_renderer = _described(_regex_list)


class ColumnDuplicateRows(ColumnAggregateMetricProvider):
    metric_name = DUPLICATE_ROWS_METRIC

    @metric_value(engine=SparkDFExecutionEngine)
    def _spark(cls, execution_engine: SparkDFExecutionEngine, metric_domain_kwargs: dict,
               metric_value_kwargs: dict, metrics: dict, runtime_configuration: dict) -> int:
        from great_expectations.core.metric_domain_types import MetricDomainTypes

        df, _, accessor = execution_engine.get_compute_domain(metric_domain_kwargs, MetricDomainTypes.COLUMN)
        return duplicate_rows(df, accessor["column"], rows=metrics.get("table.row_count"))


class ExpectColumnToHaveNoDuplicateValues(ColumnAggregateExpectation):
    """Expect no non-null value of the column to occur more than once."""

    metric_dependencies: ClassVar[tuple[str, ...]] = (DUPLICATE_ROWS_METRIC,)
    success_keys: ClassVar[tuple[str, ...]] = ()
    args_keys: ClassVar[tuple[str, ...]] = ("column",)

    _prescriptive_renderer = _described(lambda kwargs: (
        "values must be unique (observed: rows whose value occurs more than once).", {}))

    def _validate(self, metrics: dict, runtime_configuration: dict | None = None,
                  execution_engine: Any = None) -> dict[str, Any]:
        duplicated = int(metrics[DUPLICATE_ROWS_METRIC])
        return {"success": duplicated == 0, "result": {"observed_value": duplicated}}
