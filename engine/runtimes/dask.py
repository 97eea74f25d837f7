"""Dask runtime: a worker pool on a LocalCluster made for the run, or on an existing scheduler.

Each worker process builds its own services once (the worker plugin: the worker's composition
root); iterations run with them and write their events straight to the bus from the worker, and
only (iteration, uid, state, results) returns to the driver, for a chunk of iterations a task.

The cluster made for a run has its scheduler in this process and each worker in a process of its
own started as `python -m dask spec` (distributed's SubprocessWorker), not by multiprocessing's
spawn as LocalCluster's Nanny does: spawn re-imports the driver's `__main__`, so a plain script with
no `if __name__ == '__main__':` guard would start its whole job again in every worker. A handler
defined in `__main__` reaches the workers by value (cloudpickle).

A worker dying must not make the scheduler run a task again by itself: a task runs a chunk of
iterations, and those that had finished would run twice. The cluster made for a run has
allowed-failures 0, so the task fails with KilledWorker and the driver runs again only the
iterations the bus does not show finished (engine.sweep.runner), up to the configured
`distributed.scheduler.allowed-failures` times each. Dask also runs a finished task again when the
worker holding its result dies before the driver collected it (a lost result is recomputed; no
setting turns that off): on that cluster the task is marked when it finishes, and a worker given
a marked task raises RanBefore instead of running it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import cloudpickle
import dask
from distributed import (
    Client,
    KilledWorker,
    Scheduler,
    SchedulerPlugin,
    SpecCluster,
    WorkerPlugin,
    as_completed,
    get_worker,
)
from distributed.deploy.subprocess import SubprocessWorker

from engine.bootstrap import Services, bootstrap
from engine.runspec import RunSpec
from engine.settings import Settings


class RunbusWorkerPlugin(WorkerPlugin):
    """The worker process's composition root: builds its services from the driver's settings once
    at start, and flushes and closes them at shutdown."""

    name = "runbus"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services: Services | None = None

    def setup(self, worker: Any) -> None:
        self.services = bootstrap(self.settings)

    def teardown(self, worker: Any) -> None:
        if self.services is not None:
            self.services.close()
            self.services = None


_FINISHED_MARK = "runbus-finished"


class RanBefore(RuntimeError):
    """A task Dask gave a worker again after it had run to its end (its result was lost with its
    worker): it did not run again."""


class MarkFinished(SchedulerPlugin):
    """On the scheduler of the cluster made for a run (and of a team's scheduler that registered
    it, see DaskPool): a task that finished gets an annotation, which travels with it to any worker
    Dask gives it to again (annotations go with each compute message); `on_worker` refuses such a task."""

    name = "runbus-mark-finished"

    def __init__(self) -> None:
        self._scheduler: Scheduler | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        task = self._scheduler.tasks.get(key) if finish == "memory" and self._scheduler else None
        if task is not None:  # a new dict: the one the compute message took may be shared with other tasks
            task.annotations = {**(task.annotations or {}), _FINISHED_MARK: True}


def on_worker(fn: Callable[[Services, Any], Any], item: Any) -> Any:
    """`fn(svc, item)` in a worker, with the services its RunbusWorkerPlugin built; RanBefore
    instead for a task that already ran to its end (see MarkFinished)."""
    worker = get_worker()
    task = worker.state.tasks.get(worker.get_current_task())
    if task is not None and (task.annotations or {}).get(_FINISHED_MARK):
        raise RanBefore(f"Dask task {task.key!r} ran to its end before, on a worker that died since; not run again")
    plugin = worker.plugins.get(RunbusWorkerPlugin.name)
    if not isinstance(plugin, RunbusWorkerPlugin) or plugin.services is None:
        raise RuntimeError(f"Dask worker {worker.address} has no runbus worker plugin set up")
    return fn(plugin.services, item)


_WORKERS_READY_S = 120.0  # for the cluster's worker processes to start and join the scheduler
_SCHEDULER_LOST_S = 60.0  # a worker whose scheduler is gone (the driver died) exits after this


class WorkerProcess(SubprocessWorker):
    """A `python -m dask spec` worker process that sees the driver's sys.path (as spawn would pass
    it), so a handler's module next to the driver's script imports there too."""

    async def _start(self) -> None:
        spec = json.dumps({"cls": self.worker_class, "opts": self.worker_kwargs})
        path = os.pathsep.join(p for p in sys.path if p)
        env = {**os.environ, "PYTHONPATH": path}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dask", "spec", self.scheduler, "--spec", spec, env=env)


def local_cluster(n_workers: int) -> SpecCluster:
    """A scheduler in this process and `n_workers` single-threaded worker processes on 127.0.0.1;
    the scheduler fails a task whose worker died (KilledWorker) instead of running it again."""
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard": False,
                                               "dashboard_address": None, "allowed_failures": 0}}
    worker = {"cls": WorkerProcess, "options": {
        "worker_class": "distributed.Worker",
        "worker_kwargs": {"host": "127.0.0.1", "nthreads": 1, "death_timeout": _SCHEDULER_LOST_S,
                          "silence_logs": logging.WARN}}}
    return SpecCluster(workers=dict.fromkeys(range(n_workers), worker), scheduler=scheduler, worker=worker,
                       silence_logs=logging.WARN, name="runbus")


def _keeps_finished_tasks(dask_scheduler: Scheduler) -> bool:
    """Whether the scheduler runs no task of a dead worker again: it fails one that did not finish
    (allowed-failures 0) and MarkFinished refuses one that did (its result lost with the worker)."""
    return dask_scheduler.allowed_failures == 0 and MarkFinished.name in dask_scheduler.plugins


class DaskPool:
    """Iterations on Dask: a LocalCluster made for the run (address None) or an existing scheduler.

    `reruns_tasks_of_dead_workers` is False when the scheduler runs no task of a dead worker again:
    the cluster made here, or an existing scheduler configured with allowed-failures 0 that has the
    MarkFinished plugin (the client changes neither on a shared scheduler; one without both, or that
    does not say, gets one iteration a task). `losses_allowed` is how many times the driver runs an
    iteration again after its worker died (distributed.scheduler.allowed-failures), none where the
    scheduler ran the task again itself before giving up.
    """

    in_driver = False

    def __init__(self, address: str | None, settings: Settings) -> None:
        self._cluster = None
        self.losses_allowed = int(dask.config.get("distributed.scheduler.allowed-failures"))
        if address is None:
            self._cluster = local_cluster(settings.dask_workers)
            try:
                self._client = Client(self._cluster)
                self._client.register_plugin(MarkFinished())
                self._client.wait_for_workers(settings.dask_workers, timeout=_WORKERS_READY_S)
            except BaseException:
                self._cluster.close()
                raise
        else:
            self._client = Client(address, timeout="20s")
        self.reruns_tasks_of_dead_workers = address is not None and self._scheduler_reruns()
        if self.reruns_tasks_of_dead_workers:  # its own reruns came first: the driver's would multiply them
            self.losses_allowed = 0
        self._client.register_plugin(RunbusWorkerPlugin(settings))
        self.capacity = max(1, sum(self._client.nthreads().values()))
        self._completed = as_completed()

    def _scheduler_reruns(self) -> bool:
        try:
            return not self._client.run_on_scheduler(_keeps_finished_tasks)
        except Exception:  # a scheduler that refuses functions from clients (distributed.scheduler.pickle)
            return True

    def lost(self, error: Any) -> bool:
        """Whether a task's exception says a worker died under it: Dask did not run it to its end
        (KilledWorker), or ran it to its end on a worker that died before its result was collected
        (RanBefore)."""
        return isinstance(error, (KilledWorker, RanBefore))

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

    def submit_all(self, fn: Callable[[Services, Any], Any], items: Sequence[Any]) -> list[Any]:
        """`fn(svc, item)` for each item (a run spec, or a list of them) on a worker, with the
        worker's services, in one message to the scheduler; their futures, in order."""
        # retries=0: a task that raised is not run again either (its iterations' runs ended)
        futures = list(self._client.map(on_worker, [fn] * len(items), list(items), pure=False, retries=0))
        self._completed.update(futures)
        return futures

    def wait_done(self, futures: Iterable[Any]) -> list[tuple[Any, Any]]:
        """Block until at least one submitted future is done; each with its result or exception.

        `futures` are the ones in flight; this pool tracks what it submitted itself.
        """
        # as_completed, not wait(FIRST_COMPLETED): the latter races in the client's event loop under
        # many completions ("deque mutated during iteration")
        done = self._completed.next_batch(block=True)
        finished: list[Any] = []
        failed: list[Any] = []
        for future in done:  # each status read once: it can change meanwhile
            (finished if future.status == "finished" else failed).append(future)
        try:  # one round trip for all results: per-future .result() costs a scheduler sync each
            values = self._client.gather(finished)
        except Exception:  # a result lost with its worker meanwhile, and its task failed since: one by one
            values = [f.exception() or f.result() for f in finished]
        return list(zip(finished, values, strict=True)) + [(f, f.exception()) for f in failed]

    def close(self) -> None:
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()
