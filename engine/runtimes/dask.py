"""Dask runtime: a worker pool on a LocalCluster made for the run, or on an existing scheduler.

Each worker process builds its own bus producer once (the worker plugin); iterations write their
events straight to the bus from the worker, and only (iteration, uid, state) returns to the driver.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import cloudpickle
from distributed import Client, LocalCluster, WorkerPlugin, as_completed

from engine.bootstrap import reset_services, services
from engine.runspec import RunSpec
from engine.settings import Settings


class RunbusWorkerPlugin(WorkerPlugin):
    """Builds the worker process's bus producer once at start and flushes it at shutdown."""

    name = "runbus"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def setup(self, worker: Any) -> None:
        services(self.settings)

    def teardown(self, worker: Any) -> None:
        reset_services()


class DaskPool:
    """Iterations on Dask: a LocalCluster made for the run (address None) or an existing scheduler."""

    in_driver = False

    def __init__(self, address: str | None, settings: Settings) -> None:
        self._cluster = None
        if address is None:
            self._cluster = LocalCluster(n_workers=settings.dask_workers, threads_per_worker=1,
                                         processes=True, dashboard_address=None)
            self._client = Client(self._cluster)
        else:
            self._client = Client(address, timeout="20s")
        self._client.register_plugin(RunbusWorkerPlugin(settings))
        self.capacity = max(1, sum(self._client.nthreads().values()))
        self._completed = as_completed()

    def prepare(self, spec: RunSpec) -> RunSpec:
        """Handlers loaded from a script file live in a module workers cannot import: ship their code."""
        module = sys.modules.get(getattr(spec.handler, "__module__", "") or "")
        if module is None or not module.__name__.startswith("runbus_handler_"):
            return spec
        cloudpickle.register_pickle_by_value(module)
        try:
            return replace(spec, handler=cloudpickle.dumps(spec.handler))
        finally:
            cloudpickle.unregister_pickle_by_value(module)

    def submit(self, fn: Callable[..., Any], arg: Any) -> Any:
        future = self._client.submit(fn, arg, pure=False)
        self._completed.add(future)
        return future

    def wait_done(self, futures: Iterable[Any]) -> list[tuple[Any, Any]]:
        """Block until at least one submitted future is done; each with its result or exception.

        `futures` are the ones in flight; this pool tracks what it submitted itself.
        """
        # as_completed, not wait(FIRST_COMPLETED): the latter races in the client's event loop under
        # many completions ("deque mutated during iteration")
        done = self._completed.next_batch(block=True)
        finished = [f for f in done if f.status == "finished"]
        # one round trip for all results: per-future .result() costs a scheduler sync each
        outcomes = list(zip(finished, self._client.gather(finished), strict=True))
        return outcomes + [(f, f.exception()) for f in done if f.status != "finished"]

    def close(self) -> None:
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()
