"""Redaction of secret values: every string a run emits goes through its Redactor first."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from producers.console import uncaptured

MASK = "***"
# Shorter values are not masked: masking "1" or "no" would garble every message (line numbers
# included) while the positions of the masks would still give the value away.
MIN_MASKED_CHARS = 4
_LINE_BREAK = "(?:\r?\n)?"

log = logging.getLogger("runbus.secrets")
_warned: set[str] = set()


class Redactor:
    """Replaces each secret value, and the escaped forms a repr or JSON text gives it, by `***`.

    Values of at least MIN_MASKED_CHARS characters count (a shorter one is named in a warning, once).
    """

    def __init__(self, secrets: Iterable[str] | dict[str, str]) -> None:
        named = secrets.items() if isinstance(secrets, dict) else ((None, value) for value in secrets)
        forms: set[str] = set()
        for key, value in named:
            if not isinstance(value, str) or not value:
                continue
            if len(value) < MIN_MASKED_CHARS:
                if key is not None and key not in _warned:
                    _warned.add(key)
                    log.warning("secret %r is shorter than %d characters: its value is not masked in "
                                "what runs log", key, MIN_MASKED_CHARS)
                continue
            # the value, its escaped forms in a str repr, JSON text and a bytes repr (b'p\xc3\xa4...')
            forms.update({value, repr(value)[1:-1], json.dumps(value)[1:-1],
                          repr(value.encode("utf-8", "backslashreplace"))[2:-1]})
        forms.discard("")
        # the most characters one masked form can cover: every character may be followed by \r\n
        self.longest_match = 3 * max(map(len, forms), default=0)
        # longest first, so a secret that contains another is masked whole; a line break anywhere
        # in a form (a message wrapped or split across lines) still matches
        self._pattern = re.compile("|".join(
            _LINE_BREAK.join(map(re.escape, form)) for form in sorted(forms, key=len, reverse=True))) if forms else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        """`text` with every secret value masked."""
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def optional(self, text: str | None) -> str | None:
        return None if text is None else self(text)

    def cut_point(self, text: str, at: int) -> int:
        """`at`, moved back to the start of a secret value in `text` that spans it: text cut
        there and masked piece by piece is masked as it would be whole (given the piece after the
        cut keeps at least `longest_match` characters)."""
        if self._pattern is None:
            return at
        for match in self._pattern.finditer(text, max(0, at - self.longest_match), at + self.longest_match):
            if match.start() < at < match.end():
                return match.start()
        return at


class RedactingLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A run's logger: each message (with its arguments and exception text) is formatted and redacted
    before it reaches any handler.

    With a `sink` (the run's log), every message at INFO or above (and below when Python logging is
    enabled for it) also goes there as (level, text), whatever Python logging is configured to show;
    the handlers then write to the terminal only, so a captured console does not hold it twice."""

    def __init__(self, logger: logging.Logger, redact: Redactor,
                 sink: Callable[[int, str], None] | None = None) -> None:
        super().__init__(logger, {})
        self._redact = redact
        self._sink = sink

    def log(self, level: int, msg: object, *args: Any, exc_info: Any = None, stack_info: bool = False,
            stacklevel: int = 1, extra: Any = None) -> None:
        to_python = self.isEnabledFor(level)
        to_run = self._sink is not None and (level >= logging.INFO or to_python)
        if not (to_python or to_run):
            return
        text = _format(msg, args)
        if exc_info:
            if exc_info is True:
                exc_info = sys.exc_info()
            if isinstance(exc_info, BaseException):
                exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
            if exc_info[0] is not None:
                text += "\n" + "".join(traceback.format_exception(*exc_info)).rstrip("\n")
        if stack_info:
            text += "\nStack (most recent call last):\n" + "".join(traceback.format_stack()).rstrip("\n")
        text = self._redact(text)
        if to_run:
            self._sink(level, text)  # type: ignore[misc]
        if not to_python:
            return
        # stacklevel + 1: the caller of debug()/info()/... (logging's own frames are skipped) rather than this
        with uncaptured() if to_run else contextlib.nullcontext():
            self.logger.log(level, text, extra=extra, stacklevel=stacklevel + 1)


def _format(msg: object, args: tuple[Any, ...]) -> str:
    """`msg % args` as logging formats it (a single mapping argument is used by name); a format that
    does not fit its arguments gives the message and the arguments' repr rather than an error."""
    text = str(msg)
    if not args:
        return text
    if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        args = args[0]  # type: ignore[assignment]
    try:
        return text % args
    except Exception as exc:
        try:
            shown = repr(args)
        except Exception:
            shown = f"of type {type(args).__name__}"
        return f"{text} (arguments {shown} do not fit this format: {type(exc).__name__}: {exc})"
