"""The two read-side designs of issue 12, measured on one home: the projection service (what
Runbus does) against published read-only snapshots (the alternative the README weighs).

`python -m benchmarks.read_paths HOME`: HOME holds a projection (e.g. 100,000 runs built by the
query workload). For the snapshot design it times what the projector would pay to publish one
snapshot (CHECKPOINT, then a copy of the file) and what a reader pays to answer from it: a new
reader opens the copy read-only and queries; a reader that keeps it open only queries. For the
service it times the same query through `get_run_db()` from this process (a second process to the
service), once in a burst and once after the service sat idle. Medians of `--repeat` each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

QUERY = """
SELECT uid, name, "result.accuracy" AS accuracy, "result.loss" AS loss
FROM runs_wide
WHERE "param.p1" = 3 AND "result.accuracy" > 0.5
ORDER BY "result.loss" ASC, uid
LIMIT 100
"""


def timed_ms(action: Callable[[], object], repeat: int) -> float:
    """Median wall time of `action` in milliseconds over `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def snapshot_figures(db_path: Path, repeat: int) -> dict[str, float]:
    """What the snapshot design costs: publishing one, and reading from one (cold and warm)."""
    with tempfile.TemporaryDirectory() as folder:
        snapshot = Path(folder) / "snapshot.duckdb"

        def publish() -> None:
            con = duckdb.connect(str(db_path))
            con.execute("CHECKPOINT")
            con.close()
            shutil.copyfile(db_path, snapshot)

        figures = {"publish a snapshot (checkpoint + copy)": timed_ms(publish, repeat)}

        def cold_read() -> None:
            con = duckdb.connect(str(snapshot), read_only=True)
            con.sql(QUERY).to_arrow_table()
            con.close()

        figures["new reader: open the snapshot + query"] = timed_ms(cold_read, repeat)
        warm = duckdb.connect(str(snapshot), read_only=True)
        figures["open reader: query the snapshot"] = timed_ms(lambda: warm.sql(QUERY).to_arrow_table(), repeat)
        warm.close()
        figures["snapshot file size (MB)"] = snapshot.stat().st_size / 1e6
    return figures


def service_figures(repeat: int, idle_s: float) -> dict[str, float]:
    """The same query through the projection service, in a burst and after `idle_s` of quiet."""
    from engine import get_run_db

    db = get_run_db()
    db.sql("SELECT 1")  # the service is up and caught up
    figures = {"service: query (burst)": timed_ms(lambda: db.sql(QUERY), repeat)}

    def after_idle() -> None:
        time.sleep(idle_s)

    idle_times = []
    for _ in range(repeat):
        after_idle()
        start = time.perf_counter()
        db.sql(QUERY)
        idle_times.append((time.perf_counter() - start) * 1000)
    figures[f"service: query after {idle_s:g} s idle"] = statistics.median(idle_times)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.read_paths", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("home", type=Path)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--idle", type=float, default=2.0)
    args = parser.parse_args()
    home = args.home.resolve()
    os.environ["RUNBUS_HOME"] = str(home)
    os.environ["RUNBUS_PROJECTION"] = "service"
    runs = duckdb.connect(str(home / "runbus.duckdb"), read_only=True)
    count = runs.execute("SELECT count(*) FROM runs").fetchone()
    runs.close()
    print(f"home {home}: {count[0] if count else 0:,} runs; load average {os.getloadavg()[0]:.2f}")
    for name, value in {**snapshot_figures(home / "runbus.duckdb", args.repeat),
                        **service_figures(args.repeat, args.idle)}.items():
        print(f"  {name:<45} {value:9.2f}")


if __name__ == "__main__":
    main()
