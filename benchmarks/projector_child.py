"""The rebuild of the end-to-end workload, run as its own process so its peak RSS and CPU can be read.

    python -m benchmarks.projector_child rebuild   # fold the whole log again; print {"rebuild_s", ...}

RUNBUS_HOME / RUNBUS_BUS (and the Kafka topic) come from the environment. (The follower of that
workload is the product's own projection service: see benchmarks.pipeline.)
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from benchmarks.profiling import profiled
from engine.api import session
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


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_rebuild() -> dict[str, float]:
    svc = session().services
    with open_projection(svc.settings.db_path, svc.settings.db_timeout_s) as con:
        began, cpu = time.perf_counter(), _cpu_s()
        events = svc.projector(con).rebuild()
        rebuild_s, cpu_s = time.perf_counter() - began, _cpu_s() - cpu
    return {"rebuild_s": rebuild_s, "events": events, "cpu_s": cpu_s, "maxrss_mb": _maxrss_mb()}


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "rebuild"
    if mode != "rebuild":
        raise SystemExit(f"unknown mode {mode!r}: only 'rebuild' (the follower is the projection service)")
    with profiled(f"projector-{mode}"):
        result = run_rebuild()
    print(json.dumps(result), flush=True)
    session().services.close()


if __name__ == "__main__":
    main()
