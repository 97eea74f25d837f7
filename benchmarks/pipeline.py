"""Workloads 4, 5 and 7: N events from P producer processes to queryable SQL rows, folded by the home's
projection service as the product runs it (`python -m engine.projection_service --follow`: its imports,
its DuckDB settings, its reader threads; its peak RSS is workload 7); then a rebuild of that projection
by the same service, as `runbus project --rebuild` asks it (5).

The clock starts when every producer process has built its bus and waits for the signal, and stops
when `get_run_db().sql("SELECT count(*) FROM metrics")` in this process, answered by that service once
it has folded the bus up to the end the producers left, returns all N rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Outcome, fresh_home, median, runbus_environment, stop_projection_service
from benchmarks.phases import add, phase
from benchmarks.together import run_together
from engine import NewRun, get_run_db, new_function
from engine.api import close_session, session
from producers.bus.memory import MemoryBus
from projections.client import ServiceClient
from projections.service import ServiceAddress

READ_TIMEOUT_S = 900  # a reader waits this long for the service to fold 1M events


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


def _start_service(home: Path) -> subprocess.Popen[bytes]:
    """The home's projection service, the process readers start (`--follow`: without its idle exit);
    returns once it answers (its tables exist)."""
    service = subprocess.Popen([sys.executable, "-m", "engine.projection_service", "--follow"], cwd=ROOT,
                               env={**os.environ, **runbus_environment()}, stdin=subprocess.DEVNULL)
    client = ServiceClient(ServiceAddress.of(home), MemoryBus(), start=None)
    deadline = time.monotonic() + 120
    while client.running() is None:
        if service.poll() is not None or time.monotonic() > deadline:
            service.kill()
            raise RuntimeError(f"the projection service did not start (exit {service.poll()})")
        time.sleep(0.05)
    return service


def _process_figures(pid: int) -> dict[str, float]:
    """A live process's peak RSS (VmHWM, MB) and CPU seconds (user + system) so far."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"maxrss_mb": peak_kb / 1024, "cpu_s": (int(fields[11]) + int(fields[12])) / ticks}


def end_to_end(events: int, producers: int, bus_url: str | None) -> dict[str, float]:
    """One measurement: events/s end to end, producing time, the projection service's peak RSS and
    CPU seconds (from its start: imports, opening DuckDB, folding, answering)."""
    os.environ["RUNBUS_DB_TIMEOUT"] = str(READ_TIMEOUT_S)  # the count waits for the whole fold
    with phase("set-up: fresh home and bus"):
        home = fresh_home(bus_url)
        session()  # read with its settings: this process's bus (creates the Kafka topic) before anything starts
    services: list[subprocess.Popen[bytes]] = []
    try:
        produce_s, elapsed, rows = _produce_and_count(events, producers,
                                                      lambda: services.append(_start_service(home)))
        served = _process_figures(services[0].pid)
    finally:
        with phase("tear-down: stop the service"):
            close_session()
            stop_projection_service(home)  # the rebuild needs the file
            for service in services:
                service.wait(60)
        del os.environ["RUNBUS_DB_TIMEOUT"]
    if rows != events:
        raise RuntimeError(f"expected {events} metric rows, found {rows}")
    return {"events_per_s": events / elapsed, "seconds": elapsed, "produce_s": produce_s,
            "projector_rss_mb": served["maxrss_mb"], "projector_cpu_s": served["cpu_s"],
            "projector_cpu_us_per_event": served["cpu_s"] / events * 1e6}


def _produce_and_count(events: int, producers: int, start_service: Callable[[], None]) -> tuple[float, float, int]:
    """Start the producers (and meanwhile the service: their start-ups overlap, neither is timed), let
    them go, wait for them and for the rows: (producing seconds, seconds until the rows are
    queryable, rows)."""
    starting = time.perf_counter()
    began = run_together(_produce, (runbus_environment(),), events, producers, meanwhile=start_service)
    produced = time.perf_counter()
    rows = int(get_run_db().sql("SELECT count(*) AS n FROM metrics").n[0])
    ended = time.perf_counter()
    add("set-up: start the producers and the service", began - starting)
    add("timed: producers -> SQL rows", ended - began)
    return produced - began, ended - began, rows


def rebuild() -> dict[str, float]:
    """Rebuild the current home's projection as `runbus project --rebuild` does: its projection
    service drops the tables and folds the whole log again. Seconds of the rebuild; the service's
    peak RSS and CPU seconds (from its start, ~0.7 s of which is start-up)."""
    home = Path(os.environ["RUNBUS_HOME"])
    with phase("set-up: start the service"):
        service = _start_service(home)
    try:
        with phase("timed: rebuild"):
            began = time.perf_counter()
            records = ServiceClient(ServiceAddress.of(home), MemoryBus(), start=None).rebuild()
            seconds = time.perf_counter() - began
        served = _process_figures(service.pid)
    finally:
        with phase("tear-down: stop the service"):
            stop_projection_service(home)
            service.wait(60)
    return {"rebuild_s": seconds, "records": records, "cpu_s": served["cpu_s"], "maxrss_mb": served["maxrss_mb"]}


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
