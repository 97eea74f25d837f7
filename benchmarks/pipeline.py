"""Workloads 4, 5 and 7: N events from P producer processes to queryable SQL rows, with the projector
following in its own process (its peak RSS is workload 7); then a rebuild of that projection (5).

The clock starts when every producer process has built its bus and waits for the signal, and stops
when `get_run_db().sql("SELECT count(*) FROM metrics")` in this process returns all N rows.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from multiprocessing.synchronize import Event as EventType
from typing import Any

from benchmarks.common import ROOT, Outcome, fresh_home, median, runbus_environment
from engine import NewRun, get_run_db, new_function
from engine.api import close_session, session
from projections import database


def _metrics_job(count: int) -> Any:
    def job(context: Any) -> None:
        for step in range(count):
            context.log_metric("loss", step * 0.001, step=step)
    return job


def _produce(environment: dict[str, str], count: int, ready: Any, go: EventType) -> None:
    os.environ.update(environment)
    session()  # connect to the bus before the clock starts
    ready.put(os.getpid())
    go.wait()
    run = new_function().run(NewRun(handler=_metrics_job(count), name="producer"))
    close_session()
    if run.state != "completed":
        raise SystemExit(f"producer run ended {run.state}: {run.error}")


def _child(mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.projector_child", mode], cwd=ROOT,
                            env={**os.environ, **runbus_environment()}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _close_projection() -> None:
    close_all = getattr(database, "close_all", None)  # let a child process open the file now
    if close_all is not None:
        close_all()


def end_to_end(events: int, producers: int, bus_url: str | None) -> dict[str, float]:
    """One measurement: events/s end to end, producing time, the follower's peak RSS."""
    fresh_home(bus_url)
    # This process reads the follower's file once it is released: a projection service (the default
    # read path) would fold the same bus beside the follower and hold the file the rebuild needs.
    os.environ["RUNBUS_PROJECTION"] = "inprocess"
    session()  # this process's bus (creates the Kafka topic) before anything starts
    follower = _child("follow")
    assert follower.stdout is not None and follower.stdin is not None
    if follower.stdout.readline().strip() != "ready":
        raise RuntimeError("the projector process did not start")
    spawn = multiprocessing.get_context("spawn")
    ready, go = spawn.Queue(), spawn.Event()
    share, extra = divmod(events, producers)
    workers = [spawn.Process(target=_produce, args=(runbus_environment(), share + (i < extra), ready, go))
               for i in range(producers)]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=120)

    began = time.perf_counter()
    go.set()
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise RuntimeError(f"a producer process exited with {worker.exitcode}")
    produced = time.perf_counter()
    follower.stdin.write("done\n")
    follower.stdin.flush()
    followed = json.loads(follower.stdout.readline())
    follower.wait(60)
    rows = int(get_run_db().sql("SELECT count(*) AS n FROM metrics").n[0])
    elapsed = time.perf_counter() - began
    if rows != events:
        raise RuntimeError(f"expected {events} metric rows, found {rows}")
    _close_projection()
    return {"events_per_s": events / elapsed, "seconds": elapsed, "produce_s": produced - began,
            "projector_rss_mb": followed["maxrss_mb"]}


def rebuild() -> dict[str, float]:
    """Rebuild the current home's projection in a child process: seconds and that process's peak RSS."""
    _close_projection()
    child = _child("rebuild")
    out, _ = child.communicate(timeout=900)
    if child.returncode != 0:
        raise RuntimeError(f"the rebuild process exited with {child.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def run(events: int, producers: int, repeat: int, kafka: str | None) -> Outcome:
    outcome = Outcome(details={"events": events, "producers": producers})
    samples: list[dict[str, float]] = []
    for _ in range(repeat):
        sample = end_to_end(events, producers, None)
        sample.update({f"rebuild_{k}": v for k, v in rebuild().items()})
        samples.append(sample)
    outcome.figures["e2e_embedded_events_per_s"] = median(s["events_per_s"] for s in samples)
    outcome.figures["e2e_embedded_produce_events_per_s"] = events / median(s["produce_s"] for s in samples)
    outcome.figures["projector_rss_mb"] = median(s["projector_rss_mb"] for s in samples)
    outcome.figures["rebuild_s"] = median(s["rebuild_rebuild_s"] for s in samples)
    outcome.figures["rebuild_rss_mb"] = median(s["rebuild_maxrss_mb"] for s in samples)
    outcome.details["embedded"] = samples
    if kafka:
        kafka_samples = [end_to_end(events, producers, f"kafka://{kafka}") for _ in range(repeat)]
        outcome.figures["e2e_kafka_events_per_s"] = median(s["events_per_s"] for s in kafka_samples)
        outcome.figures["e2e_kafka_produce_events_per_s"] = events / median(s["produce_s"] for s in kafka_samples)
        outcome.figures["projector_rss_mb_kafka"] = median(s["projector_rss_mb"] for s in kafka_samples)
        outcome.details["kafka"] = kafka_samples
    close_session()
    return outcome
