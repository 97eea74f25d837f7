"""Printing user data on a terminal as it is: no console markup, control characters as escapes.

rich is imported only by the functions that build its objects: the projection service process
prints with `neutral` and loads no rich."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

# terminal control characters (ESC, C1, DEL) and bidi overrides; newlines and tabs are kept
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# the same, and newlines and tabs: text that must stay on its line (a path, a URL in a message)
_CONTROL_OR_BREAK = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def neutral(text: str, one_line: bool = False) -> str:
    """`text` with terminal control characters written as Python escapes; with `one_line`, line
    breaks and tabs too (\\n, \\t, \\u2028)."""
    pattern = _CONTROL_OR_BREAK if one_line else _CONTROL
    return pattern.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def json_escaped(text: str) -> str:
    """JSON `text` with control characters written as JSON \\u escapes (still valid JSON)."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def literal(value: Any) -> Text:
    """`value` as text to print as it is: control characters shown as escapes (\\x1b), no markup."""
    from rich.text import Text

    return Text(neutral(str(value)))


def plain_console(stderr: bool = False) -> Console:
    """A console that prints user data (names, labels, errors, cells) as text: no markup, no highlighting."""
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True, markup=False, highlight=False)
