"""Handlers used by sweep tests; a module so Dask workers can import them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def seed_like(context, p1=1, p2="xx"):
    context.log_result("accuracy", p1 * 2)
    context.log_result("loss", p1 * 3)
    return "my resp"


def seed_like_where(context, p1=1, p2="xx"):
    """seed_like, also logging the process it ran in (result 'pid')."""
    import os

    context.log_result("pid", os.getpid())
    return seed_like(context, p1, p2)


def gated(context, x=0, gate_after=0, gate=""):
    """scored, but an iteration with x > gate_after first waits (up to 120 s) for the file `gate`."""
    if x > gate_after:
        deadline = time.monotonic() + 120
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
    return scored(context, x)


def scored(context, x=0, fail_on=None, delay=0.0):
    """Logs score=x (or nothing for x=None); raises when x == fail_on."""
    if delay:
        time.sleep(delay)
    if fail_on is not None and x == fail_on:
        raise RuntimeError(f"bad x={x}")
    if x is not None:
        context.log_result("score", x)
    context.log_result("label", f"x{x}")


def dies_once(context, x=0, marker=""):
    """The first attempt of x == 2 kills its own worker process; a retry completes."""
    context.log_result("started", x)
    if x == 2 and not Path(marker).exists():
        Path(marker).write_text("died")
        time.sleep(0.5)  # let run_started reach the bus
        os.kill(os.getpid(), signal.SIGKILL)
    context.log_result("score", x)


def count_rows(context):
    context.log_result("rows", len(context.get_input("data").as_df()))
