"""Validation of what users log: keys, text, JSON values, numbers, steps and timestamps.

Whatever an event carries must encode in its Avro schema and fold into the DuckDB projection
(JSON columns, TIMESTAMPTZ, BIGINT), so it is checked here, at the call, and refused with an
error naming the key. Nothing refused here ever reaches the writer.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

from schemas.codec import INT64_MAX, INT64_MIN

MAX_DEPTH = 100  # nesting of lists and dicts in one value; deeper is refused, not a RecursionError
# a key (of a param, result, metric, label, artifact, input...) and a label's value, in characters:
# MLflow's bounds for keys and tag values. Unbounded, one 5 MB key made every runs page 270 MB
MAX_KEY_CHARS = 250
MAX_LABEL_CHARS = 5000
MAX_TEXT_BYTES = 512 * 1024  # one value's JSON text: a bus record must stay under Kafka's 1 MiB default
# Metric timestamps are seconds since the epoch; the projection and pandas hold them as
# datetime64[ns], whose range ends in April 2262 (9.2e9 s is in 2261: no rounding at the edge).
# time.time_ns() or milliseconds land far beyond. The projector checks foreign events against it too.
MAX_TIMESTAMP_S = 9.2e9

Redact = Callable[[str], str]


# What every refusal raises, as the README documents: a TypeError naming the key (whether the
# type or the value is wrong).
InvalidValue = TypeError


def check_text(kind: str, key: object, text: object, what: str = "value", max_chars: int | None = None) -> str:
    """`text` if it is a str that encodes as UTF-8 (no lone surrogates), of at most `max_chars`
    characters when given; InvalidValue names the key."""
    if type(text) is not str:
        raise InvalidValue(f"{kind} {key!r}: {what} must be a string, got {type(text).__name__}")
    if max_chars is not None and len(text) > max_chars:
        shown = key if what != "key" else f"{text[:40]}..."
        raise InvalidValue(f"{kind} {shown!r}: {what} is {len(text):,} characters, at most {max_chars:,} are allowed")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidValue(f"{kind} {key!r}: {what} is not valid UTF-8 text "
                           f"({exc.reason} at index {exc.start}: {text[exc.start:exc.end]!r})") from None
    return text


def check_key(kind: str, key: object, max_chars: int | None = MAX_KEY_CHARS) -> str:
    """`key` if it is a non-empty str of valid UTF-8, of at most `max_chars` (None: any length, for
    a key that names what is there already); InvalidValue otherwise."""
    if type(key) is not str or not key:
        raise InvalidValue(f"{kind} key must be a non-empty string, got "
                           f"{'an empty string' if key == '' else type(key).__name__}")
    return check_text(kind, key, key, "key", max_chars)


def check_label(key: object, value: object) -> tuple[str, str]:
    """A label's (key, value as str()), both checked: the value at most MAX_LABEL_CHARS."""
    return check_key("label", key), check_text("label", key, str(value), max_chars=MAX_LABEL_CHARS)


def check_text_map(kind: str, mapping: Mapping[Any, Any] | None, redact: Redact | None = None,
                   max_chars: int | None = None) -> dict[str, str]:
    """A copy of `mapping` as str -> str (keys and values, through str(), then through `redact`),
    every key and value checked (values at most `max_chars` when given)."""
    checked: dict[str, str] = {}
    for key, value in (mapping or {}).items():
        text = check_text(kind, check_key(kind, key), str(value), max_chars=max_chars)
        if redact:
            checked[redact(key)] = redact(text)
        else:
            checked[key] = text
    return checked


def _numpy_to_python(value: Any) -> Any:
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _checked(kind: str, key: str, value: Any, depth: int, redact: Redact | None) -> Any:
    """`value` with numpy values as Python ones, every string checked (and redacted)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        check_text(kind, key, value)
        return redact(value) if redact else value
    if depth >= MAX_DEPTH:
        raise InvalidValue(f"{kind} {key!r}: value nests deeper than {MAX_DEPTH} levels (or refers to itself)")
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(k, str):
                check_text(kind, key, k, "a dict key in the value")
                k = redact(k) if redact else k
            elif not (k is None or isinstance(k, (bool, int, float))):
                raise InvalidValue(f"{kind} {key!r}: a dict key of type {type(k).__name__} in the value "
                                   f"is not a string")
            out[k] = _checked(kind, key, v, depth + 1, redact)
        return out
    if isinstance(value, (list, tuple)):
        return [_checked(kind, key, v, depth + 1, redact) for v in value]
    try:
        plain = _numpy_to_python(value)
    except TypeError as exc:
        raise InvalidValue(f"{kind} {key!r}: value of type {type(value).__name__} cannot be logged: {exc}") from None
    return _checked(kind, key, plain, depth, redact)


def to_json(kind: str, key: object, value: Any, redact: Redact | None = None) -> tuple[str, Any]:
    """JSON text of `value` and the plain Python value it stands for; InvalidValue names the key.

    Strings in the value must be valid UTF-8, nesting is bounded and the text at most
    MAX_TEXT_BYTES. With `redact`, every string in the value goes through it first."""
    check_key(kind, key)
    checked = _checked(kind, key, value, 0, redact)
    try:
        text = json.dumps(checked)
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"{kind} {key!r}: value of type {type(value).__name__} cannot be logged: {exc}") from None
    if len(text) > MAX_TEXT_BYTES:
        raise InvalidValue(f"{kind} {key!r}: value is {len(text)} bytes as JSON, more than "
                           f"{MAX_TEXT_BYTES}; log it as an artifact")
    if checked is None or isinstance(checked, (str, int, float, bool)):
        return text, checked
    return text, json.loads(text)


def to_number(kind: str, key: object, value: Any) -> float:
    """`value` as a float; InvalidValue names the key when it is not a real number."""
    check_key(kind, key)
    if isinstance(value, float):
        return value
    if isinstance(value, (str, bytes)) or value is None:
        raise InvalidValue(f"{kind} {key!r}: value of type {type(value).__name__} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidValue(f"{kind} {key!r}: value of type {type(value).__name__} is not a number") from None


def to_step(kind: str, key: str, step: Any) -> int | None:
    """`step` as an int within int64 (None stays None); InvalidValue names the key."""
    if step is None:
        return None
    try:
        number = operator.index(step)
    except TypeError:
        if not (isinstance(step, float) and step.is_integer()):
            raise InvalidValue(f"{kind} {key!r}: step of type {type(step).__name__} is not an integer") from None
        number = int(step)
    if not INT64_MIN <= number <= INT64_MAX:
        raise InvalidValue(f"{kind} {key!r}: step {number} is outside the 64-bit integer range")
    return number


def to_timestamp(kind: str, key: str, timestamp: Any) -> float:
    """`timestamp` as seconds since the epoch, finite and between 1970 and 2262; InvalidValue names the key."""
    seconds = to_number(kind, key, timestamp)
    if not 0.0 <= seconds <= MAX_TIMESTAMP_S:  # also false for NaN
        raise InvalidValue(f"{kind} {key!r}: timestamp {seconds!r} is not seconds since the epoch "
                           f"between 1970 and 2262 (time.time(), not time.time_ns() or milliseconds)")
    return seconds


def numeric_or_none(value: Any) -> float | None:
    """The value as a float when it is a real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return None if math.isnan(number) else number
