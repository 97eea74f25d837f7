"""UI benchmark: GET of the runs page with 100k runs in the projection.

The runs go through the real pipeline (RunContext -> writer -> bus); `runbus ui` starts (its first
request starts the home's projection service, which folds them) and the page is then fetched over
HTTP as a browser would.
`python -m benchmarks.ui [--runs N] [--repeat N]` prints the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import stop_projection_service
from engine.bootstrap import Services, bootstrap
from engine.runspec import RunSpec
from engine.settings import load_settings

PAGES = {
    "runs page (newest first, 50 rows)": "/runs",
    "sorted by a result": "/runs?sort=-result.accuracy",
    "filtered by a label and a result": "/runs?label=team%3Dt1&where=result.loss+%3C+0.5",
    "page 1000 (deep offset)": "/runs?page=1000",
}


def _noop(context: Any) -> None:
    """The handler the benchmark runs are attributed to (never called)."""


def produce(svc: Services, count: int) -> None:
    """`count` tiny finished runs (2 params, 2 results, a label each) through the writer and bus."""
    for i in range(count):
        spec = RunSpec(svc.settings, _noop, "benchmarks.ui:_noop", name=f"r{i % 1000}", project="bench",
                       params={"p1": i % 10, "lr": (i % 100) * 0.001})
        context = spec.new_context(svc)
        context.start()
        context.log_result("accuracy", (i * 7919 % 1000) / 1000)
        context.log_result("loss", (i * 104729 % 1000) / 1000)
        context.set_label("team", f"t{i % 3}")
        context.finish(flush=False)  # one flush at the end instead of one per run
    svc.writer.flush()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_ms(url: str) -> float:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as response:
        body = response.read()
        if response.status != 200 or b"table class=\"grid runs\"" not in body:
            raise RuntimeError(f"GET {url} did not return the runs page")
    return (time.perf_counter() - began) * 1000


def runs_page_latency(runs: int = 100_000, repeat: int = 7) -> dict[str, float]:
    """Median milliseconds of GET for each page in PAGES, with `runs` runs projected; also the
    seconds to produce the runs and for the UI to fold them at start-up."""
    home = Path(tempfile.mkdtemp(prefix="runbus-bench-ui-"))
    env = {**os.environ, "RUNBUS_HOME": str(home), "RUNBUS_PROJECTION": "service", "RUNBUS_DB_TIMEOUT": "600"}
    env.pop("RUNBUS_BUS", None)
    svc = bootstrap(load_settings(env))
    began = time.perf_counter()
    produce(svc, runs)
    produced_s = time.perf_counter() - began
    svc.close()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "ui", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL)
    try:
        began = time.perf_counter()
        _wait_for(base + "/runs", server)  # the first answer waits for the service to fold the runs
        folded_s = time.perf_counter() - began
        figures = {"runs": float(runs), "produce_s": produced_s, "ui_start_and_fold_s": folded_s}
        for label, path in PAGES.items():
            _get_ms(base + path)  # warm
            figures[label] = statistics.median(_get_ms(base + path) for _ in range(repeat))
        return figures
    finally:
        server.terminate()
        server.wait(timeout=30)
        stop_projection_service(home)
        shutil.rmtree(home, ignore_errors=True)


def _wait_for(url: str, server: subprocess.Popen[bytes], timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"runbus ui exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"runbus ui did not answer within {timeout_s:g}s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ui")
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7, help="GETs per page; the median is shown")
    args = parser.parse_args()
    figures = runs_page_latency(args.runs, args.repeat)
    print(f"{args.runs:,} runs produced through the pipeline in {figures['produce_s']:.1f} s; "
          f"runbus ui folded them and answered in {figures['ui_start_and_fold_s']:.1f} s")
    for label in PAGES:
        print(f"GET {label}: {figures[label]:.0f} ms (median of {args.repeat})")


if __name__ == "__main__":
    main()
