"""Workload 3: a query filtering on a param and a result, sorted by a result, over 1k/10k/100k runs.

The runs go through the real pipeline: RunContext -> writer -> bus -> projector. The sizes are built
incrementally in one home (1k, then 9k more, then 90k more) and each is queried before growing.

Beside each Runbus figure the same query runs on a bare DuckDB table holding the same runs (one row
a run, params and results as columns, built here from the projection's runs/params/results), with
the same number of repeats: what the query costs without Runbus. The query on the key/value tables
(`params`/`results` joined to `runs`) is timed too, to show what the wide layout buys.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from benchmarks.common import Outcome, fresh_home, median
from engine import get_run_db
from engine.bootstrap import reset_services, services
from engine.runspec import RunSpec

WIDE_QUERY = """
SELECT uid, name, "result.accuracy" AS accuracy, "result.loss" AS loss
FROM {table}
WHERE "param.p1" = 3 AND "result.accuracy" > 0.5
ORDER BY "result.loss" ASC, uid
LIMIT 100
"""
QUERY = WIDE_QUERY.format(table="runs_wide")

KV_QUERY = """
SELECT r.uid, r.name, a.value_num AS accuracy, l.value_num AS loss
FROM runs r
JOIN params p ON p.uid = r.uid AND p.key = 'p1'
JOIN results a ON a.uid = r.uid AND a.key = 'accuracy'
JOIN results l ON l.uid = r.uid AND l.key = 'loss'
WHERE p.value_num = 3 AND a.value_num > 0.5
ORDER BY l.value_num ASC, r.uid
LIMIT 100
"""
IDLE_S = 2.0  # the pause before each query of the idle figure
IDLE_QUERIES = 5


def _noop(context: Any) -> None:
    """The handler the benchmark runs are attributed to (never called)."""


def produce(first: int, count: int) -> None:
    """`count` tiny finished runs: 3 params, 2 results, a label each."""
    settings = services().settings
    for i in range(first, first + count):
        spec = RunSpec(settings, _noop, "benchmarks.query:_noop", name=f"q{i}", project="bench",
                       params={"p1": i % 10, "p2": (i % 1000) * 0.001, "p3": f"g{i % 5}"})
        context = spec.new_context()
        context.start()
        context.log_result("accuracy", (i * 7919 % 1000) / 1000)
        context.log_result("loss", (i * 104729 % 1000) / 1000)
        context.set_label("team", f"t{i % 3}")
        context.finish(flush=False)
    services().writer.flush()


def bare_table(path: Path) -> duckdb.DuckDBPyConnection:
    """A plain DuckDB file holding the projection's runs as one table `bare`: the runs columns and
    one DOUBLE column per numeric param and result key, rows in start order."""
    db = get_run_db()
    runs = db.sql("SELECT * FROM runs ORDER BY started_at")
    values = db.sql("SELECT 'param.' || key AS column, uid, value_num FROM params WHERE value_num IS NOT NULL "
                    "UNION ALL SELECT 'result.' || key, uid, value_num FROM results WHERE value_num IS NOT NULL")
    wide = values.pivot(index="uid", columns="column", values="value_num")
    frame = runs.join(wide, on="uid")
    path.unlink(missing_ok=True)
    con = duckdb.connect(str(path))
    con.register("frame", frame)
    con.execute("CREATE TABLE bare AS SELECT * FROM frame")
    con.unregister("frame")
    con.execute("CHECKPOINT")
    return con


def _timed(call: Any, repeats: int) -> tuple[float, pd.DataFrame]:
    """(median ms of `repeats` calls after one warm call, the last result)."""
    result = call()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - began) * 1000)
    return median(times), result


def time_queries(queries: int, bare: duckdb.DuckDBPyConnection) -> dict[str, float]:
    """Median ms of: the query through Runbus, the same on the bare table, the key/value form, and
    list_runs sorted by a result (same repeats each)."""
    db = get_run_db()
    sql_ms, frame = _timed(lambda: db.sql(QUERY), queries)
    bare_query = WIDE_QUERY.format(table="bare")
    bare_ms, bare_frame = _timed(lambda: bare.execute(bare_query).df(), queries)
    kv_ms, kv_frame = _timed(lambda: db.sql(KV_QUERY), queries)
    list_ms, _ = _timed(lambda: db.list_runs(project="bench", sort_by="-result.accuracy", limit=100), queries)
    if frame.empty:
        raise RuntimeError("the benchmark query matched no run")
    for name, other in (("bare", bare_frame), ("key/value", kv_frame)):
        if other.uid.tolist() != frame.uid.tolist():
            raise RuntimeError(f"the {name} query found other runs than the runs_wide query")
    return {"query": sql_ms, "bare": bare_ms, "kv": kv_ms, "list_runs": list_ms}


def time_after_idle(pauses: int) -> float:
    """Median ms of the query run after IDLE_S seconds of nothing."""
    db = get_run_db()
    times = []
    for _ in range(pauses):
        time.sleep(IDLE_S)
        began = time.perf_counter()
        db.sql(QUERY)
        times.append((time.perf_counter() - began) * 1000)
    return median(times)


def run(sizes: tuple[int, ...], queries: int) -> Outcome:
    home = fresh_home()
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
        bare = bare_table(home / "bare.duckdb")
        try:
            figures = time_queries(queries, bare)
        finally:
            bare.close()
        if size == min(sizes):
            outcome.figures[f"query_idle_ms_{size}"] = time_after_idle(IDLE_QUERIES)
        outcome.figures[f"query_ms_{size}"] = figures["query"]
        outcome.figures[f"query_bare_ms_{size}"] = figures["bare"]
        outcome.figures[f"query_kv_ms_{size}"] = figures["kv"]
        outcome.figures[f"list_runs_ms_{size}"] = figures["list_runs"]
        print(f"query at {size:,} runs (median of {queries}): Runbus {figures['query']:.2f} ms, "
              f"bare DuckDB table {figures['bare']:.2f} ms ({figures['query'] / figures['bare']:.2f}x), "
              f"key/value tables {figures['kv']:.2f} ms; list_runs(sort_by='-result.accuracy', limit=100) "
              f"{figures['list_runs']:.2f} ms", flush=True)
    total_runs = max(sizes)
    total_s = sum(b["produce_s"] + b["project_s"] for b in builds.values())
    outcome.figures["query_build_ms_per_run"] = total_s * 1000 / total_runs
    outcome.details = {"query": " ".join(QUERY.split()), "kv_query": " ".join(KV_QUERY.split()),
                       "builds": builds, "queries_per_size": queries,
                       "idle": {"pause_s": IDLE_S, "queries": IDLE_QUERIES, "runs": min(sizes)}}
    reset_services()
    return outcome
