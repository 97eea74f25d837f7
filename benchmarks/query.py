"""Workload 3: a query filtering on a param and a result, sorted by a result, over 1k/10k/100k runs.

The runs go through the real pipeline: RunContext -> writer -> bus -> projector. The sizes are built
incrementally in one home (1k, then 9k more, then 90k more) and each is queried before growing.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from benchmarks.common import Outcome, fresh_home, median
from engine import get_run_db
from engine.bootstrap import reset_services, services
from engine.runspec import RunSpec
from producers.context import RunContext

QUERY = """
SELECT r.uid, r.name, a.value_num AS accuracy, l.value_num AS loss
FROM runs r
JOIN params p ON p.uid = r.uid AND p.key = 'p1'
JOIN results a ON a.uid = r.uid AND a.key = 'accuracy'
JOIN results l ON l.uid = r.uid AND l.key = 'loss'
WHERE p.value_num = 3 AND a.value_num > 0.5
ORDER BY l.value_num ASC
LIMIT 100
"""


def _noop(context: Any) -> None:
    """The handler the benchmark runs are attributed to (never called)."""


def _finisher() -> Any:
    """finish() without a flush per run when this version of RunContext allows it."""
    if "flush" in inspect.signature(RunContext.finish).parameters:
        return lambda context: context.finish(flush=False)
    return lambda context: context.finish()


def produce(first: int, count: int) -> None:
    """`count` tiny finished runs: 3 params, 2 results, a label each."""
    settings = services().settings
    finish = _finisher()
    for i in range(first, first + count):
        spec = RunSpec(settings, _noop, "benchmarks.query:_noop", name=f"q{i}", project="bench",
                       params={"p1": i % 10, "p2": (i % 1000) * 0.001, "p3": f"g{i % 5}"})
        context = spec.new_context()
        context.start()
        context.log_result("accuracy", (i * 7919 % 1000) / 1000)
        context.log_result("loss", (i * 104729 % 1000) / 1000)
        context.set_label("team", f"t{i % 3}")
        finish(context)
    services().writer.flush()


def time_queries(queries: int) -> tuple[float, float]:
    """(median ms of the filtered, sorted SQL query, median ms of list_runs sorted by a result)."""
    db = get_run_db()
    db.sql(QUERY)  # warm: the first open after a build pays for loading the file
    sql_ms, list_ms = [], []
    for _ in range(queries):
        began = time.perf_counter()
        frame = db.sql(QUERY)
        sql_ms.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        db.list_runs(project="bench", sort_by="-result.accuracy", limit=100)
        list_ms.append((time.perf_counter() - began) * 1000)
    if frame.empty:
        raise RuntimeError("the benchmark query matched no run")
    return median(sql_ms), median(list_ms)


def run(sizes: tuple[int, ...], queries: int) -> Outcome:
    fresh_home()
    outcome = Outcome()
    built = 0
    builds: dict[str, dict[str, float]] = {}
    for size in sorted(sizes):
        began = time.perf_counter()
        produce(built, size - built)
        produced = time.perf_counter()
        projected_events = get_run_db().catch_up()
        projected = time.perf_counter()
        runs = int(get_run_db().sql("SELECT count(*) AS n FROM runs WHERE project = 'bench'").n[0])
        if runs != size:
            raise RuntimeError(f"expected {size} runs in the projection, found {runs}")
        builds[str(size)] = {"runs_added": size - built, "produce_s": produced - began,
                             "project_s": projected - produced, "events": projected_events}
        built = size
        sql_ms, list_ms = time_queries(queries)
        outcome.figures[f"query_ms_{size}"] = sql_ms
        outcome.figures[f"list_runs_ms_{size}"] = list_ms
    total_runs = max(sizes)
    total_s = sum(b["produce_s"] + b["project_s"] for b in builds.values())
    outcome.figures["query_build_ms_per_run"] = total_s * 1000 / total_runs
    outcome.details = {"query": " ".join(QUERY.split()), "builds": builds, "queries_per_size": queries}
    reset_services()
    return outcome
