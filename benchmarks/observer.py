"""The second process that stops the clock of a Runbus-vs-MLflow row: "done" means queryable from
another process, on both sides.

`Observer` starts `python -m benchmarks.observer` on the current RUNBUS_HOME/RUNBUS_BUS and waits
until it has answered one query (imports done, projection service up) before any clock starts;
`watch()` points it at the current home and bus again, with the same wait, so one process serves
every measurement (`shared()`), as one MLflow observer serves every store.
`Observer.wait_for(sql, params, expected)` then has it run `get_run_db().sql(sql, params)` until the
first cell of the answer reaches `expected`; it returns when the observer says so. The MLflow side
has the same protocol with MLflow's own search in benchmarks/mlflow_workload.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from benchmarks.common import ROOT, end_child, runbus_environment

_POLL_S = 0.005
TIMEOUT_S = 300.0


class Observer:
    """A warm second process on the current home that answers "do you see it all yet?"."""

    def __init__(self) -> None:
        self._process = subprocess.Popen([sys.executable, "-m", "benchmarks.observer"], cwd=ROOT,
                                         env={**os.environ, **runbus_environment()}, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self._ask({"sql": "SELECT count(*) FROM runs", "params": [], "expected": 0})

    def watch(self) -> None:
        """Point the observer at this process's current home and bus (its RUNBUS_* variables), and
        return once it has answered a query there."""
        self._ask({"env": runbus_environment()})

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the observer process exited with {self._process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"observer: {answer['error']}")
        return answer

    def wait_for(self, sql: str, params: Sequence[Any], expected: int) -> int:
        """Block until the observer's `sql` (first cell) reaches `expected`; the queries it took."""
        return int(self._ask({"sql": sql, "params": list(params), "expected": expected})["queries"])

    def close(self) -> None:
        end_child(self._process, 30)

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


_SHARED: list[Observer] = []


def shared() -> Observer:
    """The workload's one observer, watching the current home (started on first use; closed by
    `close_shared()`)."""
    if _SHARED:
        _SHARED[0].watch()
    else:
        _SHARED.append(Observer())
    return _SHARED[0]


def close_shared() -> None:
    """Stop the shared observer, if one runs (a workload's last measurement is done)."""
    while _SHARED:
        _SHARED.pop().close()


def serve() -> None:
    """The observer's loop: one JSON request a line on stdin, one JSON answer a line on stdout. A
    request {"env": {...}} moves it to another home and bus, and is answered once a query there was."""
    from engine import get_run_db
    from engine.api import close_session

    db = get_run_db()
    for line in sys.stdin:
        request = json.loads(line)
        if "env" in request:
            close_session()
            for key in [key for key in os.environ if key.startswith("RUNBUS_")]:
                del os.environ[key]
            os.environ.update(request["env"])
            db = get_run_db()
            request = {"sql": "SELECT count(*) FROM runs", "params": [], "expected": 0}
        deadline = time.monotonic() + TIMEOUT_S
        queries = 0
        while True:
            queries += 1
            seen = int(db.sql(request["sql"], request["params"]).iloc[0, 0])
            if seen >= request["expected"]:
                answer: dict[str, Any] = {"seen": seen, "queries": queries}
                break
            if time.monotonic() > deadline:
                answer = {"error": f"saw {seen} of {request['expected']} after {TIMEOUT_S:g}s: {request['sql']}"}
                break
            time.sleep(_POLL_S)
        print(json.dumps(answer), flush=True)
    close_session()


if __name__ == "__main__":
    serve()
