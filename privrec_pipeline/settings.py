"""Typed settings dataclasses from user mappings (DAG Params, ``--set key=value``, JSON).

One mechanism for every settings class: unknown names and values of the wrong type are
errors that name the class, the setting and the value.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

from privrec_pipeline.errors import ConfigurationError

T = TypeVar("T")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def from_settings(cls: type[T], settings: dict[str, Any], what: str) -> T:
    """``cls(**settings)`` after checking names and types against the fields' defaults.

    An int is accepted where the default is a float; a list where it is a tuple; booleans are
    never numbers. ``what`` names the settings in messages (e.g. "quality setting").
    """
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigurationError(f"unknown {what}(s) {unknown}; known: {sorted(known)}")
    values = dict(settings)
    for name, value in settings.items():
        default = _default(known[name])
        if isinstance(default, tuple) and isinstance(value, list | tuple):
            values[name] = tuple(value)
            continue
        if default is None:
            continue
        wanted: tuple[type, ...] = (int,) if isinstance(default, int) and not isinstance(default, bool) else (
            (int, float) if isinstance(default, float) else (type(default),))
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, wanted):
            raise ConfigurationError(f"{what} {name} must be {' or '.join(t.__name__ for t in wanted)}, not {value!r}")
    return cls(**values)


def parse_key_values(items: list[str], what: str = "setting") -> dict[str, Any]:
    """``key=value`` strings to a mapping; values are parsed as JSON when they parse, else text."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"{what} {item!r} is not key=value")
        try:
            parsed[key.strip()] = json.loads(raw)
        except ValueError:
            parsed[key.strip()] = raw
    return parsed
