"""The MLflow side of workloads 1-3. Runs in the benchmark's own MLflow venv (benchmarks/.venv-mlflow),
never in the project's: `python mlflow_workload.py '<json config>'` prints one JSON line of figures.

MLflow uses its default SQL store, sqlite:///<tmp>/mlflow.db, with a temporary artifact root. Each
way of logging is measured `repeat` times on a fresh store (the median is printed) with the same N
as the Runbus side, and its clock stops when a second process (`python mlflow_workload.py observe`,
started once, and warmed on each store before the clock starts) sees every point or run, as
Runbus's does (benchmarks/observer.py). This file imports nothing from Runbus.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

_FOLDERS: list[Path] = []
# Wall seconds of the work that no figure times (reported with the figures, for the breakdown)
_SPENT: dict[str, float] = {}


@contextmanager
def spent(name: str) -> Iterator[None]:
    began = time.perf_counter()
    try:
        yield
    finally:
        _SPENT[name] = _SPENT.get(name, 0.0) + time.perf_counter() - began
FILTER = "params.p1 = '3' and metrics.accuracy > 0.5"
ORDER_BY = ["metrics.loss ASC"]
_POLL_S = 0.005
TIMEOUT_S = 300.0


def use_store(name: str) -> str:
    """A fresh store (a copy of an empty, migrated sqlite file: creating one runs MLflow's schema
    migrations, seconds each) and artifact root; returns the id of a new experiment in it."""
    folder = Path(tempfile.mkdtemp(prefix=f"mlflow-bench-{name}-"))
    _FOLDERS.append(folder)
    shutil.copyfile(_empty_store(), folder / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    experiment = mlflow.create_experiment(name, artifact_location=(folder / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    return experiment


_EMPTY: list[Path] = []


def _empty_store() -> Path:
    if not _EMPTY:
        folder = Path(tempfile.mkdtemp(prefix="mlflow-bench-empty-"))
        _FOLDERS.append(folder)
        MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()  # creates and migrates it
        _EMPTY.append(folder / "mlflow.db")
    return _EMPTY[0]


class Observer:
    """The second process: started once; `watch()` points it at the current store and has it
    answer one search there before any clock starts."""

    def __init__(self) -> None:
        self._process = subprocess.Popen([sys.executable, __file__, "observe"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self.uri = ""

    def watch(self) -> None:
        self.uri = mlflow.get_tracking_uri()
        self.ask({"op": "ping"})

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps({**request, "uri": self.uri}) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the MLflow observer exited with {self._process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"MLflow observer: {answer['error']}")
        return answer

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait(30)


_OBSERVER: list[Observer] = []


@contextmanager
def observed(name: str) -> Iterator[tuple[str, Observer]]:
    """A fresh store (its experiment id) and the observer, warm on it."""
    with spent("set-up: fresh store, observer"):
        experiment = use_store(name)
        if not _OBSERVER:
            _OBSERVER.append(Observer())
        _OBSERVER[0].watch()
    yield experiment, _OBSERVER[0]


def _points_in_thread(points: int, chunk: int, log: Callable[[int], Any]) -> list[float]:
    """Call `log(step)` for steps 0..points-1; microseconds per call of each chunk of `chunk` calls."""
    chunks = []
    for start in range(0, points, chunk):
        began = time.perf_counter()
        for step in range(start, min(start + chunk, points)):
            log(step)
        chunks.append((time.perf_counter() - began) / min(chunk, points - start) * 1e6)
    return chunks


def log_metric_calls(points: int, chunk: int, synchronous: bool) -> tuple[float, float]:
    """mlflow.log_metric once a point (async: then flush_async_logging): (us per call in the
    thread, us per point until the observer sees them all)."""
    with observed("log-metric") as (_, observer), mlflow.start_run() as run:
        began = time.perf_counter()
        chunks = _points_in_thread(points, chunk, lambda step: mlflow.log_metric(
            "loss", 0.5, step=step, synchronous=synchronous))
        if not synchronous:
            mlflow.flush_async_logging()
        observer.ask({"op": "points", "run_id": run.info.run_id, "key": "loss", "expected": points})
        queryable = (time.perf_counter() - began) / points * 1e6
    return statistics.median(chunks), queryable


def log_metric_batches(points: int, batch: int) -> tuple[float, float]:
    """MlflowClient.log_batch of `batch` points a call: (us per point in the thread, us per point
    until the observer sees them all)."""
    with observed("log-batch") as (_, observer), mlflow.start_run() as run:
        client = MlflowClient()
        began = time.perf_counter()
        for start in range(0, points, batch):
            now = int(time.time() * 1000)
            client.log_batch(run.info.run_id, metrics=[Metric("loss", 0.5, now, step)
                                                       for step in range(start, min(start + batch, points))])
        in_thread = (time.perf_counter() - began) / points * 1e6
        observer.ask({"op": "points", "run_id": run.info.run_id, "key": "loss", "expected": points})
        queryable = (time.perf_counter() - began) / points * 1e6
    return in_thread, queryable


def log_metric(points: int, chunk: int, batch: int) -> dict[str, float]:
    sync_thread, sync_queryable = log_metric_calls(points, chunk, synchronous=True)
    async_thread, async_queryable = log_metric_calls(points, chunk, synchronous=False)
    batch_thread, batch_queryable = log_metric_batches(points, batch)
    return {"log_metric_sync_us": sync_thread, "log_metric_sync_queryable_us": sync_queryable,
            "log_metric_async_us": async_thread, "log_metric_async_queryable_us": async_queryable,
            "log_metric_batch_us": batch_thread, "log_metric_batch_queryable_us": batch_queryable}


def _child_values(i: int) -> tuple[dict[str, Any], dict[str, float], str]:
    """The same 3 params, 2 results and label as Runbus's benchmarks/children.py."""
    accuracy = (i % 100) / 100
    return {"p1": i, "p2": i * 0.001, "p3": f"k{i % 7}"}, {"accuracy": accuracy, "loss": 1 - accuracy + i * 0.001}, \
        f"k{i % 7}"


def children_fluent(count: int) -> float:
    """Nested runs with log_params, log_metrics, set_tag; ms per child from the parent's start until
    the observer sees every child with its data. (Not with synchronous=False: end_run shuts MLflow's
    async queue down and waits for it, so each child would pay a queue's start and stop on top.)"""
    with observed("children") as (experiment, observer):
        began = time.perf_counter()
        with mlflow.start_run(run_name="sweep") as parent:
            for i in range(count):
                params, metrics, label = _child_values(i)
                with mlflow.start_run(run_name=f"child-{i}", nested=True):
                    mlflow.log_params(params)
                    mlflow.log_metrics(metrics)
                    mlflow.set_tag("kind", label)
        observer.ask({"op": "children", "experiment": experiment, "parent": parent.info.run_id, "expected": count})
        return (time.perf_counter() - began) * 1000 / count


def children_batch(count: int) -> float:
    """Each child as create_run + one log_batch + set_terminated; ms per child, as children_fluent."""
    with observed("children-batch") as (experiment, observer):
        client = MlflowClient()
        began = time.perf_counter()
        with mlflow.start_run(run_name="sweep") as parent:
            for i in range(count):
                params, metrics, label = _child_values(i)
                child = client.create_run(experiment, run_name=f"child-{i}",
                                          tags={"mlflow.parentRunId": parent.info.run_id})
                now = int(time.time() * 1000)
                client.log_batch(child.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                                 params=[Param(k, str(v)) for k, v in params.items()], tags=[RunTag("kind", label)])
                client.set_terminated(child.info.run_id)
        observer.ask({"op": "children", "experiment": experiment, "parent": parent.info.run_id, "expected": count})
        return (time.perf_counter() - began) * 1000 / count


def build_runs(client: MlflowClient, experiment: str, first: int, count: int) -> None:
    """The same tiny runs as Runbus' query workload: 3 params, 2 results (metrics), a tag, finished."""
    for i in range(first, first + count):
        run = client.create_run(experiment, run_name=f"q{i}")
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id,
                         metrics=[Metric("accuracy", (i * 7919 % 1000) / 1000, now, 0),
                                  Metric("loss", (i * 104729 % 1000) / 1000, now, 0)],
                         params=[Param("p1", str(i % 10)), Param("p2", str((i % 1000) * 0.001)),
                                 Param("p3", f"g{i % 5}")],
                         tags=[RunTag("team", f"t{i % 3}")])
        client.set_terminated(run.info.run_id)


def query(sizes: list[int], queries: int) -> dict[str, float]:
    """For each size: build runs up to it, then the observer times `queries` searches (after one warm)."""
    figures: dict[str, float] = {}
    with observed("query") as (experiment, observer):
        client = MlflowClient()
        built, build_s = 0, 0.0
        for size in sorted(sizes):
            began = time.perf_counter()
            with spent("build the query runs"):
                build_runs(client, experiment, built, size - built)
            build_s += time.perf_counter() - began
            built = size
            answer = observer.ask({"op": "search", "experiment": experiment, "queries": queries})
            figures[f"query_ms_{size}"] = answer["ms"]
        figures["query_build_ms_per_run"] = build_s * 1000 / max(sizes)
    return figures


def _median_of(repeat: int, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    samples = [measure() for _ in range(repeat)]
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def main() -> None:
    began = time.perf_counter()
    config: dict[str, Any] = json.loads(sys.argv[1])
    quiet()
    with spent("set-up: observer process, empty store (once)"):
        _OBSERVER.append(Observer())  # imports MLflow while this process migrates the empty store
        _empty_store()
    only = set(config["only"])
    figures: dict[str, float] = {}
    repeat = int(config["repeat"])
    if "log_metric" in only:
        figures.update(_median_of(repeat, lambda: log_metric(config["points"], config["chunk"], config["batch"])))
    if "children" in only:
        count = config["children"]
        figures.update(_median_of(repeat, lambda: {
            "child_run_ms": children_fluent(count), "child_run_batch_ms": children_batch(count)}))
    if "query" in only and config["query_runs"]:
        figures.update(query(config["query_runs"], config["queries"]))
    print(json.dumps({"version": mlflow.__version__, "figures": figures, "phases": _SPENT,
                      "main_s": time.perf_counter() - began}), flush=True)
    for observer in _OBSERVER:
        observer.close()
    for folder in _FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _seen(client: MlflowClient, request: dict[str, Any]) -> int:
    if request["op"] == "points":
        return len(client.get_metric_history(request["run_id"], request["key"]))
    children = client.search_runs([request["experiment"]], f"tags.mlflow.parentRunId = '{request['parent']}'",
                                  max_results=50_000)
    return sum(1 for run in children if len(run.data.metrics) == 2 and len(run.data.params) == 3
               and "kind" in run.data.tags)


def observe() -> None:
    """The observer's loop: one JSON request a line on stdin (with the store's tracking URI), one
    JSON answer a line on stdout."""
    quiet()
    clients: dict[str, MlflowClient] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["uri"] not in clients:
            clients[request["uri"]] = MlflowClient(request["uri"])
        client = clients[request["uri"]]
        answer: dict[str, Any] = {}
        if request["op"] == "ping":
            client.search_experiments()  # connected, schema checked: warm before any clock starts
        elif request["op"] == "search":
            mlflow.set_tracking_uri(request["uri"])
            timings = []
            for _ in range(request["queries"] + 1):  # the first one warms
                began = time.perf_counter()
                found = mlflow.search_runs([request["experiment"]], FILTER, order_by=ORDER_BY, max_results=100)
                timings.append((time.perf_counter() - began) * 1000)
            answer = {"ms": statistics.median(timings[1:])} if len(found) else {"error": "the query matched no run"}
        else:
            deadline = time.monotonic() + TIMEOUT_S
            while (seen := _seen(client, request)) < request["expected"]:
                if time.monotonic() > deadline:
                    answer = {"error": f"saw {seen} of {request['expected']} after {TIMEOUT_S:g}s: {request}"}
                    break
                time.sleep(_POLL_S)
            else:
                answer = {"seen": seen}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "observe":
        observe()
    else:
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")  # each call says which it wants
        main()
