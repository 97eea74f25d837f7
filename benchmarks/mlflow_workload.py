"""The MLflow side of workloads 1-3. Runs in the benchmark's own MLflow venv (benchmarks/.venv-mlflow),
never in the project's: `python mlflow_workload.py '<json config>'` prints one JSON line of figures.

MLflow uses its default SQL store, sqlite:///<tmp>/mlflow.db, with a temporary artifact root.
This file imports nothing from Runbus.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

_FOLDERS: list[Path] = []
FILTER = "params.p1 = '3' and metrics.accuracy > 0.5"
ORDER_BY = ["metrics.loss ASC"]


def use_store(name: str) -> str:
    """A fresh sqlite store and artifact root; returns the id of a new experiment in it."""
    folder = Path(tempfile.mkdtemp(prefix=f"mlflow-bench-{name}-"))
    _FOLDERS.append(folder)
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    experiment = mlflow.create_experiment(name, artifact_location=(folder / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    return experiment


def log_metric(points: int, chunk: int) -> dict[str, float]:
    use_store("log-metric")
    sync_chunks, async_chunks = [], []
    with mlflow.start_run():
        began = time.perf_counter()
        for start in range(0, points, chunk):
            chunk_began = time.perf_counter()
            for step in range(start, min(start + chunk, points)):
                mlflow.log_metric("loss", 0.5, step=step)
            sync_chunks.append((time.perf_counter() - chunk_began) / min(chunk, points - start) * 1e6)
        sync_total = (time.perf_counter() - began) / points * 1e6
    with mlflow.start_run():
        began = time.perf_counter()
        for start in range(0, points, chunk):
            chunk_began = time.perf_counter()
            for step in range(start, min(start + chunk, points)):
                mlflow.log_metric("loss", 0.5, step=step, synchronous=False)
            async_chunks.append((time.perf_counter() - chunk_began) / min(chunk, points - start) * 1e6)
        mlflow.flush_async_logging()
        async_durable = (time.perf_counter() - began) / points * 1e6
    return {"log_metric_sync_us": statistics.median(sync_chunks), "log_metric_sync_durable_us": sync_total,
            "log_metric_async_us": statistics.median(async_chunks), "log_metric_async_durable_us": async_durable}


def children(count: int) -> dict[str, float]:
    use_store("children")
    with mlflow.start_run(run_name="sweep"):
        began = time.perf_counter()
        for i in range(count):
            with mlflow.start_run(run_name=f"child-{i}", nested=True):
                mlflow.log_params({"p1": i, "p2": i * 0.001, "p3": f"k{i % 7}"})
                mlflow.log_metrics({"accuracy": (i % 100) / 100, "loss": 1 - (i % 100) / 100 + i * 0.001})
                mlflow.set_tag("kind", f"k{i % 7}")
        elapsed = time.perf_counter() - began
    return {"child_run_ms": elapsed * 1000 / count}


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
    experiment = use_store("query")
    client = MlflowClient()
    figures: dict[str, float] = {}
    built, build_s = 0, 0.0
    for size in sorted(sizes):
        began = time.perf_counter()
        build_runs(client, experiment, built, size - built)
        build_s += time.perf_counter() - began
        built = size
        mlflow.search_runs([experiment], FILTER, order_by=ORDER_BY, max_results=100)  # warm
        timings = []
        for _ in range(queries):
            began = time.perf_counter()
            found = mlflow.search_runs([experiment], FILTER, order_by=ORDER_BY, max_results=100)
            timings.append((time.perf_counter() - began) * 1000)
        if len(found) == 0:
            raise RuntimeError("the MLflow query matched no run")
        figures[f"query_ms_{size}"] = statistics.median(timings)
    figures["query_build_ms_per_run"] = build_s * 1000 / max(sizes)
    return figures


def main() -> None:
    config: dict[str, Any] = json.loads(sys.argv[1])
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    only = set(config["only"])
    figures: dict[str, float] = {}
    repeat = int(config.get("repeat", 1))
    if "log_metric" in only:
        samples = [log_metric(config["points"], config["chunk"]) for _ in range(repeat)]
        figures.update({key: statistics.median(s[key] for s in samples) for key in samples[0]})
    if "children" in only:
        figures["child_run_ms"] = statistics.median(children(config["children"])["child_run_ms"]
                                                    for _ in range(repeat))
    if "query" in only and config["query_runs"]:
        figures.update(query(config["query_runs"], config["queries"]))
    print(json.dumps({"version": mlflow.__version__, "figures": figures}), flush=True)
    for folder in _FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
