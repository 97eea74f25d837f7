"""CPU cost of ingest, robust to a shared machine: CPU-microseconds per event (user + sys of the process
doing the work, divided by the events), not wall-clock events/s.

    python -m benchmarks.ingest_cpu fill HOME N [P]   # P producer processes log N metric points to HOME's
                                                      # embedded bus; prints the producers' CPU-us/event
    python -m benchmarks.ingest_cpu fold HOME         # fold HOME's whole log in this process in the live
                                                      # fold's batches; prints CPU-us/event, seconds, peak RSS
    python -m benchmarks.ingest_cpu rebuild HOME      # the same in a rebuild's batches (Projector.rebuild)

`fold` is what the projection service does when it catches up, without the socket: py-spy pointed
at it (`py-spy record -r 200 -f raw -- python -m benchmarks.ingest_cpu fold HOME`) shows what bounds
the rebuild and the follower alike.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.together import run_together


def cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (or of its waited-for children)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def rss_mb() -> float:
    """This process's resident set now (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _produce_one(home: str, count: int, ready: object, go: object) -> None:
    from benchmarks.pipeline import _produce
    _produce({"RUNBUS_HOME": home, "RUNBUS_PROJECTION": "inprocess"}, count, ready, go)


def fill(home: str, events: int, producers: int) -> dict[str, float]:
    """Log `events` metric points from `producers` processes (as the pipeline workload does)."""
    before = cpu_s(resource.RUSAGE_CHILDREN)  # no producer has exited yet: their start-up counts below
    began = run_together(_produce_one, (home,), events, producers)
    seconds = time.perf_counter() - began
    # the children's CPU includes their start-up (imports, session): reported apart by `fill 0`
    spent = cpu_s(resource.RUSAGE_CHILDREN) - before
    return {"events": events, "seconds": seconds, "producers_cpu_s": spent,
            "producers_cpu_us_per_event": spent / events * 1e6 if events else 0.0}


class _Sampler:
    """Every 0.2 s: this process's RSS and DuckDB's own accounting (duckdb_memory(), by tag); keeps
    the sample of the highest RSS."""

    def __init__(self, cursor: Any) -> None:
        self.cursor, self.at_peak = cursor, {"rss_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            now = rss_mb()
            if now <= self.at_peak["rss_mb"]:
                continue
            rows = self.cursor.execute("SELECT tag, memory_usage_bytes FROM duckdb_memory() "
                                       "WHERE memory_usage_bytes > 0").fetchall()
            sample: dict[str, Any] = {"rss_mb": now}
            sample.update({f"duckdb_{tag.lower()}_mb": round(b / 2**20, 1) for tag, b in rows})
            sample["duckdb_total_mb"] = round(sum(b for _, b in rows) / 2**20, 1)
            self.at_peak = sample

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def fold(home: str, rebuild: bool = False) -> dict[str, float]:
    """Fold HOME's whole log into a fresh projection in this process, as the live fold batches it
    (catch_up) or as a rebuild does."""
    os.environ["RUNBUS_HOME"] = home
    os.environ["RUNBUS_PROJECTION"] = "inprocess"
    from engine.bootstrap import make_bus
    from engine.projection_service import keep_pandas_out
    from engine.settings import load_settings
    from projections.database import open_projection, remove_projection_files
    from projections.projector import Projector
    from schemas import EventCodec

    settings = load_settings()
    remove_projection_files(settings.db_path)
    bus = make_bus(settings.bus_url, settings)
    keep_pandas_out()  # as the projection service does
    imported_mb = rss_mb()
    with open_projection(settings.db_path, 600, linger_s=0) as con:
        for statement in filter(None, os.environ.get("RUNBUS_BENCH_DUCKDB_SET", "").split(";")):
            con.execute(f"SET {statement}")  # e.g. memory_limit='100MB';threads=1
        if os.environ.get("RUNBUS_BENCH_SEAL"):  # the service's read-only seal (no temp directory)
            from projections.readonly import seal
            Projector(bus, con, EventCodec())  # tables first, as the service does
            seal(con, [])
        per_batch = os.environ.get("RUNBUS_BENCH_EVENTS_PER_BATCH")  # the projector's cap if unset
        projector = Projector(bus, con, EventCodec(), **({"events_per_batch": int(per_batch)} if per_batch else {}))
        opened_mb = rss_mb()
        sampler = _Sampler(con.cursor())
        cpu0, wall0 = cpu_s(), time.perf_counter()
        projector.rebuild() if rebuild else projector.catch_up()
        cpu, wall = cpu_s() - cpu0, time.perf_counter() - wall0
        sampler.stop()
        events = con.execute("SELECT count(*) FROM events").fetchall()[0][0]
        duck = con.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchall()[0][0]
    bus.close()
    return {"at_peak": sampler.at_peak, "events": events, "seconds": wall, "cpu_s": cpu,
            "cpu_us_per_event": cpu / events * 1e6,
            "rss_after_imports_mb": imported_mb, "rss_after_open_mb": opened_mb,
            "duckdb_memory_mb_at_end": (duck or 0) / 2**20, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    mode, home = sys.argv[1], sys.argv[2]
    if mode == "fill":
        result = fill(home, int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 4)
    else:
        result = fold(home, rebuild=mode == "rebuild")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
