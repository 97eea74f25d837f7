"""Validation of what users log: JSON-able values, numbers, keys."""

from __future__ import annotations

import json
import math
from typing import Any


def _numpy_to_python(value: Any) -> Any:
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def to_json(kind: str, key: object, value: Any) -> tuple[str, Any]:
    """JSON text of `value` and the plain Python value it stands for; TypeError names the key."""
    check_key(kind, key)
    try:
        text = json.dumps(value, default=_numpy_to_python)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{kind} {key!r}: value {value!r:.80} cannot be logged: {exc}") from None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return text, value
    return text, json.loads(text)


def to_number(kind: str, key: object, value: Any) -> float:
    """`value` as a float; TypeError names the key when it is not a real number."""
    check_key(kind, key)
    if isinstance(value, float):
        return value
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{kind} {key!r}: value {value!r:.80} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{kind} {key!r}: value {value!r:.80} is not a number") from None


def check_key(kind: str, key: object) -> str:
    if type(key) is not str or not key:
        raise TypeError(f"{kind} key must be a non-empty string, got {key!r}")
    return key


def numeric_or_none(value: Any) -> float | None:
    """The value as a float when it is a real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return None if math.isnan(number) else number
