"""Producer processes started apart and let go together, so their start-up is not timed."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any


def run_together(target: Callable[..., None], first_args: tuple[Any, ...], events: int, processes: int,
                 meanwhile: Callable[[], None] | None = None) -> float:
    """Spawn `processes` processes running `target(*first_args, share, ready, go)`, the `events`
    split between them; each puts on `ready` once set up and waits for `go`. `meanwhile()`, if
    given, runs while they start (other set-up, overlapped with theirs; it must not need them).
    Returns the perf_counter() at which they were let go, once all have exited (RuntimeError if one
    failed)."""
    spawn = multiprocessing.get_context("spawn")
    ready, go = spawn.Queue(), spawn.Event()
    share, extra = divmod(events, processes)
    workers = [spawn.Process(target=target, args=(*first_args, share + (i < extra), ready, go))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    if meanwhile is not None:
        try:
            meanwhile()
        except BaseException:
            for worker in workers:
                worker.kill()
                worker.join()
            raise
    for _ in workers:
        ready.get(timeout=120)
    began = time.perf_counter()
    go.set()
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise RuntimeError(f"a producer process exited with {worker.exitcode}")
    return began
