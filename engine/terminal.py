"""Printing user data on a terminal as it is: no console markup, control characters as escapes."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.text import Text

# terminal control characters (ESC, C1, DEL) and bidi overrides; newlines and tabs are kept
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def neutral(text: str) -> str:
    """`text` with terminal control characters written as Python escapes."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def json_escaped(text: str) -> str:
    """JSON `text` with control characters written as JSON \\u escapes (still valid JSON)."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def literal(value: Any) -> Text:
    """`value` as text to print as it is: control characters shown as escapes (\\x1b), no markup."""
    return Text(neutral(str(value)))


def plain_console(stderr: bool = False) -> Console:
    """A console that prints user data (names, labels, errors, cells) as text: no markup, no highlighting."""
    return Console(stderr=stderr, soft_wrap=True, markup=False, highlight=False)
