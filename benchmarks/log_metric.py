"""Workload 1: log_metric in a loop. Cost per call in the job's thread (median over chunks) and cost
per point until the point is in the log (from the first call until the writer's flush returns, / N)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Outcome, fresh_home, median
from engine import NewRun, new_function
from engine.api import close_session, session


def measure_once(points: int, chunk: int) -> tuple[float, float]:
    """(median us per call in the job's thread, us per point until flushed to the log)."""
    fresh_home()
    session()  # build the bus and writer before the clock starts
    chunks: list[float] = []
    durable: list[float] = []

    def job(context: Any) -> None:
        writer = session().services.writer
        began = time.perf_counter_ns()
        for start in range(0, points, chunk):
            chunk_began = time.perf_counter_ns()
            for step in range(start, min(start + chunk, points)):
                context.log_metric("loss", 0.5, step=step)
            chunks.append((time.perf_counter_ns() - chunk_began) / min(chunk, points - start) / 1000)
        writer.flush()
        durable.append((time.perf_counter_ns() - began) / points / 1000)

    run = new_function().run(NewRun(handler=job, name="bench-log-metric"))
    if run.state != "completed":
        raise RuntimeError(f"log_metric job ended {run.state}: {run.error}")
    close_session()
    return median(chunks), durable[0]


def run(points: int, chunk: int, repeat: int) -> Outcome:
    samples = [measure_once(points, chunk) for _ in range(repeat)]
    return Outcome(
        figures={"log_metric_thread_us": median(s[0] for s in samples),
                 "log_metric_durable_us": median(s[1] for s in samples)},
        details={"log_metric_points": points, "samples_us": samples})
