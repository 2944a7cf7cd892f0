"""The raw event contract (DESIGN.md "Raw event (landing) fields") and the quarantine reasons.

Everything that decides whether a landing record is accepted is declared here as data, so
the Spark transforms, the synthetic generator and the tests agree on one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EventType(StrEnum):
    VIEW = "view"
    ADD_TO_CART = "add_to_cart"
    REMOVE_FROM_CART = "remove_from_cart"
    PURCHASE = "purchase"
    RATING = "rating"


EVENT_TYPES: tuple[str, ...] = tuple(e.value for e in EventType)


class FieldKind(StrEnum):
    """What JSON value a landing field accepts."""

    ID = "id"  # a JSON string or integer (numeric ids are common, e.g. MovieLens)
    CODE = "code"  # a JSON string from a small vocabulary (event type, category)
    TEXT = "text"  # free text: a JSON string, or a number or boolean taken as its text
    NUMBER = "number"  # a JSON number
    INTEGER = "integer"  # a JSON integer
    TIMESTAMP = "timestamp"  # an ISO-8601 string with an explicit zone (Z or +hh:mm)


@dataclass(frozen=True)
class RawField:
    name: str
    kind: FieldKind
    required: bool = False
    max_chars: int | None = None
    direct_identifier: bool = False  # encrypted in bronze, never in silver


RAW_FIELDS: tuple[RawField, ...] = (
    RawField("event_id", FieldKind.ID, required=True, max_chars=128),
    RawField("event_time", FieldKind.TIMESTAMP, required=True, max_chars=64),
    RawField("event_type", FieldKind.CODE, required=True, max_chars=32),
    RawField("user_id", FieldKind.ID, required=True, max_chars=128),
    RawField("session_id", FieldKind.ID, max_chars=128),
    RawField("item_id", FieldKind.ID, required=True, max_chars=128),
    RawField("category", FieldKind.CODE, max_chars=128),
    RawField("price", FieldKind.NUMBER),
    RawField("quantity", FieldKind.INTEGER),
    RawField("rating", FieldKind.NUMBER),
    RawField("email", FieldKind.TEXT, max_chars=320, direct_identifier=True),
    RawField("ip", FieldKind.TEXT, max_chars=64, direct_identifier=True),
    RawField("user_agent", FieldKind.TEXT, max_chars=1024, direct_identifier=True),
    RawField("search_query", FieldKind.TEXT, max_chars=2048, direct_identifier=True),
)
FIELDS_BY_NAME = {f.name: f for f in RAW_FIELDS}
DIRECT_IDENTIFIERS: tuple[str, ...] = tuple(f.name for f in RAW_FIELDS if f.direct_identifier)

MAX_RECORD_BYTES = 64 * 1024
"""A landing line longer than this is quarantined whole (``oversize_record``) before parsing."""


class QuarantineReason(StrEnum):
    """Why a landing record was not accepted; checked in this order, the first match wins."""

    INVALID_UTF8 = "invalid_utf8"
    OVERSIZE_RECORD = "oversize_record"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_TIMESTAMP = "bad_timestamp"
    OVERSIZE_FIELD = "oversize_field"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    EVENT_TIME_OUTSIDE_INTERVAL = "event_time_outside_interval"
    UNKNOWN_ITEM = "unknown_item"  # not in the day's catalog (only with unknown_items=quarantine)


QUARANTINE_REASONS: tuple[str, ...] = tuple(r.value for r in QuarantineReason)
