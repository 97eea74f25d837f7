"""Workload 2: a sweep of N child runs, each with 3 params, 2 results and a label (in-process runtime).

Milliseconds per child from `run()` until a second process (benchmarks.observer: one process for the
workload, warmed on each home before the clock starts) sees every child completed with its results
and label; median of `repeat`, each on a fresh home. MLflow's side logs the same values the same
number of times (benchmarks/mlflow_workload.py).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks import observer as observers
from benchmarks.common import Outcome, fresh_home, median
from benchmarks.phases import phase
from engine import NewRun, new_function
from engine.api import close_session, session

VISIBLE = """
SELECT count(*) FROM runs r
JOIN results s ON s.uid = r.uid AND s.key = 'loss'
JOIN labels l ON l.uid = r.uid AND l.key = 'kind'
WHERE r.parent_uid = ? AND r.state = 'completed'
"""


def child(context: Any, p1: int = 0, p2: float = 0.0, p3: str = "") -> None:
    context.log_result("accuracy", (p1 % 100) / 100)
    context.log_result("loss", 1 - (p1 % 100) / 100 + p2)
    context.set_label("kind", p3)


def hyperparams(children: int) -> dict[str, list[Any]]:
    """Three params per child, taken together (strategy 'list')."""
    return {"p1": list(range(children)), "p2": [i * 0.001 for i in range(children)],
            "p3": [f"k{i % 7}" for i in range(children)]}


def measure_once(children: int) -> float:
    """Milliseconds per child run, from run() until another process sees every child."""
    with phase("set-up: fresh home, bus, observer"):
        fresh_home()
        session()  # build the bus and writer before the clock starts
        observer = observers.shared()
    with phase("timed"):
        began = time.perf_counter()
        run = new_function().run(NewRun(handler=child, name="bench-children"), hyperparams=hyperparams(children),
                                 strategy="list", selector="max.accuracy", quiet=True)
        if run.state != "completed":
            raise RuntimeError(f"sweep ended {run.state}: {run.error}")
        observer.wait_for(VISIBLE, [run.uid], children)
        elapsed = time.perf_counter() - began
    with phase("tear-down"):
        close_session()
    return elapsed * 1000 / children


def run(children: int, repeat: int) -> Outcome:
    try:
        samples = [measure_once(children) for _ in range(repeat)]
    finally:
        observers.close_shared()
    return Outcome(figures={"child_run_ms": median(samples)},
                   details={"children": children, "repeat": repeat, "samples_ms": samples})
