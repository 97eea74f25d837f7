"""Redaction of secret values: every string a run emits goes through its Redactor first."""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Iterable
from typing import Any

MASK = "***"


class Redactor:
    """Replaces each secret value, and the escaped forms a repr or JSON text gives it, by `***`.

    Every non-empty value counts, however short: a secret never leaves the run in any string.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for value in secrets:
            if isinstance(value, str) and value:
                forms.update({value, repr(value)[1:-1], json.dumps(value)[1:-1]})
        forms.discard("")
        # longest first, so a secret that contains another is masked whole
        self._pattern = re.compile("|".join(map(re.escape, sorted(forms, key=len, reverse=True)))) if forms else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        """`text` with every secret value masked."""
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def optional(self, text: str | None) -> str | None:
        return None if text is None else self(text)


class RedactingLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A run's logger: each message (with its arguments and exception text) is formatted and redacted
    before it reaches any handler."""

    def __init__(self, logger: logging.Logger, redact: Redactor) -> None:
        super().__init__(logger, {})
        self._redact = redact

    def log(self, level: int, msg: object, *args: Any, exc_info: Any = None, stack_info: bool = False,
            stacklevel: int = 1, extra: Any = None) -> None:
        if not self.isEnabledFor(level):
            return
        text = str(msg) % args if args else str(msg)
        if exc_info:
            if exc_info is True:
                exc_info = sys.exc_info()
            if isinstance(exc_info, BaseException):
                exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
            if exc_info[0] is not None:
                text += "\n" + "".join(traceback.format_exception(*exc_info)).rstrip("\n")
        if stack_info:
            text += "\nStack (most recent call last):\n" + "".join(traceback.format_stack()).rstrip("\n")
        # stacklevel + 1: the caller of debug()/info()/... (logging's own frames are skipped) rather than this
        self.logger.log(level, self._redact(text), extra=extra, stacklevel=stacklevel + 1)
