"""Workload 3: a query filtering on a param and a result, sorted by a result, over 1k/10k/100k runs,
measured as a user meets it: from a second process, while `runbus ui` and the follower
(`runbus project --follow`, the home's projection service) run on the same home.

The runs are written through the real pipeline (RunContext -> writer -> bus) by `builders` processes
at once (the build is not timed), in steps (1k, then 9k more, then 90k more), and this process waits
until the service has folded them, and until it has opened its file again (at most REOPEN_WAIT_S:
see `_opened_again`; how long it took is in the details). For each size a second process (`python -m benchmarks.query
--measure`, one for all sizes, as MLflow's side has one observer) times, through `get_run_db()`:

- the query (`RunDB.sql`), and beside it the same query on a bare DuckDB table holding the same runs
  (one row a run, params and results as columns, built from the projection's runs/params/results)
  with the same repeats: what the query costs without Runbus. The bare table is written, then
  opened again (by a new DuckDB instance, as the service reads its file), and answers as DataFrames
  both ways DuckDB offers (`.df()`, and its Arrow answer converted as Runbus converts its own); its
  figure is the faster;
- the query on the key/value tables (`params`/`results` joined to `runs`): what the wide layout buys;
- `list_runs(project=..., sort_by='-result.accuracy', limit=100)`, and beside it its page read from
  the bare table the fastest of four ways: one sorted query or the page's rows found first (as
  list_runs reads it), each way to a DataFrame;
- at the smallest size, the query after 2 s of nothing (the service stays up; the client's
  connection is kept), and the bare table's query after the same pauses: what an idle pause costs
  any query on this machine.

Every figure is the median of its repeats after one warm call. `python -m benchmarks.query` runs it
alone; `python -m benchmarks --only query` as part of the suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from benchmarks.common import ROOT, Outcome, end_child, fresh_home, median
from benchmarks.phases import add, phase
from engine.bootstrap import Services, bootstrap
from engine.runspec import RunSpec
from engine.settings import load_settings
from producers.bus.memory import MemoryBus
from projections.client import ServiceClient
from projections.database import ProjectionBusy
from projections.query import RunDB
from projections.service import ServiceAddress
from projections.tables import RUN_COLUMN_TYPES, RUN_COLUMNS, quoted, runs_wide_column_ddl
from projections.wire import to_frame

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
# list_runs(project='bench', sort_by='-result.accuracy', limit=100) on the bare table, both ways a
# page can be read: one sorted query, and its rows found on their sort keys first (as list_runs does)
_LIST_ORDER = '"result.accuracy" DESC NULLS LAST, started_at DESC, uid'
BARE_LIST_QUERIES = {
    "sorted": f"SELECT {', '.join(RUN_COLUMNS)} FROM bare WHERE project = 'bench' ORDER BY {_LIST_ORDER} LIMIT 100",
    "by rowid": f"SELECT {', '.join(RUN_COLUMNS)} FROM bare WHERE rowid IN (SELECT rowid FROM bare "
                f"WHERE project = 'bench' ORDER BY {_LIST_ORDER} LIMIT 100) ORDER BY {_LIST_ORDER}",
}
IDLE_S = 2.0  # the pause before each query of the idle figure
IDLE_QUERIES = 5
RUNBUS = str(Path(sys.executable).parent / "runbus")


def _noop(context: Any) -> None:
    """The handler the benchmark runs are attributed to (never called)."""


def produce(svc: Services, first: int, count: int) -> None:
    """`count` tiny finished runs: 3 params, 2 results, a label each."""
    for i in range(first, first + count):
        spec = RunSpec(svc.settings, _noop, "benchmarks.query:_noop", name=f"q{i}", project="bench",
                       params={"p1": i % 10, "p2": (i % 1000) * 0.001, "p3": f"g{i % 5}"})
        context = spec.new_context(svc)
        context.start()
        context.log_result("accuracy", (i * 7919 % 1000) / 1000)
        context.log_result("loss", (i * 104729 % 1000) / 1000)
        context.set_label("team", f"t{i % 3}")
        context.finish(flush=False)
    svc.writer.flush()


def _produce_share(env: dict[str, str], first: int, count: int) -> None:
    """`produce` in a builder process, through services of its own on the home and bus of `env`."""
    os.environ.update(env)
    svc = bootstrap(load_settings(env))
    try:
        produce(svc, first, count)
    finally:
        svc.close()


def _shares(first: int, count: int, parts: int) -> list[tuple[int, int]]:
    """(first, count) of each of `parts` consecutive slices of the runs first..first+count-1."""
    size, extra = divmod(count, parts)
    starts = [first + i * size + min(i, extra) for i in range(parts)]
    return [(start, size + (i < extra)) for i, start in enumerate(starts) if size + (i < extra)]


# -- the measuring process ---------------------------------------------------------------------


def bare_table(db: RunDB, path: Path) -> duckdb.DuckDBPyConnection:
    """A plain DuckDB file holding the projection's runs as one table `bare`: the runs columns, of
    the types runs_wide declares (a column no run filled is still stored as its type, not as
    DuckDB's NULL type, which costs nothing to scan), and one DOUBLE column per numeric param and
    result key; rows in start order, stored as runs_wide stores them."""
    runs = db.sql("SELECT * FROM runs ORDER BY started_at")
    values = db.sql("SELECT 'param.' || key AS column, uid, value_num FROM params WHERE value_num IS NOT NULL "
                    "UNION ALL SELECT 'result.' || key, uid, value_num FROM results WHERE value_num IS NOT NULL")
    wide = values.pivot(index="uid", columns="column", values="value_num")
    frame = runs.join(wide, on="uid")
    path.unlink(missing_ok=True)
    con = duckdb.connect(str(path))
    con.register("frame", frame)
    # the storage runs_wide has (its scanned string columns uncompressed), so the ratio is Runbus's own cost
    declared = dict(RUN_COLUMN_TYPES)
    types = [(name, declared.get(name, "DOUBLE")) for name in frame.columns]
    con.execute(f"CREATE TABLE bare ({', '.join(runs_wide_column_ddl(name, kind) for name, kind in types)})")
    con.execute(f"INSERT INTO bare SELECT {', '.join(f'{quoted(name)}::{kind}' for name, kind in types)} FROM frame")
    con.unregister("frame")
    con.execute("CHECKPOINT")
    con.close()
    # read by a new instance, as the service reads its file once it opened it again: DuckDB reads the
    # rows its instance appended more slowly (see projections.service.REOPEN_AFTER_RECORDS)
    return duckdb.connect(str(path))


def _timed(call: Callable[[], pd.DataFrame], repeats: int) -> tuple[float, pd.DataFrame]:
    """(median ms of `repeats` calls after one warm call, the last result)."""
    result = call()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - began) * 1000)
    return median(times), result


# the bare table's two ways to a DataFrame: DuckDB's own `.df()`, and its Arrow answer converted by
# pyarrow the way Runbus converts its answers (projections.wire). Which is faster depends on the
# columns (`.df()` spends ~1.5 ms on each TIMESTAMPTZ column here, Arrow ~0.5 ms on a few numbers),
# so the bare figures take the faster of the two, measured with the same repeats
BARE_WAYS: dict[str, Callable[[duckdb.DuckDBPyConnection, str], pd.DataFrame]] = {
    "df": lambda con, query: con.execute(query).df(),
    "arrow": lambda con, query: to_frame(con.sql(query).to_arrow_table()),
}


def _timed_bare(bare: duckdb.DuckDBPyConnection, queries: dict[str, str],
                repeats: int) -> tuple[float, pd.DataFrame, dict[str, float]]:
    """`_timed` of each of `queries` (the same answer written differently) on the bare table, each
    way in BARE_WAYS: (the fastest median, its last result, every one's median by "query way")."""
    each = {f"{form} {way}".lstrip(): _timed(lambda query=query, answer=answer: answer(bare, query), repeats)
            for form, query in queries.items() for way, answer in BARE_WAYS.items()}
    fastest = min(each, key=lambda name: each[name][0])
    return each[fastest][0], each[fastest][1], {name: ms for name, (ms, _) in each.items()}


def time_queries(db: RunDB, queries: int, bare: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """Median ms of: the query through Runbus, the same on the bare table, the key/value form, and
    list_runs sorted by a result and its query on the bare table (same repeats each; the bare
    table's figures are its fastest way to a DataFrame, every way under "bare_ways")."""
    sql_ms, frame = _timed(lambda: db.sql(QUERY), queries)
    bare_ms, bare_frame, query_ways = _timed_bare(bare, {"": WIDE_QUERY.format(table="bare")}, queries)
    kv_ms, kv_frame = _timed(lambda: db.sql(KV_QUERY), queries)
    list_ms, listed = _timed(lambda: db.list_runs(project="bench", sort_by="-result.accuracy", limit=100), queries)
    bare_list_ms, bare_listed, list_ways = _timed_bare(bare, BARE_LIST_QUERIES, queries)
    if listed.uid.tolist() != bare_listed.uid.tolist():
        raise RuntimeError("list_runs found other runs than its query on the bare table")
    if frame.empty:
        raise RuntimeError("the benchmark query matched no run")
    for name, other in (("bare", bare_frame), ("key/value", kv_frame)):
        if other.uid.tolist() != frame.uid.tolist():
            raise RuntimeError(f"the {name} query found other runs than the runs_wide query")
    return {"query": sql_ms, "bare": bare_ms, "kv": kv_ms, "list_runs": list_ms, "list_bare": bare_list_ms,
            "bare_ways": {"query": query_ways, "list_runs": list_ways}}


def _ways(ways: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{what}: " + ", ".join(f"{way} {ms:.2f}" for way, ms in by_way.items()) + " ms"
                     for what, by_way in ways.items())


def time_after_idle(call: Callable[[], Any], pauses: int) -> float:
    """Median ms of `call` made after IDLE_S seconds of nothing."""
    times = []
    for _ in range(pauses):
        time.sleep(IDLE_S)
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return median(times)


def measure(db: RunDB, queries: int, idle_pauses: int, scratch: Path) -> dict[str, Any]:
    """The figures of one size, in this (reading) process (and the seconds it took to build the
    bare table, which no figure includes)."""
    began = time.perf_counter()
    bare = bare_table(db, scratch / "bare.duckdb")
    bare_build_s = time.perf_counter() - began
    try:
        figures = time_queries(db, queries, bare)
        if idle_pauses:
            figures["idle"] = time_after_idle(lambda: db.sql(QUERY), idle_pauses)
            bare_query = WIDE_QUERY.format(table="bare")
            answer = BARE_WAYS[min(figures["bare_ways"]["query"], key=figures["bare_ways"]["query"].get)]
            figures["bare_idle"] = time_after_idle(lambda: answer(bare, bare_query), idle_pauses)
    finally:
        bare.close()
    figures["load"] = os.getloadavg()[0]
    figures["bare_build_s"] = bare_build_s
    return figures


# -- the orchestrating process -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(probe: Callable[[], bool], what: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        try:
            if probe():
                return
        except (OSError, ProjectionBusy):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what}: no answer within {timeout_s:g}s")


REOPEN_WAIT_S = 10.0


def _opened_again(client: ServiceClient, before: int) -> float | None:
    """Seconds until the service has opened its file again since it had `before` times (after a
    build it does so on its fold's first idle turn that follows a checkpoint: see
    projections.service.REOPEN_AFTER_RECORDS), or None when it has not within REOPEN_WAIT_S (too
    few records folded, or no checkpoint yet). The bare table is measured opened again after it is
    written; this measures the service the same way, not while it still reads rows its own
    instance appended (1.5-2.5x slower) or in the moment it drops its caches to open the file."""
    began = time.monotonic()
    while time.monotonic() - began < REOPEN_WAIT_S:
        if client.ping()["reopened"] > before:
            return time.monotonic() - began
        time.sleep(0.1)
    return None


def _ui_answers(url: str) -> bool:
    with urllib.request.urlopen(url + "/runs", timeout=30) as response:
        return response.status == 200


def run(sizes: tuple[int, ...], queries: int, builders: int = 2) -> Outcome:
    home = fresh_home()
    env = {**os.environ, "RUNBUS_HOME": str(home), "RUNBUS_PROJECTION": "service",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    svc = bootstrap(load_settings(env))
    client = ServiceClient(ServiceAddress.of(home), svc.bus, start=None, timeout_s=600)
    # the builders import Runbus while the follower and the UI start (none of it is timed)
    pool = multiprocessing.get_context("spawn").Pool(builders)
    with (home / "follower.log").open("wb") as log:
        follower = subprocess.Popen([RUNBUS, "project", "--follow"], env=env, stdout=log, stderr=log)
    port = _free_port()
    with (home / "ui.log").open("wb") as log:
        ui = subprocess.Popen([RUNBUS, "ui", "--port", str(port)], env=env, stdout=log, stderr=log)
    measurer = Measurer(env, home)
    outcome = Outcome()
    builds: dict[str, dict[str, float]] = {}
    bare_ways: dict[str, dict[str, dict[str, float]]] = {}
    try:
        with phase("start follower, UI and builders"):
            _wait(lambda: bool(ServiceClient(ServiceAddress.of(home), MemoryBus(), start=None).ping()),
                  "runbus project --follow", follower)
            _wait(lambda: _ui_answers(f"http://127.0.0.1:{port}"), "runbus ui", ui)
        built = 0
        for size in sorted(sizes):
            with phase("build runs"):
                began = time.perf_counter()
                pool.starmap(_produce_share, [(env, *share) for share in _shares(built, size - built, builders)])
                produced = time.perf_counter()
                before = client.ping()["reopened"]
                folded = client.catch_up()
                projected = time.perf_counter()
            builds[str(size)] = {"runs_added": size - built, "produce_s": produced - began,
                                 "project_s": projected - produced, "records": folded}
            built = size
            with phase("wait for the service to open its file again"):
                settled = _opened_again(client, before)
            reopened = client.ping()["reopened"]
            builds[str(size)]["waited_for_reopen_s"] = settled
            with phase("measure in a second process"):
                figures = measurer.figures(queries, IDLE_QUERIES if size == min(sizes) else 0, size)
            # how often the service had opened its file again (projections.service.REOPEN_AFTER_RECORDS)
            builds[str(size)]["service_reopened"] = {"before_measuring": reopened, "after": client.ping()["reopened"]}
            add("build the bare table (in the measuring process)", figures["bare_build_s"])
            outcome.figures[f"query_ms_{size}"] = figures["query"]
            outcome.figures[f"query_bare_ms_{size}"] = figures["bare"]
            outcome.figures[f"query_over_bare_{size}"] = figures["query"] / figures["bare"]
            outcome.figures[f"query_kv_ms_{size}"] = figures["kv"]
            outcome.figures[f"list_runs_ms_{size}"] = figures["list_runs"]
            outcome.figures[f"list_runs_bare_ms_{size}"] = figures["list_bare"]
            bare_ways[str(size)] = figures["bare_ways"]
            if "idle" in figures:
                outcome.figures[f"query_idle_ms_{size}"] = figures["idle"]
                outcome.figures[f"query_bare_idle_ms_{size}"] = figures["bare_idle"]
            print(f"query at {size:,} runs (median of {queries}, from a second process, UI and follower "
                  f"running, load {figures['load']:.1f}): Runbus {figures['query']:.2f} ms, bare DuckDB table "
                  f"{figures['bare']:.2f} ms ({figures['query'] / figures['bare']:.2f}x), key/value tables "
                  f"{figures['kv']:.2f} ms; list_runs(sort_by='-result.accuracy', limit=100) "
                  f"{figures['list_runs']:.2f} ms (bare DuckDB table {figures['list_bare']:.2f} ms); bare table "
                  f"ways (df: .df(), arrow: Arrow + pyarrow) {_ways(figures['bare_ways'])}"
                  + (f"; after {IDLE_S:g} s idle {figures['idle']:.2f} ms (bare DuckDB table "
                     f"{figures['bare_idle']:.2f} ms)" if "idle" in figures else ""),
                  flush=True)
    finally:
        measurer.close()
        pool.close()
        pool.join()
        for process in (ui, follower):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        svc.close()
    total_s = sum(b["produce_s"] + b["project_s"] for b in builds.values())
    outcome.figures["query_build_ms_per_run"] = total_s * 1000 / max(sizes)
    outcome.details = {"query": " ".join(QUERY.split()), "kv_query": " ".join(KV_QUERY.split()),
                       "bare_ways_ms": bare_ways,
                       "builds": builds, "builders": builders, "queries_per_size": queries,
                       "measured_from": "a second process, with `runbus ui` and `runbus project --follow` "
                                        "running on the home",
                       "idle": {"pause_s": IDLE_S, "queries": IDLE_QUERIES, "runs": min(sizes)}}
    return outcome


class Measurer:
    """The measuring process (`python -m benchmarks.query --measure`): started at once, so that its
    imports overlap the start of the follower and the UI; it opens the home only when first asked."""

    def __init__(self, env: dict[str, str], home: Path) -> None:
        self._log = home / "measure.log"
        with self._log.open("wb") as log:
            self._process = subprocess.Popen([sys.executable, "-m", "benchmarks.query", "--measure", "--scratch",
                                              str(home)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=log, text=True)

    def figures(self, queries: int, idle_pauses: int, size: int) -> dict[str, Any]:
        """The figures of the home as it is now (see `measure`)."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps({"queries": queries, "idle_pauses": idle_pauses}) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"measuring {size:,} runs failed (exit {self._process.wait()}): "
                               f"{self._log.read_text(errors='replace').strip()[-2000:]}")
        return dict(json.loads(line))

    def close(self) -> None:
        end_child(self._process, 60)


def serve_measurements(scratch: Path) -> None:
    """The measuring process's loop: one JSON request ({"queries", "idle_pauses"}) a line on stdin,
    the figures as one JSON line on stdout."""
    from engine import get_run_db
    from engine.api import close_session

    db: RunDB | None = None
    for line in sys.stdin:
        request = json.loads(line)
        db = db or get_run_db()
        print(json.dumps(measure(db, request["queries"], request["idle_pauses"], scratch)), flush=True)
    close_session()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.query", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="1000,10000,100000", help="run counts (comma-separated)")
    parser.add_argument("--queries", type=int, default=21, help="repeats per figure (the median is shown)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        serve_measurements(args.scratch)
        return
    sizes = tuple(int(part.replace("_", "")) for part in args.runs.split(",") if part.strip())
    outcome = run(sizes, max(5, args.queries))
    print(json.dumps(outcome.figures, indent=2))


if __name__ == "__main__":
    main()
