"""A 1,000-iteration sweep of a trivial handler on Dask beside a bare client.map on the same cluster."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from distributed import Client, LocalCluster

from engine import NewRun, new_function
from engine.bootstrap import reset_services


def trivial(context: Any, x: int = 0) -> int:
    context.log_result("y", x * 2)
    return x * 2


def bare(x: int) -> int:
    return x * 2


def sweep_vs_map(iterations: int = 1_000, workers: int = 2) -> dict[str, float]:
    os.environ["RUNBUS_HOME"] = tempfile.mkdtemp(prefix="runbus-bench-sweep-")
    os.environ.pop("RUNBUS_BUS", None)
    reset_services()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.gather(client.map(bare, range(workers * 4), pure=False))  # warm the workers
        began = time.perf_counter()
        client.gather(client.map(bare, range(iterations), pure=False))
        bare_s = time.perf_counter() - began
        began = time.perf_counter()
        run = new_function(command=f"dask://{cluster.scheduler_address}").run(
            NewRun(handler=trivial), hyperparams={"x": list(range(iterations))}, selector="max.y", quiet=True)
        sweep_s = time.perf_counter() - began
        assert run.state == "completed", run.error
    reset_services()
    return {"sweep_s": sweep_s, "client_map_s": bare_s, "sweep_over_map": sweep_s / bare_s}
