"""Optional pyinstrument profiles of the workloads, for whoever optimizes them.

With RUNBUS_BENCH_PROFILE=<folder>, each workload group (in the benchmark process) writes
<folder>/<name>-<pid>.txt: the top functions by self time, then the call tree. pyinstrument samples
only the thread that started it: the writer thread of a producer, the producer processes and the
projection service that folds and rebuilds in the pipeline workload are not in these files (use
py-spy with --subprocesses for those, or benchmarks.ingest_cpu for a fold in one process).
Profiling slows the workloads: do not quote figures from a profiled run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def top_self_time(root: Any, count: int = 15) -> list[tuple[str, float]]:
    """Functions by the time spent in their own code (a pyinstrument frame tree, [self] leaves folded
    into their function)."""
    spent: Counter[str] = Counter()
    stack = [(root, "")]
    while stack:
        frame, parent_name = stack.pop()
        name = f"{frame.function}  {frame.file_path_short}:{frame.line_no}"
        if frame.is_synthetic_leaf:
            spent[parent_name] += frame.time
            continue
        children = list(frame.children)
        spent[name] += max(0.0, frame.time - sum(child.time for child in children))
        stack.extend((child, name) for child in children)
    return spent.most_common(count)


@contextmanager
def profiled(name: str) -> Iterator[None]:
    folder = os.environ.get("RUNBUS_BENCH_PROFILE")
    if not folder:
        yield
        return
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("RUNBUS_BENCH_PROFILE is set but pyinstrument is not installed; not profiling", flush=True)
        yield
        return
    profiler = Profiler(interval=0.001)
    profiler.start()
    try:
        yield
    finally:
        session = profiler.stop()
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        root = session.root_frame()
        top = "\n".join(f"{seconds:8.3f} s  {name}" for name, seconds in top_self_time(root)) if root else ""
        tree = profiler.output_text(show_all=False)
        (out / f"{name}-{os.getpid()}.txt").write_text(
            f"top functions by self time (seconds)\n{top}\n\ncall tree\n{tree}")
