"""Workload 1: N points of one metric (steps 0..N-1) logged by a job, as MLflow's side logs them.

Two figures, each the median of `repeat` measurements on a fresh home:
- per call in the job's thread: the median over chunks of `chunk` calls of the time per call;
- per point until queryable from another process: from the first call until a second process
  (benchmarks.observer: one process for the workload, warmed on each home before the clock starts)
  sees all N points in `metrics`, / N.
Runbus has one way to log points (`log_metric`; the background writer batches them), so it has one
row per figure; MLflow has three (one call a point, async with a flush, `log_batch`).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks import observer as observers
from benchmarks.common import Outcome, fresh_home, median
from benchmarks.phases import phase
from engine import NewRun, new_function
from engine.api import close_session, session

VISIBLE = "SELECT count(*) FROM metrics WHERE uid = ? AND key = 'loss'"


def measure_once(points: int, chunk: int) -> tuple[float, float]:
    """(median us per call in the job's thread, us per point until another process sees them all)."""
    with phase("set-up: fresh home, bus, observer"):
        fresh_home()
        session()  # build the bus and writer before the clock starts
        observer = observers.shared()
    chunks: list[float] = []
    queryable: list[float] = []
    with phase("the run (timed inside)"):

        def job(context: Any) -> None:
            writer = session().services.writer
            began = time.perf_counter_ns()
            for start in range(0, points, chunk):
                chunk_began = time.perf_counter_ns()
                for step in range(start, min(start + chunk, points)):
                    context.log_metric("loss", 0.5, step=step)
                chunks.append((time.perf_counter_ns() - chunk_began) / min(chunk, points - start) / 1000)
            writer.flush()
            observer.wait_for(VISIBLE, [context.uid], points)
            queryable.append((time.perf_counter_ns() - began) / points / 1000)

        run = new_function().run(NewRun(handler=job, name="bench-log-metric"))
    if run.state != "completed":
        raise RuntimeError(f"log_metric job ended {run.state}: {run.error}")
    with phase("tear-down"):
        close_session()
    return median(chunks), queryable[0]


def run(points: int, chunk: int, repeat: int) -> Outcome:
    try:
        samples = [measure_once(points, chunk) for _ in range(repeat)]
    finally:
        observers.close_shared()
    return Outcome(
        figures={"log_metric_thread_us": median(s[0] for s in samples),
                 "log_metric_queryable_us": median(s[1] for s in samples)},
        details={"log_metric_points": points, "repeat": repeat, "samples_us": samples})
