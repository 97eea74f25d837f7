"""Several producer processes logging at once, and the check that each run's order survived."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any


def _log_metrics(environment: dict[str, str], events: int) -> None:
    os.environ.update(environment)
    from engine import NewRun, new_function
    from engine.api import close_session

    def job(context: Any) -> None:
        for step in range(events):
            context.log_metric("m", step, step=step)

    new_function().run(NewRun(handler=job, name="producer"))
    close_session()


def produce_from_processes(processes: int, events: int, timeout_s: float = 300) -> None:
    """`processes` spawned processes each run one job logging `events` metrics on the RUNBUS_* bus."""
    environment = {k: v for k, v in os.environ.items() if k.startswith("RUNBUS_")}
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_log_metrics, args=(environment, events)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout_s)
        assert worker.exitcode == 0


SEQ_BREAKS = """
    SELECT count(*) AS n FROM (
        SELECT seq, lag(seq) OVER (PARTITION BY run_uid, stream ORDER BY position) AS previous FROM events)
    WHERE previous IS NOT NULL AND seq <> previous + 1"""
"""Events whose seq does not follow the previous event of their stream, in projection order."""
