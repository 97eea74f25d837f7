"""The projector of the end-to-end workload, run as its own process so its peak RSS can be read.

    python -m benchmarks.projector_child follow    # fold as events arrive; stop when stdin says 'done'
                                                   # and the lag is 0; print {"applied", "maxrss_mb"}
    python -m benchmarks.projector_child rebuild   # fold the whole log again; print {"rebuild_s", ...}

RUNBUS_HOME / RUNBUS_BUS (and the Kafka topic) come from the environment.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path

from benchmarks.profiling import profiled
from engine.api import session
from engine.follow import follow
from projections import open_projection


def _maxrss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec, so a child
    of a big benchmark process would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_follow() -> dict[str, float]:
    svc = session().services
    with open_projection(svc.settings.db_path, svc.settings.db_timeout_s) as con:
        svc.projector(con)  # create the tables before the producers start
    producers_done = threading.Event()
    stop = threading.Event()

    def wait_for_done() -> None:
        sys.stdin.readline()
        producers_done.set()

    def report(_total: int, lag: int) -> None:
        if producers_done.is_set() and lag == 0:
            stop.set()

    threading.Thread(target=wait_for_done, daemon=True).start()
    print("ready", flush=True)
    applied = follow(svc, stop, report, idle_s=0.05)
    return {"applied": applied, "maxrss_mb": _maxrss_mb()}


def run_rebuild() -> dict[str, float]:
    svc = session().services
    with open_projection(svc.settings.db_path, svc.settings.db_timeout_s) as con:
        began = time.perf_counter()
        events = svc.projector(con).rebuild()
        rebuild_s = time.perf_counter() - began
    return {"rebuild_s": rebuild_s, "events": events, "maxrss_mb": _maxrss_mb()}


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "follow"
    with profiled(f"projector-{mode}"):
        result = run_follow() if mode == "follow" else run_rebuild()
    print(json.dumps(result), flush=True)
    session().services.close()


if __name__ == "__main__":
    main()
