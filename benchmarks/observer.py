"""The second process that stops the clock of a Runbus-vs-MLflow row: "done" means queryable from
another process, on both sides.

`Observer` starts `python -m benchmarks.observer` on the current RUNBUS_HOME/RUNBUS_BUS and waits
until it has answered one query (imports done, projection service up) before any clock starts.
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

from benchmarks.common import ROOT, runbus_environment

_POLL_S = 0.005
TIMEOUT_S = 300.0


class Observer:
    """A warm second process on the current home that answers "do you see it all yet?"."""

    def __init__(self) -> None:
        self._process = subprocess.Popen([sys.executable, "-m", "benchmarks.observer"], cwd=ROOT,
                                         env={**os.environ, **runbus_environment()}, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self._ask({"sql": "SELECT count(*) FROM runs", "params": [], "expected": 0})

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
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def serve() -> None:
    """The observer's loop: one JSON request a line on stdin, one JSON answer a line on stdout."""
    from engine import get_run_db
    from engine.api import close_session

    db = get_run_db()
    for line in sys.stdin:
        request = json.loads(line)
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
