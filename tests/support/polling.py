"""Waiting for a condition in tests: poll until a deadline instead of sleeping a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(probe: Callable[[], T], what: str, timeout_s: float = 60.0, every_s: float = 0.05) -> T:
    """The first truthy value `probe` returns; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout_s:g}s (last: {value!r})")
        time.sleep(every_s)
