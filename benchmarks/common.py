"""Shared pieces of the benchmarks: sizes, a fresh RUNBUS_HOME per workload, medians."""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine.api import close_session
from producers.bus.memory import MemoryBus
from projections import database
from projections.client import ServiceClient
from projections.service import ServiceAddress

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; `quick()` is the smoke-run variant. Runbus and MLflow measure the
    compared rows with the same N and the same repeats; the N are sized so that MLflow's side (one
    sqlite transaction, milliseconds, per call) keeps `make bench` under 15 minutes."""

    log_metric_points: int = 2_000
    log_metric_chunk: int = 200
    mlflow_batch: int = 1_000  # MLflow's largest log_batch (MAX_METRICS_PER_BATCH)
    children: int = 1_000
    query_runs: tuple[int, ...] = (1_000, 10_000, 100_000)
    mlflow_query_runs: tuple[int, ...] = (1_000,)  # an MLflow run costs ~15 ms to build: 10k take minutes
    queries: int = 21
    query_builders: int = 2  # processes writing the query workload's runs (not timed)
    events: int = 1_000_000
    producers: int = 4
    sweep_iterations: int = 1_000
    repeat: int = 3
    e2e_repeat: int = 3

    @staticmethod
    def quick() -> Sizes:
        return Sizes(log_metric_points=300, log_metric_chunk=50, mlflow_batch=100, children=30,
                     query_runs=(200, 1_000), mlflow_query_runs=(200,), queries=5, events=40_000,
                     sweep_iterations=100, repeat=1, e2e_repeat=1)


@dataclass
class Outcome:
    """Figures of one workload group (name -> value) plus free-form details for the JSON file."""

    figures: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)


_homes: list[Path] = []


def drop_homes() -> None:
    """Close everything open on the benchmark homes made so far, stop their projection services and
    delete them (1M events ~ 250 MB)."""
    close_session()
    database.close_all()
    while _homes:
        home = _homes.pop()
        stop_projection_service(home)  # a reader may have started it
        shutil.rmtree(home, ignore_errors=True)


def stop_projection_service(home: Path, timeout_s: float = 60.0) -> None:
    """Stop `home`'s projection service if one runs, and return once its process has exited (it
    holds the projection file until then: a rebuild in another process would wait for it)."""
    pid = ServiceClient(ServiceAddress.of(home), MemoryBus(), start=None).stop()
    deadline = time.monotonic() + timeout_s
    while pid is not None and _alive(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the projection service of {home} (pid {pid}) did not exit within {timeout_s:g}s")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) holds no file
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


atexit.register(drop_homes)


def fresh_home(bus_url: str | None = None, prefix: str = "runbus-bench-") -> Path:
    """Point Runbus at a new empty RUNBUS_HOME (and bus), on the default read path (the projection
    service), and drop the cached services and the previous benchmark home. A Kafka bus gets a
    topic of its own so each measurement starts empty."""
    drop_homes()
    home = Path(tempfile.mkdtemp(prefix=prefix))
    _homes.append(home)
    os.environ["RUNBUS_HOME"] = str(home)
    os.environ.pop("RUNBUS_PROJECTION", None)  # the default read path, whatever an earlier workload chose
    if bus_url:
        os.environ["RUNBUS_BUS"] = bus_url
        os.environ["RUNBUS_KAFKA_TOPIC"] = f"runbus-bench-{uuid.uuid4().hex[:12]}"
    else:
        os.environ.pop("RUNBUS_BUS", None)
        os.environ.pop("RUNBUS_KAFKA_TOPIC", None)
    return home


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def runbus_environment() -> dict[str, str]:
    """The RUNBUS_* variables, for child processes that must use the same home and bus."""
    return {key: value for key, value in os.environ.items() if key.startswith("RUNBUS_")}


def end_child(process: subprocess.Popen[bytes] | subprocess.Popen[str], timeout_s: float) -> None:
    """Close the child's stdin (its cue to exit) and wait for it; killed after `timeout_s`."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
