"""collect: landing lines -> classified records -> bronze + quarantine (DataFrame transforms).

Parsing happens in the JVM with an explicit schema; records the parser rejects are re-parsed
as VARIANT so every field's JSON type is checked exactly: a price of ``"abc"`` or ``true``
is a wrong type, not a silently cast value. Ids accept strings and integers (numeric ids
are common), free text also numbers and booleans (as their text); codes and timestamps only
strings; an object or array is a wrong type everywhere. Both paths apply the same rules. Checks run in the order of ``QuarantineReason``;
the first that fails names the record's reason and ``detail`` names the field.

Event-time policy: a record belongs to the data interval [start, end) of its run, compared in
UTC; a record whose event_time falls outside is quarantined as
``event_time_outside_interval`` (late or early data is not silently moved to another day).
"""

from __future__ import annotations

import datetime as dt
import operator
from functools import reduce
from typing import TYPE_CHECKING

from privrec_pipeline import crypto
from privrec_pipeline.schema import (
    DIRECT_IDENTIFIERS,
    EVENT_TYPES,
    MAX_RECORD_BYTES,
    RAW_FIELDS,
    FieldKind,
    QuarantineReason,
)
from privrec_pipeline.transforms import generalize

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame
    from pyspark.sql.types import StructType

# JSON value types accepted per field kind, as named by Spark's schema_of_variant.
_INTEGER_TYPES = ("TINYINT", "SMALLINT", "INT", "BIGINT")
_ACCEPTED_TYPES: dict[FieldKind, tuple[str, ...]] = {
    FieldKind.ID: ("STRING", *_INTEGER_TYPES),
    FieldKind.CODE: ("STRING",),
    FieldKind.TEXT: ("STRING", "BOOLEAN", "FLOAT", "DOUBLE", *_INTEGER_TYPES),
    FieldKind.TIMESTAMP: ("STRING",),
    FieldKind.NUMBER: ("FLOAT", "DOUBLE", *_INTEGER_TYPES),
    FieldKind.INTEGER: _INTEGER_TYPES,
}
_SPARK_TYPE: dict[FieldKind, str] = {
    FieldKind.ID: "string",
    FieldKind.CODE: "string",
    FieldKind.TEXT: "string",
    FieldKind.TIMESTAMP: "string",
    FieldKind.NUMBER: "double",
    FieldKind.INTEGER: "bigint",
}
# ISO-8601 date-time with an explicit zone; Spark's parser then checks the calendar.
ISO_WITH_ZONE = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})$"

IDENTIFIERS_CONTEXT = "identifiers"  # AAD label of the bronze identifiers ciphertext
# A JSON number with a fraction or exponent (as the parser renders it into a string field).
JSON_FRACTION = r"^-?[0-9]+(\.[0-9]+([eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+)$"
BRONZE_EVENT_COLUMNS = (
    "event_id", "event_time", "event_type", "user_id", "session_id", "item_id",
    "category", "price", "quantity", "rating",
)


def _type_ok(type_name: "Column", kind: FieldKind) -> "Column":

    accepted = _ACCEPTED_TYPES[kind]
    ok = type_name.isin("VOID", *accepted)  # JSON null: the field is absent
    if kind in (FieldKind.NUMBER, FieldKind.TEXT):  # JSON numbers with a fraction parse as DECIMAL(p,s)
        ok = ok | type_name.startswith("DECIMAL")
    return ok


def _first_field(conditions: list[tuple[str, "Column"]]) -> "Column":
    """Name of the first field whose condition holds, else null."""
    from pyspark.sql import functions as F

    return F.coalesce(*[F.when(cond, F.lit(name)) for name, cond in conditions])


def landing_struct() -> "StructType":
    """The explicit read schema of landing records (plus the parser's corrupt-record column)."""
    from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

    spark_type = {"string": StringType(), "double": DoubleType(), "bigint": LongType()}
    return StructType(
        [StructField(f.name, spark_type[_SPARK_TYPE[f.kind]]) for f in RAW_FIELDS]
        + [StructField("_corrupt", StringType())]
    )


def record_position() -> "Column":
    """The ``record_position`` column, a line's place in the run's read of the landing files.

    Spark's ``monotonically_increasing_id`` over the scan (``classify_landing`` applies it to
    the lines before any other step): the scan partition's index in the upper 31 bits (a
    partition reads one or more file splits, in a fixed order) and the line's index within
    the partition in the lower 33. Unique per line within a run; a rerun over the same files
    with the same split settings (``spark.sql.files.maxPartitionBytes``, ``openCostInBytes``,
    the default parallelism) gives every line the same position, as it writes the same
    bronze files. Spark's text reader has no line-number or byte-offset column.
    """
    from pyspark.sql import functions as F

    return F.monotonically_increasing_id()


def classify_landing(lines: "DataFrame", start: dt.datetime, end: dt.datetime,
                     catalog_items: "DataFrame | None" = None) -> "DataFrame":
    """Parse raw landing lines and decide, per line, accepted or quarantined with a reason.

    ``lines`` has ``value`` (the raw line, bytes as read) and ``source_file``. The result has
    ``reason`` (null when accepted), ``detail``, ``source_file``, ``record_position`` (see
    ``record_position``), the typed fields of the landing contract (``event_time`` as a UTC
    timestamp) and ``value``, the raw line, kept for rejected records only.

    Two paths, one decision: every line is parsed once with the explicit schema (Jackson,
    fast). Lines the parser flags as corrupt, or whose text fields look like a JSON object
    or array, are "suspect" and re-parsed as VARIANT to name the exact problem (malformed,
    not an object, which field has which wrong type). Suspect lines are rare, so the
    precise path costs almost nothing on clean data.

    With ``catalog_items`` (a DataFrame of the day's catalog ``item_id``s, broadcast), an
    otherwise valid record whose item is not in the catalog is quarantined as
    ``unknown_item`` (the last rule: a record with another problem keeps that reason).
    """
    from pyspark.sql import functions as F

    text_fields = [f.name for f in RAW_FIELDS if _SPARK_TYPE[f.kind] == "string"]
    # JSON numbers and booleans arrive in string-typed fields as their text. Cheap tests
    # (first character, a contained dot or exponent) send such lines to the precise path:
    # codes never start like a number; ids may be integers but not fractions or booleans.
    # (event_time needs none: a number there fails the ISO check as bad_timestamp.)
    codes = [f.name for f in RAW_FIELDS if f.kind is FieldKind.CODE]
    id_fields = [f.name for f in RAW_FIELDS if f.kind is FieldKind.ID]

    def numeric_start(c: "Column") -> "Column":
        return F.substring(c, 1, 1).isin(*"-0123456789")

    def boolean(c: "Column") -> "Column":
        return c.isin("true", "false")

    # Stages are separate projections so each parse runs once per line.
    parsed = lines.select(
        "value", "source_file", record_position().alias("record_position"),
        F.is_valid_utf8("value").alias("_utf8"),
        F.octet_length("value").alias("_bytes"),
        F.from_json("value", landing_struct(), {"columnNameOfCorruptRecord": "_corrupt"}).alias("_j"),
    )
    flat = parsed.select(
        "value", "source_file", "record_position", "_utf8", "_bytes",
        reduce(operator.or_, [
            F.col("_j").isNull(), F.col("_j._corrupt").isNotNull(),
            *[F.substring(f"_j.{n}", 1, 1).isin("{", "[") for n in text_fields],
            *[numeric_start(F.col(f"_j.{n}")) | boolean(F.col(f"_j.{n}")) for n in codes],
            *[(numeric_start(F.col(f"_j.{n}")) & F.col(f"_j.{n}").rlike(JSON_FRACTION)) | boolean(F.col(f"_j.{n}"))
              for n in id_fields],
        ])
        .alias("_suspect"),
        *[F.col(f"_j.{f.name}").alias(f.name) for f in RAW_FIELDS],
    )
    precise = flat.select(
        "*", F.when(F.col("_suspect") & F.col("_utf8"), F.try_parse_json("value")).alias("_v"),
    )
    typed_checks = precise.select(
        "*",
        F.schema_of_variant("_v").alias("_top"),
        # One guard for all fields: the per-field checks exist only for suspect lines.
        F.when(F.col("_v").isNotNull(), _first_field([
            (f.name, ~_type_ok(F.schema_of_variant(F.try_variant_get("_v", f"$.{f.name}", "variant")), f.kind))
            for f in RAW_FIELDS
        ])).alias("_wrong"),
    )
    checks = typed_checks.select(
        "value", "source_file", "record_position", "_utf8", "_bytes", "_suspect", "_v", "_top", "_wrong",
        _first_field([(f.name, F.col(f.name).isNull()) for f in RAW_FIELDS if f.required]).alias("_missing"),
        # Bytes bound characters from above: count characters only for long values.
        _first_field([(f.name, (F.octet_length(f.name) > F.lit(f.max_chars))
                       & (F.char_length(f.name) > F.lit(f.max_chars)))
                      for f in RAW_FIELDS if f.max_chars is not None]).alias("_oversize"),
        *[f.name for f in RAW_FIELDS if f.name != "event_time"],
        F.when(F.col("event_time").rlike(ISO_WITH_ZONE), F.try_to_timestamp("event_time"))
        .alias("event_time"),
    )

    R = QuarantineReason
    event_time = F.col("event_time")
    top_type = F.coalesce(F.col("_top"), F.lit("VOID"))
    rules: list[tuple[QuarantineReason, "Column", "Column"]] = [
        (R.INVALID_UTF8, ~F.col("_utf8"), F.lit(None)),
        (R.OVERSIZE_RECORD, F.col("_bytes") > F.lit(MAX_RECORD_BYTES), F.col("_bytes").cast("string")),
        (R.MALFORMED_JSON, F.col("_suspect") & F.col("_v").isNull(), F.lit(None)),
        (R.NOT_AN_OBJECT, F.col("_suspect") & ~top_type.startswith("OBJECT"),
         F.regexp_extract(top_type, r"^[A-Z]+", 0)),
        (R.MISSING_FIELD, F.col("_missing").isNotNull(), F.col("_missing")),
        (R.WRONG_TYPE, F.col("_wrong").isNotNull(), F.col("_wrong")),
        (R.BAD_TIMESTAMP, event_time.isNull(), F.lit("event_time")),
        (R.OVERSIZE_FIELD, F.col("_oversize").isNotNull(), F.col("_oversize")),
        (R.UNKNOWN_EVENT_TYPE, ~F.col("event_type").isin(*EVENT_TYPES), F.lit("event_type")),
        (R.EVENT_TIME_OUTSIDE_INTERVAL,
         (event_time < F.lit(start)) | (event_time >= F.lit(end)), F.lit("event_time")),
    ]
    if catalog_items is not None:
        known = F.broadcast(catalog_items.select(F.col("item_id").alias("_catalog_item")).distinct())
        checks = checks.join(known, checks["item_id"] == known["_catalog_item"], "left")
        rules.append((R.UNKNOWN_ITEM, F.col("_catalog_item").isNull(), F.lit("item_id")))
    # One code per record: the first rule that holds (CASE WHEN evaluates in order).
    reason = F.when(rules[0][1], F.lit(rules[0][0].value))
    detail = F.when(rules[0][1], rules[0][2])
    for code, cond, det in rules[1:]:
        reason = reason.when(cond, F.lit(code.value))
        detail = detail.when(cond, det)

    # The raw line is kept only where it is needed: in quarantine.
    return checks.select(
        reason.alias("reason"), detail.alias("detail"), "source_file", "record_position",
        *[f.name for f in RAW_FIELDS], "value",
    ).withColumn("value", F.when(F.col("reason").isNotNull(), F.col("value")))


def duplicate_ids(valid: "DataFrame") -> "DataFrame":
    """event_ids that occur more than once, with their count (a narrow aggregation: on
    real logs duplicates are rare, so only these ids need the costlier dedupe)."""
    return valid.groupBy("event_id").count().where("count > 1")


def dedupe_events(valid: "DataFrame", dup_ids: "DataFrame", *, broadcast: bool = True) -> "DataFrame":
    """One record per event_id. Records with a unique id pass through untouched (and keep
    their input order); among duplicates the kept one is the first by (event_time,
    source_file, then every column), so the choice does not depend on partitioning and a
    rerun keeps the same one (the identifiers ciphertext is a deterministic function of the
    identifiers, see ``crypto.encrypt``; records equal in all columns are identical)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    # Broadcasting the (normally few) duplicated ids keeps the unique records in place: no
    # shuffle of the day's rows. Callers pass broadcast=False when there are too many.
    ids = dup_ids.select("event_id")
    if broadcast:
        ids = F.broadcast(ids)
    unique = valid.join(ids, "event_id", "left_anti")
    order = ["event_time", "source_file", *[c for c in valid.columns if c not in ("event_id", "event_time", "source_file")]]
    w = Window.partitionBy("event_id").orderBy(*order)
    first = (valid.join(ids, "event_id", "left_semi")
             .withColumn("_rank", F.row_number().over(w)).where("_rank = 1").drop("_rank"))
    return unique.unionByName(first)


BRONZE_COLUMNS = (
    *BRONZE_EVENT_COLUMNS, "identifiers_enc", "enc_key_version", "data_key", "source_file",
    "device_class", "ip_family", "search_query_scrubbed",
)
QUARANTINE_COLUMNS = (
    "reason", "detail", "source_file", "record_position", "record_bytes", "raw_record_enc", "enc_key_version",
    "data_key",
)
RAW_RECORD_CONTEXT = "raw_record"  # AAD label of the quarantine raw-line ciphertext


def raw_record_aad(source_file: str | None, record_position: int) -> bytes:
    """The associated data a quarantine row's ``raw_record_enc`` was encrypted with (for a
    reviewer decrypting with ``crypto.reference_decrypt``): ``raw_record|<source_file>|<record_position>``."""
    return f"{RAW_RECORD_CONTEXT}|{source_file or ''}|{record_position}".encode()


def raw_record_suffix() -> "Column":
    """Per-row part of the raw line's AAD, the row's place: source file and position (the
    position last, so a '|' in a file name cannot make two places read alike)."""
    from pyspark.sql import functions as F

    return F.concat_ws("|", F.coalesce(F.col("source_file"), F.lit("")), F.col("record_position").cast("string"))


def to_collected(classified: "DataFrame", keys: "DataFrame", key_version: str) -> "DataFrame":
    """Every classified line in its stored form, bronze and quarantine columns side by side,
    so one pass over the landing files computes both (``BRONZE_COLUMNS`` of accepted rows,
    ``QUARANTINE_COLUMNS`` of rows with a ``reason``).

    Bronze: typed event fields; the direct identifiers only as one AES-GCM ciphertext
    (``identifiers_enc``, a JSON object of email, ip, user_agent, search_query: one cipher
    operation per row instead of one per field, kept for audit and erasure), and their
    generalized forms (device class, IP family, scrubbed search text), derived while the
    plaintext is in hand so downstream never needs to decrypt.

    Quarantine: reason, detail, source file, record position and the raw line, encrypted (it
    may hold identifiers), so a reviewer with the key can inspect it and nobody else can. The
    ciphertext's associated data names the row's place (``raw_record_aad``): equal lines at
    two places get different ciphertexts (the synthetic IV covers the AAD), and a ciphertext
    moved to another row or file fails to decrypt there.

    When bronze and quarantine are written, both ciphertexts of a record with a user id are
    sealed once more under that user's data key (``erasure.data_keys.seal``), which adds the
    ``data_key`` column.
    """
    from pyspark.sql import functions as F

    k = F.broadcast(keys.where(F.col("enc_version") == key_version))
    accepted = F.col("reason").isNull()
    identifiers = F.to_json(F.struct(*[F.col(n) for n in DIRECT_IDENTIFIERS]))
    enc = (F.col("enc_key"), F.col("iv_ipad"), F.col("iv_opad"))

    def bronze_only(column: "Column") -> "Column":
        return F.when(accepted, column)

    return classified.crossJoin(k).select(
        "reason", "detail", *BRONZE_EVENT_COLUMNS, "source_file", "record_position",
        bronze_only(crypto.encrypt(identifiers, IDENTIFIERS_CONTEXT, *enc,
                                   context_suffix=F.col("event_id"))).alias("identifiers_enc"),
        bronze_only(generalize.device_class(F.col("user_agent"))).alias("device_class"),
        bronze_only(generalize.ip_family(F.col("ip"))).alias("ip_family"),
        bronze_only(generalize.scrub_text(F.col("search_query"))).alias("search_query_scrubbed"),
        # ``value`` is kept by classify_landing for rejected lines only.
        F.octet_length("value").alias("record_bytes"),
        crypto.encrypt(F.col("value"), RAW_RECORD_CONTEXT, *enc, context_suffix=raw_record_suffix())
        .alias("raw_record_enc"),
        F.col("enc_version").alias("enc_key_version"),
        *[c for c in ("_erased",) if c in classified.columns],  # erasure.collect_filter's flag
    )
