"""Which schedulers a sweep sends chunks of iterations to: those that run no task of a dead worker
again (allowed-failures 0 and the MarkFinished plugin)."""

from __future__ import annotations

from pathlib import Path

import dask
import pytest
from distributed import Client, LocalCluster

from engine.runtimes.dask import DaskPool, MarkFinished
from engine.settings import load_settings


@pytest.mark.dask
@pytest.mark.parametrize("allowed_failures, marks_finished, reruns",
                         [(3, True, True), (0, False, True), (0, True, False)])
def test_an_existing_scheduler_gets_chunks_only_if_it_runs_no_task_of_a_dead_worker_again(
        home: Path, allowed_failures: int, marks_finished: bool, reruns: bool) -> None:
    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}):
        cluster = LocalCluster(n_workers=1, processes=False, dashboard_address=None)
    try:
        if marks_finished:
            with Client(cluster) as client:
                client.register_plugin(MarkFinished())
        pool = DaskPool(cluster.scheduler_address, load_settings())
        try:
            assert pool.reruns_tasks_of_dead_workers is reruns
            # the driver's own reruns (Dask's default allowed-failures, read here) only where Dask made none
            assert pool.losses_allowed == (0 if reruns else 3)
        finally:
            pool.close()
    finally:
        cluster.close()
