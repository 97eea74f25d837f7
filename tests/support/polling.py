"""Waiting for a condition in tests: poll until a deadline instead of sleeping a guessed time."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import IO, TypeVar

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


def line_within(stream: IO[str], what: str, timeout_s: float = 60.0) -> str:
    """The next line of `stream` (a pipe); AssertionError naming `what` when none comes in time."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        raise AssertionError(f"{what}: no line after {timeout_s:g}s") from None
