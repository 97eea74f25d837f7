"""Worker pools the sweep dispatches iterations to: threads in-process, or Dask.

`submit_all(fn, items)` calls `fn(svc, item)` for each item where the iterations run, with that process's services:
the driver's for threads in-process, the worker's (built by its worker plugin) on Dask.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from engine.runspec import RunSpec

if TYPE_CHECKING:
    from engine.bootstrap import Services
    from engine.runtimes.dask import DaskPool


class LocalPool:
    """Iterations in this process: one after another, or `workers` threads at once."""

    in_driver = True
    reruns_tasks_of_dead_workers = False
    losses_allowed = 0

    def __init__(self, svc: Services, workers: int = 1) -> None:
        self.capacity = workers
        self._svc = svc
        self._executor = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="runbus-iteration")

    def lost(self, error: Any) -> bool:
        """Never: a thread of this process does not die alone."""
        return False

    def prepare(self, spec: RunSpec) -> RunSpec:
        """Nothing to ship: the handler runs in this process."""
        return spec

    def submit_all(self, fn: Callable[[Services, Any], Any], items: Sequence[Any]) -> list[Any]:
        """`fn(svc, item)` for each item (a run spec, or a list of them) on a thread of this process,
        with the driver's services; their futures, in order."""
        return [self._executor.submit(fn, self._svc, item) for item in items]

    def wait_done(self, futures: Iterable[Any]) -> list[tuple[Any, Any]]:
        """Block until at least one future is done; each done future with its result or exception."""
        done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
        return [(f, f.exception() or f.result()) for f in done]

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def open_pool(svc: Services, runtime: str, parallel_runs: int | None) -> LocalPool | DaskPool:
    """The pool for a function's runtime: 'local', 'dask://' or 'dask://host:port' (Dask workers
    build services of their own from `svc.settings`)."""
    if runtime.startswith("dask://"):
        address = runtime.removeprefix("dask://") or None
        if address and "://" not in address:
            address = f"tcp://{address}"
        from engine.runtimes.dask import DaskPool  # distributed is slow to import; only Dask runs need it

        return DaskPool(address, svc.settings)
    return LocalPool(svc, parallel_runs or 1)
