"""Pipeline benchmarks: cost of log_metric in the job's thread, producer -> SQL throughput, rebuild."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

from engine import NewRun, get_run_db, new_function
from engine.bootstrap import reset_services, services
from projections import open_projection


def _use_home(bus_url: str | None) -> None:
    os.environ["RUNBUS_HOME"] = tempfile.mkdtemp(prefix="runbus-bench-")
    if bus_url:
        os.environ["RUNBUS_BUS"] = bus_url
    else:
        os.environ.pop("RUNBUS_BUS", None)
    reset_services()


def log_metric_cost(calls: int = 20_000, chunk: int = 1_000) -> dict[str, float]:
    """Median microseconds per log_metric call, measured in chunks of `chunk` calls."""
    _use_home(None)
    chunks: list[float] = []

    def job(context: Any) -> None:
        for start in range(0, calls, chunk):
            began = time.perf_counter_ns()
            for step in range(start, start + chunk):
                context.log_metric("loss", 0.5, step=step)
            chunks.append((time.perf_counter_ns() - began) / chunk / 1000)

    new_function().run(NewRun(handler=job, name="bench-log-metric"))
    return {"log_metric_us_median": statistics.median(chunks)}


def end_to_end(events: int = 200_000, bus_url: str | None = None) -> dict[str, float]:
    """Events/s from the first log_metric call to the rows being queryable; then rebuild time."""
    _use_home(bus_url)
    services()  # build the bus before the clock starts

    def job(context: Any) -> None:
        for step in range(events):
            context.log_metric("loss", step * 0.001, step=step)

    began = time.perf_counter()
    new_function().run(NewRun(handler=job, name="bench-e2e"))
    db = get_run_db()
    rows = int(db.sql("SELECT count(*) AS n FROM metrics").n[0])
    elapsed = time.perf_counter() - began
    assert rows == events, f"expected {events} metric rows, found {rows}"
    svc = services()
    with open_projection(svc.settings.db_path) as con:
        rebuild_began = time.perf_counter()
        svc.projector(con).rebuild()
        rebuild_s = time.perf_counter() - rebuild_began
    reset_services()
    return {"events": events, "events_per_s": events / elapsed, "seconds": elapsed,
            "rebuild_s": rebuild_s}
