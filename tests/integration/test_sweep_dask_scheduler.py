"""Which schedulers a sweep sends chunks of iterations to: those that run no task again after a worker died."""

from __future__ import annotations

from pathlib import Path

import dask
import pytest
from distributed import LocalCluster

from engine.runtimes.dask import DaskPool
from engine.settings import load_settings


@pytest.mark.dask
@pytest.mark.parametrize("allowed_failures, reruns", [(3, True), (0, False)])
def test_an_existing_scheduler_gets_chunks_only_if_it_runs_no_task_of_a_dead_worker_again(
        home: Path, allowed_failures: int, reruns: bool) -> None:
    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}):
        cluster = LocalCluster(n_workers=1, processes=False, dashboard_address=None)
    try:
        pool = DaskPool(cluster.scheduler_address, load_settings())
        try:
            assert pool.reruns_tasks_of_dead_workers is reruns
        finally:
            pool.close()
    finally:
        cluster.close()
