"""Workload 6: an N-iteration sweep of a trivial handler on dask:// beside a bare client.map of the same
work on the same LocalCluster."""

from __future__ import annotations

import logging
import time
from typing import Any

from distributed import Client, LocalCluster

from benchmarks.common import Outcome, fresh_home
from engine import NewRun, new_function
from engine.api import close_session


def trivial(context: Any, x: int = 0) -> int:
    context.log_result("y", x * 2)
    return x * 2


def bare(x: int) -> int:
    return x * 2


def sweep_vs_map(iterations: int = 1_000, workers: int = 2) -> dict[str, float]:
    logging.getLogger("distributed").setLevel(logging.ERROR)  # no dashboard-port chatter in the output
    fresh_home(prefix="runbus-bench-sweep-")
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
        if run.state != "completed":
            raise RuntimeError(f"the sweep ended {run.state}: {run.error}")
    close_session()
    return {"sweep_s": sweep_s, "client_map_s": bare_s, "sweep_over_map": sweep_s / bare_s}


def run(iterations: int, repeat: int) -> Outcome:
    samples = [sweep_vs_map(iterations) for _ in range(repeat)]
    middle = sorted(samples, key=lambda s: s["sweep_over_map"])[len(samples) // 2]
    return Outcome(figures={"sweep_s": middle["sweep_s"], "client_map_s": middle["client_map_s"],
                            "sweep_over_map": middle["sweep_over_map"]},
                   details={"iterations": iterations, "samples": samples})
